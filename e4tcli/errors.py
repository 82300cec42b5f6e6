"""Errors the CLI turns into one line and a stable exit code."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class E4TError(Exception):
    """A failure to report to the user as one line: what went wrong, and the fix.

    ``exit_code`` is 2 for bad usage or input, 1 for a runtime failure.
    """

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(E4TError):
    """The user asked for something that cannot work as given (exit code 2)."""

    exit_code = EXIT_USAGE


class RuntimeFailure(E4TError):
    """Something failed while doing valid work (exit code 1)."""

    exit_code = EXIT_FAILURE
