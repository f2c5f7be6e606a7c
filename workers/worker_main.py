"""Start an inference worker in the current process (``classlens worker``)."""

from __future__ import annotations

import os
import socket

from kernel.errors import ConfigurationError
from kernel.settings import Settings
from workers.celery_app import make_celery_app

#: Log levels Celery's worker accepts.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def worker_argv(queues: list[str], concurrency: int, loglevel: str) -> list[str]:
    """The ``celery worker`` arguments of :func:`run_worker`, checked; errors name the bad value."""
    if not queues or any(not q or "," in q or q != q.strip() for q in queues):
        raise ConfigurationError(f"queues: expected one or more queue names such as cpu or gpu, got {queues}")
    if concurrency < 1:
        raise ConfigurationError(f"concurrency: expected at least 1 worker process, got {concurrency}")
    if loglevel.lower() not in LOG_LEVELS:
        raise ConfigurationError(f"loglevel: expected one of {', '.join(LOG_LEVELS)}, got {loglevel!r}")
    # Unique per process, so several workers on one machine (e.g. a CPU and a GPU one)
    # do not clash in Celery's node registry.
    hostname = f"classlens-{'-'.join(queues)}-{os.getpid()}@{socket.gethostname()}"
    return [
        "worker",
        "--pool", "prefork",
        "--queues", ",".join(queues),
        "--concurrency", str(concurrency),
        "--loglevel", loglevel.upper(),
        "--hostname", hostname,
        # Workers share nothing but the queue: gossip and mingle only slow start-up.
        "--without-gossip", "--without-mingle",
    ]


def threads_per_process(settings: Settings, concurrency: int) -> Settings:
    """Settings whose onnxruntime thread count shares the cores among ``concurrency`` processes.

    ``intra_op_threads = 0`` lets every session take all cores; with several worker
    processes that oversubscribes the CPU and every batch gets slower. An explicit
    setting is kept as it is.
    """
    if settings.intra_op_threads or concurrency <= 1:
        return settings
    return settings.model_copy(update={"intra_op_threads": max(1, (os.cpu_count() or 1) // concurrency)})


def run_worker(
    settings: Settings,
    queues: list[str],
    concurrency: int,
    loglevel: str,
    *,
    visibility_timeout_seconds: int | None = None,
) -> None:
    """Run a prefork Celery worker consuming ``queues`` until it is stopped (Ctrl-C, SIGTERM).

    Each of the ``concurrency`` processes loads the models once, on its first batch.
    ``visibility_timeout_seconds`` overrides how long Redis waits before redelivering a
    message whose worker vanished (see :func:`workers.celery_app.default_visibility_timeout`).
    """
    argv = worker_argv(queues, concurrency, loglevel)
    app = make_celery_app(threads_per_process(settings, concurrency),
                          visibility_timeout_seconds=visibility_timeout_seconds)
    app.worker_main(argv)
