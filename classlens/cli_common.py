"""What every ``classlens`` command shares: the two consoles, the debug switch, one-line errors.

The command modules (:mod:`classlens.cli` and the ``cli_*`` modules it registers) import
this module; it imports none of them, so the command line has no import circle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from kernel.errors import ClassLensError


def _flags_take_no_value() -> None:
    """Show no type after a flag in ``--help``.

    Typer 0.29 prints a type after every option, ``<bool>`` after ``--quiet`` and ``--help``
    too, which reads as if a flag took a value. Only flags lose it; every other option
    keeps its type.
    """
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "flags_hidden", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.flags_hidden = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_take_no_value()

console = Console(stderr=True)
"""Messages, progress bars and errors (stderr)."""
out = Console()
"""What a command prints as its result (stdout), so that it can be piped."""
debug_mode: dict[str, bool] = {"debug": False}
"""``--debug`` as the main callback set it: errors then raise with their traceback."""


def fail(error: ClassLensError) -> None:
    """Print an error as one line and exit with its code."""
    console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=error.exit_code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn ClassLens errors into one line and an exit code."""
    try:
        yield
    except ClassLensError as error:
        if debug_mode["debug"]:
            raise
        fail(error)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(code=130) from None


#: The sampling rates ``--fps`` accepts (the ``sample_fps`` setting's range).
MAX_SAMPLE_FPS = 30.0


def check_fps(value: float | None) -> float | None:
    """``--fps`` is above 0 and at most 30 frames per second; the error names the flag, not the setting."""
    if value is not None and not 0 < value <= MAX_SAMPLE_FPS:
        raise typer.BadParameter(f"expected more than 0 and at most {MAX_SAMPLE_FPS:g} frames per second, "
                                 f"got {value:g}")
    return value


class ConsoleDownloadReporter:
    """Shows each model download on stderr: what is fetched, and a progress bar while it comes."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def started(self, what: str, total_bytes: int | None) -> None:
        """Start a bar (a pulsing one when the size is unknown)."""
        self.finished()
        # pip does not say how far it is: a spinner and the time so far, not a bar that never moves.
        measure = (BarColumn(bar_width=20), DownloadColumn()) if total_bytes else (SpinnerColumn(),)
        self._progress = Progress(TextColumn("downloading {task.description}"), *measure, TimeElapsedColumn(),
                                  console=console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(what, total=total_bytes)

    def advanced(self, received_bytes: int) -> None:
        """Move the bar."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, received_bytes)

    def finished(self) -> None:
        """Stop the bar, leaving its last state on screen."""
        if self._progress is not None:
            self._progress.stop()
        self._progress = self._task = None
