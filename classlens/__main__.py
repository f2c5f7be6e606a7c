"""``python -m classlens`` runs the command line."""

import os
import sys
from pathlib import Path


def _forget_working_directory() -> None:
    """Take the working directory off ``sys.path`` unless ClassLens itself lives there.

    ``python -m`` puts it first, so a folder there named like one of our packages (a
    ``reports/`` output folder, a ``training/`` data folder) would shadow the installed
    package, in this process and in every worker process it spawns.
    """
    if not sys.path:
        return
    first = Path(sys.path[0] or os.curdir).resolve()
    here = Path(__file__).resolve().parent.parent
    if first == Path.cwd().resolve() and first != here:
        del sys.path[0]


_forget_working_directory()

from classlens.cli import main  # noqa: E402  (after the path is mended)

main()
