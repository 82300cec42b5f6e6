"""Everything the CLI prints goes through here: plain when not a terminal.

With no terminal (pipes, CI) there is no colour and no box drawing; with
``--json`` a command prints exactly one JSON object on stdout.
"""

import functools
import json
import os
import sys
import traceback
from contextlib import contextmanager, redirect_stdout
from typing import Any, Callable, Iterable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from e4tcli.errors import EXIT_FAILURE, E4TError
from e4tcli.io.destinations import os_error_message
from e4tcli.plugins import DomainRegistry, debug_enabled, load_registry


def stdout_console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def tell(message: str) -> None:
    """One line on stderr about what e4t is doing (stdout stays for results and --json)."""
    stderr_console().print(f"e4t: {message}", markup=False)


def warn(message: str) -> None:
    stderr_console().print(f"e4t: warning: {message}", markup=False)


_json_stdout = None
"""Where ``print_json`` writes while a ``--json`` command keeps stdout for its JSON alone."""


@contextmanager
def stdout_reserved_for_json(enabled: bool) -> Iterator[None]:
    """With ``--json``, what Python code prints on stdout goes to stderr instead, so stdout holds only
    the command's JSON (DeepSpeed, which accelerate and transformers import once it is installed, e.g.
    to unwrap a model, logs to stdout). Writes straight to file descriptor 1 (C libraries) are not caught."""
    global _json_stdout
    if not enabled or _json_stdout is not None:
        yield
        return
    _json_stdout = sys.stdout
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        _json_stdout = None


def print_json(data: Any) -> None:
    stream = _json_stdout or sys.stdout
    stream.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    stream.flush()


def print_table(columns: Iterable[str], rows: Iterable[Iterable[Any]], title: Optional[str] = None) -> None:
    """A rich table on a terminal; aligned plain columns (never wrapped) otherwise."""
    rows = [["" if value is None else str(value) for value in row] for row in rows]
    console = stdout_console()
    if console.is_terminal:
        table = Table(title=title, header_style="bold")
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    lines = [list(columns)] + [[cell.replace("\n", ", ") for cell in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        sys.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() + "\n")


_registry: Optional[DomainRegistry] = None


def registry() -> DomainRegistry:
    """The domain registry, loaded once per process; plugin problems are warned about once."""
    global _registry
    if _registry is None:
        _registry = load_registry()
        if not any(key.endswith("_COMPLETE") and key.startswith("_E4T") for key in os.environ):
            for plugin, problem in _registry.broken:
                fix = f"E4T_BLOCK_PLUGINS={plugin.name} skips it" + (
                    "" if debug_enabled() else "; E4T_DEBUG=1 shows the traceback"
                )
                warn(f"{plugin.describe()} {problem} ({fix})")
    return _registry


def reset_registry() -> None:
    """Forget the loaded registry (tests use it after changing plugins or the environment)."""
    global _registry
    _registry = None


@contextmanager
def step_progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable]:
    """A progress bar (on stderr, terminals only) showing the loss; yields the on_step callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = stderr_console()
    progress = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, loss="-")

        def on_step(step: int, losses) -> None:
            progress.update(task, completed=step, loss=f"{float(losses.total.detach()):.4f}")

        yield on_step


@contextmanager
def generation_progress(enabled: bool = True) -> Iterator[Any]:
    """A bar over every denoising step of the run, with images written and the time left (stderr,
    terminals only); yields the ``api.GenerationProgress`` that drives it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = stderr_console()
    bar = Progress(
        TextColumn("Generating"),
        BarColumn(),
        TextColumn("{task.fields[written]}/{task.fields[images]} images"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
    )

    class BarProgress:
        task = None
        written = 0

        def start(self, images: int, steps_per_batch: int, batches: int) -> None:
            self.task = bar.add_task("generate", total=steps_per_batch * batches, images=images, written=0)

        def denoising_step(self) -> None:
            bar.advance(self.task)

        def image_written(self, path) -> None:
            self.written += 1
            bar.update(self.task, written=self.written)

    with bar:
        yield BarProgress()


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def fail(error: E4TError) -> typer.Exit:
    stderr_console().print(f"e4t: error: {error}", markup=False)
    return typer.Exit(error.exit_code)


def reports_errors(command: Callable) -> Callable:
    """Turn expected failures into one line and an exit code; no traceback unless E4T_DEBUG=1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with stdout_reserved_for_json(bool(kwargs.get("json_output"))):
                return command(*args, **kwargs)
        except E4TError as error:
            if debug_enabled():
                traceback.print_exc()
            raise fail(error) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as error:
            if debug_enabled():
                raise
            plain = os_error_message(error) if isinstance(error, OSError) else None
            if plain is not None:
                raise fail(plain) from None
            stderr_console().print(
                f"e4t: error: unexpected {type(error).__name__}: {error} "
                "(E4T_DEBUG=1 shows the traceback; please report it)",
                markup=False,
            )
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper
