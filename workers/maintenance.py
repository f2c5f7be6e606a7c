"""Scheduled maintenance on the workers: retention of old sessions, abandoned analyses (Celery beat).

``classlens retention beat`` runs Celery's beat scheduler, which sends
:data:`RUN_RETENTION_TASK` every ``retention_interval_hours`` and
:data:`FAIL_ABANDONED_TASK` every half ``abandoned_after_seconds`` to ``maintenance_queue``;
any worker consuming that queue (the CPU workers by default) runs
:func:`~classlens.privacy.run_retention` or :func:`~pipeline.liveness.fail_abandoned_analyses`.
The tasks are thin, as every ClassLens task:
it builds the store engine, calls the pure function, and logs what it deleted. A run
that fails (database down) is not retried: the next scheduled run deletes what this one
would have.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from celery import Task, shared_task
from sqlalchemy import Engine

from kernel.settings import Settings
from kernel.store import init_store

logger = logging.getLogger(__name__)

#: Registered name of :func:`run_retention_task`.
RUN_RETENTION_TASK = "classlens.run_retention"
#: Registered name of :func:`fail_abandoned_task`.
FAIL_ABANDONED_TASK = "classlens.fail_abandoned_analyses"


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery beat's schedule: retention every ``retention_interval_hours`` (unless off), abandoned analyses often."""
    every = settings.abandoned_after_seconds / 2
    schedule: dict[str, dict[str, Any]] = {
        "classlens-abandoned-analyses": {
            "task": FAIL_ABANDONED_TASK,
            "schedule": timedelta(seconds=every),
            "options": {"queue": settings.maintenance_queue, "expires": every},
        },
    }
    if settings.retention_days == 0:
        return schedule
    return {
        **schedule,
        "classlens-retention": {
            "task": RUN_RETENTION_TASK,
            "schedule": timedelta(hours=settings.retention_interval_hours),
            # A run that waited longer than one interval is superseded by the next one.
            "options": {"queue": settings.maintenance_queue,
                        "expires": settings.retention_interval_hours * 3600.0},
        }
    }


@contextmanager
def _store_of(task: Task) -> Iterator[tuple[Settings, Engine]]:
    """The settings of the task's app and an engine on their store, disposed of afterwards."""
    from workers.lifecycle import settings_of

    settings = settings_of(task.app)
    engine = init_store(settings.resolved_database_url)
    try:
        yield settings, engine
    finally:
        engine.dispose()


@shared_task(bind=True, name=RUN_RETENTION_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def run_retention_task(self: Task) -> list[int]:
    """Delete the sessions older than ``retention_days``; returns their ids."""
    from classlens.privacy import run_retention

    with _store_of(self) as (settings, engine):
        result = run_retention(engine, settings)
    logger.info("retention: deleted %d session(s) created before %s: %s", len(result.deleted_analysis_ids),
                result.cutoff, result.deleted_analysis_ids)
    return result.deleted_analysis_ids


@shared_task(bind=True, name=FAIL_ABANDONED_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def fail_abandoned_task(self: Task) -> list[int]:
    """Mark failed the running analyses whose producer stopped showing signs of life; returns their ids."""
    from pipeline.liveness import fail_abandoned_analyses

    with _store_of(self) as (settings, engine):
        return fail_abandoned_analyses(engine, settings.abandoned_after_seconds)
