"""Scheduled maintenance on the workers: retention of old sessions (Celery beat).

``classlens retention beat`` runs Celery's beat scheduler, which sends
:data:`RUN_RETENTION_TASK` every ``retention_interval_hours`` to ``maintenance_queue``;
any worker consuming that queue (the CPU workers by default) runs
:func:`~classlens.privacy.run_retention`. The task is thin, as every ClassLens task:
it builds the store engine, calls the pure function, and logs what it deleted. A run
that fails (database down) is not retried: the next scheduled run deletes what this one
would have.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Task, shared_task

from kernel.settings import Settings
from kernel.store import init_store

logger = logging.getLogger(__name__)

#: Registered name of :func:`run_retention_task`.
RUN_RETENTION_TASK = "classlens.run_retention"


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery beat's schedule for ``settings``: retention every ``retention_interval_hours``, unless it is off."""
    if settings.retention_days == 0:
        return {}
    return {
        "classlens-retention": {
            "task": RUN_RETENTION_TASK,
            "schedule": timedelta(hours=settings.retention_interval_hours),
            # A run that waited longer than one interval is superseded by the next one.
            "options": {"queue": settings.maintenance_queue,
                        "expires": settings.retention_interval_hours * 3600.0},
        }
    }


@shared_task(bind=True, name=RUN_RETENTION_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def run_retention_task(self: Task) -> list[int]:
    """Delete the sessions older than ``retention_days``; returns their ids."""
    from classlens.privacy import run_retention
    from workers.tasks import settings_of

    settings = settings_of(self.app)
    engine = init_store(settings.resolved_database_url)
    try:
        result = run_retention(engine, settings)
    finally:
        engine.dispose()
    logger.info("retention: deleted %d session(s) created before %s: %s", len(result.deleted_analysis_ids),
                result.cutoff, result.deleted_analysis_ids)
    return result.deleted_analysis_ids
