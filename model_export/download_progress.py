"""Telling the user what is downloaded, while it is: a hook the command line fills in.

Model supply runs deep below the command line (a model is resolved when a pipeline
loads), so instead of threading a callback through every layer, the command line installs
one :class:`DownloadReporter` for the process (:func:`set_download_reporter`) and the two
places that download, pip for a pinned archive and a plain HTTP fetch for an npm tarball,
report to it. Without a reporter nothing is printed (the library stays quiet).
"""

from __future__ import annotations

from typing import Protocol


class DownloadReporter(Protocol):
    """Receives one download at a time: it starts, bytes arrive, it ends."""

    def started(self, what: str, total_bytes: int | None) -> None:
        """A download of ``what`` begins; ``total_bytes`` when the server says (None: unknown)."""

    def advanced(self, received_bytes: int) -> None:
        """``received_bytes`` more arrived."""

    def finished(self) -> None:
        """The download ended (completed or failed)."""


class _Holder:
    reporter: DownloadReporter | None = None


def set_download_reporter(reporter: DownloadReporter | None) -> None:
    """Install the process's reporter (None: report nothing)."""
    _Holder.reporter = reporter


def download_reporter() -> DownloadReporter | None:
    """The installed reporter, if any."""
    return _Holder.reporter
