"""Dispatchers: how crop batches get from the capture side to the inference side.

:class:`CropDispatcher` is the interface the pipeline talks to. The in-process
dispatcher here runs inference on a background thread of the same process (onnxruntime
releases the GIL, so detection and inference overlap on two cores); the Celery
dispatcher sends the same :class:`~kernel.types.CropBatch` payloads to workers.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine

from kernel.types import CropBatch
from workers.inference import InferenceModels, analyse_crops
from workers.persistence import store_face_results

logger = logging.getLogger(__name__)


@dataclass
class DispatchStats:
    """Counters a dispatcher keeps, for progress and for accounting at the end."""

    crops_submitted: int = 0
    """Crops handed to the dispatcher."""
    crops_stored: int = 0
    """Crops whose results are in the store."""
    batches_run: int = 0
    """Inference batches run."""


class CropDispatcher(Protocol):
    """Where the pipeline sends aligned crops; results end up in the store."""

    stats: DispatchStats

    def submit(self, batch: CropBatch) -> None:
        """Queue a batch of crops for inference (may block when the queue is full)."""

    def drain(self) -> None:
        """Block until every submitted crop is stored; re-raise a worker's error."""

    def close(self) -> None:
        """Release resources; pending work is dropped."""


class _Stop:
    """Sentinel that tells the inference thread to flush and wait."""


class InProcessDispatcher:
    """Runs inference on a background thread, batching crops up to ``batch_size``."""

    def __init__(
        self,
        models: InferenceModels,
        engine: Engine,
        *,
        batch_size: int = 32,
        max_pending_batches: int = 8,
        on_stored: Callable[[int], None] | None = None,
    ) -> None:
        self.models = models
        self.engine = engine
        self.batch_size = batch_size
        self.on_stored = on_stored
        self.stats = DispatchStats()
        # Bounded: a recording is never dropped from, so a slow model applies back-pressure to decoding.
        self._queue: queue.Queue[CropBatch | _Stop] = queue.Queue(maxsize=max_pending_batches)
        self._error: BaseException | None = None
        self._flushed = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="classlens-inference", daemon=True)
        self._thread.start()

    def submit(self, batch: CropBatch) -> None:
        """Queue crops; raises the inference thread's error if it failed."""
        self._raise_if_failed()
        if len(batch) == 0:
            return
        self.stats.crops_submitted += len(batch)
        while True:
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def flush(self) -> None:
        """Ask the inference thread to run its partial batch now, without waiting.

        Skipped when the queue is full: full batches are flowing anyway. A live session calls
        it once per sampling interval, so a quiet class still gets results within seconds.
        """
        if not self._closed:
            try:
                self._queue.put_nowait(_Stop())
            except queue.Full:
                return

    def drain(self) -> None:
        """Flush partial batches and wait until everything submitted is stored."""
        self._raise_if_failed()
        self._flushed.clear()
        self._queue.put(_Stop())
        while not self._flushed.wait(timeout=0.5):
            self._raise_if_failed()
            if not self._thread.is_alive():
                break
        self._raise_if_failed()
        if self.stats.crops_stored != self.stats.crops_submitted:
            raise RuntimeError(
                f"inference lost crops: {self.stats.crops_submitted} submitted, {self.stats.crops_stored} stored"
            )

    def close(self) -> None:
        """Stop the inference thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_Stop())
        self._queue.put(_Stop())  # second sentinel ends the loop after a flush
        self._thread.join(timeout=30)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        pending: list[CropBatch] = []
        pending_count = 0
        stops_in_a_row = 0
        try:
            while True:
                item = self._queue.get()
                if isinstance(item, _Stop):
                    if pending:
                        self._process(pending)
                        pending, pending_count = [], 0
                    self._flushed.set()
                    stops_in_a_row += 1
                    if self._closed and stops_in_a_row >= 2:
                        return
                    continue
                stops_in_a_row = 0
                pending.append(item)
                pending_count += len(item)
                while pending_count >= self.batch_size:
                    joined = CropBatch.concatenate(pending)
                    head, tail = _split(joined, self.batch_size)
                    self._process([head])
                    pending = [tail] if tail is not None else []
                    pending_count = len(tail) if tail is not None else 0
        except BaseException as exc:  # surfaces to the owner on its next call
            logger.exception("inference failed")
            self._error = exc
            self._flushed.set()

    def _process(self, batches: list[CropBatch]) -> None:
        batch = batches[0] if len(batches) == 1 else CropBatch.concatenate(batches)
        results = analyse_crops(batch, self.models)
        stored = store_face_results(self.engine, batch, results, only_while_running=False)
        self.stats.crops_stored += stored
        self.stats.batches_run += 1
        if self.on_stored is not None:
            self.on_stored(stored)


def _split(batch: CropBatch, size: int) -> tuple[CropBatch, CropBatch | None]:
    """Split a batch into its first ``size`` crops and the rest."""
    if len(batch) <= size:
        return batch, None
    return batch.slice(0, size), batch.slice(size, len(batch))
