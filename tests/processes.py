"""Process helpers shared by the tests and the benchmarks that start services in sessions of their own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_process_group(process: subprocess.Popen[bytes], grace_seconds: float) -> None:
    """Warm shutdown of a process started with ``start_new_session=True``, then kill what is left of its group.

    SIGTERM goes to the whole session (a Celery worker and its pool processes), which gets
    ``grace_seconds`` to finish; SIGKILL then removes any child that outlived its parent.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_seconds)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
