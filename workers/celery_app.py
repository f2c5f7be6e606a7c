"""The Celery application that carries crop batches from producers to inference workers.

:func:`make_celery_app` builds an app from :class:`~kernel.settings.Settings`. The
module-level ``app`` (what ``celery -A workers.celery_app worker`` finds) is built from
:func:`~kernel.settings.load_settings` on first access, not at import, so importing
this module never needs a broker.

Delivery guarantees: a message is acknowledged only after its task returned
(``acks_late``), a worker process that dies mid-task puts its message back
(``reject_on_worker_lost``), and a whole worker that dies (machine lost, ``kill -9``)
leaves its message in Redis' unacked set, from where another worker restores it once
the visibility timeout has passed. Results are written to the store idempotently, so a
redelivered batch never double-counts. There is no result backend: the store is the
source of truth for progress.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.entity import Queue
from kombu.utils.url import maybe_sanitize_url

from kernel.errors import ConfigurationError
from kernel.settings import Settings, load_settings

#: Queues every ClassLens deployment knows: CPU workers and GPU workers.
STANDARD_QUEUES: tuple[str, ...] = ("cpu", "gpu")

#: Broker URL schemes of Redis (the only broker whose redelivery behaviour we rely on and test).
REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "rediss+socket", "sentinel"})


def default_visibility_timeout(settings: Settings) -> int:
    """Seconds before Redis hands an unacknowledged message to another worker.

    It must exceed the longest a healthy task can hold a message: the hard time limit,
    plus a retry's countdown (held unacknowledged as an ETA task, at most 60 s). Twice the
    time limit plus a minute leaves room for both; shorter would run healthy tasks twice.
    """
    return 2 * settings.task_time_limit_seconds + 60


def soft_time_limit(settings: Settings) -> int:
    """Seconds after which a task is asked to stop (it retries or records the batch as failed).

    A tenth below the hard limit, at least one second, so the task can still write its
    failure record before the pool kills it.
    """
    limit = settings.task_time_limit_seconds
    return limit - max(1, limit // 10)


def _check_broker_url(settings: Settings) -> str:
    url = settings.broker_url
    if not url:
        raise ConfigurationError(
            "broker_url: not set; set CLASSLENS_BROKER_URL (e.g. redis://127.0.0.1:6379/0) to use Celery workers"
        )
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in REDIS_SCHEMES:
        raise ConfigurationError(f"broker_url: expected a Redis URL such as redis://host:6379/0, got scheme {scheme!r}")
    return url


def redacted_broker_url(settings: Settings) -> str:
    """The broker URL with any password masked, for error messages and logs."""
    return str(maybe_sanitize_url(settings.broker_url or ""))


def make_celery_app(settings: Settings, *, visibility_timeout_seconds: int | None = None) -> Celery:
    """Build the Celery app for ``settings``: Redis broker, msgpack messages, late acks, routing.

    ``visibility_timeout_seconds`` overrides :func:`default_visibility_timeout` (tests use a
    short one to see redelivery after a worker was killed).
    """
    broker_url = _check_broker_url(settings)
    # Registers the shared tasks; imported here rather than at the top so that this module
    # stays importable (for `-A`) without pulling the inference code in twice.
    from workers import lifecycle, maintenance, tasks

    visibility = (visibility_timeout_seconds or settings.broker_visibility_timeout_seconds
                  or default_visibility_timeout(settings))
    if visibility <= 0:
        raise ConfigurationError(f"visibility timeout: expected a positive number of seconds, got {visibility}")
    queue_names = list(dict.fromkeys([*STANDARD_QUEUES, settings.inference_queue]))
    app = Celery("classlens", broker=broker_url)
    transport_options: dict[str, Any] = {
        "visibility_timeout": visibility,
        # Without it a publish to a broker that stops answering (hung host, partition) blocks forever;
        # the worker's blocking pop waits about a second, well under it.
        "socket_timeout": 5,
        # Sweep for abandoned messages a few times per visibility timeout, at most every 10 s,
        # scanning on every sweep (kombu's default scans every 10th, i.e. every 100 s).
        "unacked_restore_interval": max(1, min(10, visibility // 4)),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 5,
    }
    app.conf.update(
        # msgpack carries the crop payload as raw bytes (json would need base64); nothing
        # else is accepted, so no pickle can ever be executed from the queue.
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack"],
        # Progress is read from the store; results are only a count nobody waits for.
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message per worker process at a time: a batch is seconds of work, and a
        # prefetched message would sit unprocessed behind a slow one.
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_seconds,
        task_soft_time_limit=soft_time_limit(settings),
        task_queues=[Queue(name, routing_key=name) for name in queue_names],  # type: ignore[no-untyped-call]
        task_default_queue=settings.inference_queue,
        task_routes={tasks.ANALYSE_CROP_BATCH_TASK: {"queue": settings.inference_queue},
                     tasks.ANALYSE_RECORDING_SEGMENT_TASK: {"queue": settings.inference_queue}},
        task_create_missing_queues=True,
        # Retention on a schedule (`classlens retention beat`); run by workers consuming maintenance_queue.
        beat_schedule=maintenance.beat_schedule(settings),
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        # A worker keeps trying to reach a restarted broker instead of exiting after 100 tries.
        broker_connection_max_retries=None,
        broker_transport_options=transport_options,
        # Tasks cannot ack over a lost connection; cancel them so they are redelivered once,
        # rather than finishing and being redelivered anyway.
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    setattr(app, lifecycle.SETTINGS_ATTRIBUTE, settings)
    return app


def __getattr__(name: str) -> Celery:
    """Build the module-level ``app`` from the environment on first access (PEP 562)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = make_celery_app(load_settings())
    globals()["app"] = built
    return built
