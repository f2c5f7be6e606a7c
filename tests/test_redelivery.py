"""The producer's recovery decisions, from real worker reports in a real Redis (the clock is the test's)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.test_celery import BROKER_URL, broker  # noqa: F401  (broker is a fixture)
from workers.liveness import WorkerDirectory, WorkerReporter
from workers.redelivery import Redelivery, WorkersUnavailableError

pytestmark = pytest.mark.redis


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def queue(broker: redis.Redis) -> Iterator[str]:  # noqa: F811
    name = f"redelivery-{uuid.uuid4().hex[:8]}"
    yield name
    broker.delete(name)


def _reporter(queue: str, **fields: object) -> WorkerReporter:
    return WorkerReporter(BROKER_URL, (queue,), 10.0, node=f"test:{uuid.uuid4().hex[:6]}", **fields)  # type: ignore[arg-type]


def test_work_a_worker_held_and_dropped_is_sent_again_unless_stored(queue: str) -> None:
    clock = Clock()
    watch = Redelivery(WorkerDirectory(BROKER_URL), queue, absent_seconds=30, clock=clock)
    worker = _reporter(queue)
    watch.sent("a")
    watch.sent("b")
    worker.hold("a")
    worker.hold("b")
    assert watch.to_resend(watch.observe()) == []  # both held
    worker.release("a")  # stored: the producer reads its receipt
    watch.confirmed("a")
    worker.release("b")  # …and b vanished with nothing stored (the worker died before writing)
    assert watch.to_resend(watch.observe()) == ["b"]
    watch.sent("b")
    assert watch.to_resend(watch.observe()) == []  # sent again: not held yet, and within the grace
    worker.stop()


def test_work_no_worker_holds_is_sent_again_only_when_the_queue_is_empty_after_a_grace(
    queue: str, broker: redis.Redis,  # noqa: F811
) -> None:
    clock = Clock()
    watch = Redelivery(WorkerDirectory(BROKER_URL), queue, absent_seconds=30, grace_seconds=5, clock=clock)
    worker = _reporter(queue)
    worker.write()
    watch.sent("c")
    clock.now += 10
    broker.rpush(queue, b"a message still waiting")
    assert watch.to_resend(watch.observe()) == []  # the queue still holds work: c may be in it
    broker.delete(queue)
    assert watch.to_resend(watch.observe()) == ["c"]  # in no queue and held by no one: lost
    worker.stop()


def test_no_worker_or_only_troubled_workers_fail_the_producer_after_a_while(queue: str) -> None:
    clock = Clock()
    watch = Redelivery(WorkerDirectory(BROKER_URL), queue, absent_seconds=30, clock=clock)
    watch.sent("d")
    watch.to_resend(watch.observe())
    clock.now += 31
    with pytest.raises(WorkersUnavailableError, match=rf"no worker has consumed queue '{queue}' for 30 s"):
        watch.to_resend(watch.observe())

    troubled = _reporter(queue, problem="cannot reach the database: OperationalError: connection refused")
    troubled.write()
    watch = Redelivery(WorkerDirectory(BROKER_URL), queue, absent_seconds=30, clock=clock)
    watch.sent("e")
    watch.to_resend(watch.observe())
    clock.now += 20
    watch.to_resend(watch.observe())  # not yet
    healthy = _reporter(queue)
    healthy.write()
    clock.now += 20
    watch.to_resend(watch.observe())  # one worker can work: the clock restarts
    healthy.stop()
    clock.now += 31
    watch.to_resend(watch.observe())
    clock.now += 31
    with pytest.raises(WorkersUnavailableError, match=r"could not work for 30 s: cannot reach the database"):
        watch.to_resend(watch.observe())
    troubled.stop()
    # Nothing outstanding: no worker is no problem.
    idle = Redelivery(WorkerDirectory(BROKER_URL), queue, absent_seconds=1, clock=clock)
    clock.now += 100
    assert idle.to_resend(idle.observe()) == []


def test_a_report_expires_with_its_worker(queue: str, broker: redis.Redis) -> None:  # noqa: F811
    worker = WorkerReporter(BROKER_URL, (queue,), 3.0, node=f"test:{uuid.uuid4().hex[:6]}")
    worker.hold("f")
    directory = WorkerDirectory(BROKER_URL)
    assert [r.work for r in directory.reports(queue)] == [("f",)]
    assert 0 < broker.pttl(worker.key) <= 3000  # a dead worker is forgotten within the time-to-live
    worker.stop()
    assert directory.reports(queue) == []
