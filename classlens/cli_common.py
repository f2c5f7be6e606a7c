"""What every ``classlens`` command shares: the two consoles, the debug switch, one-line errors.

The command modules (:mod:`classlens.cli` and the ``cli_*`` modules it registers) import
this module; it imports none of them, so the command line has no import circle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from kernel.errors import ClassLensError

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
