"""A worker's start and its processes' reports, hooked into Celery's signals.

However a worker is started (``classlens worker`` or ``celery -A workers.celery_app worker``):

1. **Before it consumes anything** (``celeryd_after_setup``, in the main process) it opens its
   store, reads the store's id and fails the analyses whose producer died
   (:func:`pipeline.liveness.fail_abandoned_analyses`). While the store cannot be opened it
   says so in its report (:mod:`workers.liveness`) and tries again every few seconds, so it never
   says "ready" without a store, and producers learn the true reason at once.
2. **Every pool process** (``worker_process_init``) then reports itself alive, with the work
   it holds and any problem it meets, until it exits or its main process dies.

The queues, settings and store id reach the pool processes as module state set before the
pool forks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.signals import celeryd_after_setup, worker_process_init, worker_process_shutdown

from kernel.errors import ConfigurationError
from kernel.settings import Settings, load_settings
from kernel.store import init_store, store_id_of
from pipeline.liveness import fail_abandoned_analyses
from workers.liveness import WorkerReporter

logger = logging.getLogger(__name__)

#: Seconds between two attempts to open the store at start.
STORE_RETRY_SECONDS = 3.0

#: Attribute of a Celery app that holds the :class:`Settings` it was built from.
SETTINGS_ATTRIBUTE = "classlens_settings"


def settings_of(app: Any) -> Settings:
    """The settings a Celery app was built with; the environment's for an app built elsewhere."""
    configured = getattr(app, SETTINGS_ATTRIBUTE, None)
    return configured if isinstance(configured, Settings) else load_settings()


class WorkerState:
    """What this worker process knows about itself (set before the pool forks, inherited by its processes)."""

    settings: Settings | None = None
    queues: tuple[str, ...] = ()
    store_id: str | None = None
    reporter: WorkerReporter | None = None


def current_reporter() -> WorkerReporter | None:
    """The reporter of the current process; None outside a worker's pool process (tests calling tasks directly)."""
    return WorkerState.reporter


def open_store_or_report(settings: Settings, queues: tuple[str, ...]) -> str:
    """Open the store, waiting (and reporting why) until it can be opened; returns the store's id."""
    reporter: WorkerReporter | None = None
    try:
        while True:
            try:
                engine = init_store(settings.resolved_database_url)
                try:
                    store_id = store_id_of(engine)
                    failed = fail_abandoned_analyses(engine, settings.abandoned_after_seconds)
                finally:
                    engine.dispose()
                if failed:
                    logger.warning("marked %d abandoned analyses failed: %s", len(failed), failed)
                return store_id
            except ConfigurationError as exc:
                problem = f"cannot open its store: {exc}"
            except Exception as exc:  # any driver error: the store is not usable yet
                problem = f"cannot open its store: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            logger.error("%s; trying again in %g s", problem, STORE_RETRY_SECONDS)
            if reporter is None and settings.broker_url:
                reporter = WorkerReporter(settings.broker_url, queues, settings.worker_report_ttl_seconds,
                                          problem=problem).start()
            elif reporter is not None:
                reporter.set_problem(problem)
            time.sleep(STORE_RETRY_SECONDS)
    finally:
        if reporter is not None:
            reporter.stop()


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _before_consuming(sender: str, instance: Any, **_: Any) -> None:
    """Main process, after the queues are known and before the pool starts: check the store."""
    settings = settings_of(instance.app)
    queues = tuple(sorted(instance.app.amqp.queues.consume_from or ()))
    WorkerState.settings, WorkerState.queues = settings, queues
    WorkerState.store_id = open_store_or_report(settings, queues)
    logger.info("worker %s: store %s… is open; consuming %s", sender, WorkerState.store_id[:8], ", ".join(queues))


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _pool_process_started(**_: Any) -> None:
    """Pool process: start reporting."""
    settings = WorkerState.settings
    if settings is None or not settings.broker_url:
        return
    WorkerState.reporter = WorkerReporter(settings.broker_url, WorkerState.queues, settings.worker_report_ttl_seconds,
                                          store_id=WorkerState.store_id).start(watch_parent=True)


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _pool_process_stopping(**_: Any) -> None:
    """Pool process: a clean exit forgets its report at once."""
    if WorkerState.reporter is not None:
        WorkerState.reporter.stop()
        WorkerState.reporter = None
