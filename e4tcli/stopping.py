"""Stopping a long command cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler).

The first signal only sets a flag that the command checks between units of
work (a training step, a denoising step), so it can keep what is finished and
say so; its exit code is then the shell's 128 + the signal number (130, 143).
"""

import signal
import time
from typing import Optional

from e4tcli.errors import E4TError


class Interrupted(E4TError):
    """Stopped by a signal after keeping what was finished (exit code 128 + the signal number)."""

    def __init__(self, message: str, *, signal_name: str, hint: Optional[str] = None):
        super().__init__(message, hint=hint)
        self.exit_code = 128 + int(getattr(signal.Signals, signal_name, signal.SIGINT))


class StopRequest:
    """Turns the first SIGINT/SIGTERM into ``signal_name``; a second Ctrl-C (2 s later) aborts at once."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._first = 0.0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, number, _frame):
        """Repeated SIGTERMs (schedulers often send several) do not abort."""
        if self.signal_name is not None and number == signal.SIGINT and time.monotonic() - self._first > 2.0:
            raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name = signal.Signals(number).name
            self._first = time.monotonic()

    def __exit__(self, *_):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
