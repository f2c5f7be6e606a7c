"""The training loop every ClassLens model family shares.

``fit`` trains a ``torch.nn.Module`` on a map-style dataset of ``(inputs, target)`` items
(``inputs`` a tensor, or a tuple of tensors passed as positional arguments), validates
after every epoch, logs one JSON line per epoch to ``metrics.jsonl``, keeps the best
epoch's weights in ``best.pt`` and the full state in ``checkpoint.pt``.

Resuming: when ``checkpoint.pt`` exists in the output folder (and ``resume`` is on) the
model, optimiser, scheduler, gradient scaler, every RNG state (python, numpy, torch,
CUDA, the data loader's shuffling generator), the history and the best score are
restored and training goes on at the next epoch. Because all randomness flows from
those states, an interrupted run that resumes ends with the same weights as an
uninterrupted one on the same machine.

Determinism: seeds are set for python, numpy and torch, ``torch.use_deterministic_algorithms``
is on (warn-only, since a few CUDA kernels have no deterministic variant), cuDNN
benchmarking is off, and the data loader shuffles with its own seeded generator.

Mixed precision runs only on CUDA (``torch.autocast`` with float16 and a gradient scaler);
on CPU the loop always computes in float32.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from training.run import BEST, CHECKPOINT, METRICS_LOG, TrainingError, write_atomic

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

T = TypeVar("T")

MetricsFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]
"""Turns all validation outputs ``[N, ...]`` and targets ``[N, ...]`` (numpy) into named figures."""
LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
"""Loss of a batch's outputs against its targets."""
EpochCallback = Callable[[int, dict[str, float]], None]
"""Called after every epoch (and its checkpoint) with the epoch number and its log line."""


@dataclass
class TrainConfig:
    """How to train: optimisation, reproducibility, hardware and checkpointing."""

    epochs: int = 30
    """Total epochs of the run (a resumed run goes on up to this number)."""
    batch_size: int = 64
    """Samples per optimisation step."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    seed: int = 0
    """Seed of every random generator; the same seed gives the same result on the same machine."""
    device: Literal["cpu", "cuda", "auto"] = "auto"
    """Where to train: 'cuda' requires a GPU, 'auto' uses one when present."""
    amp: bool = True
    """Mixed precision (float16 autocast + gradient scaling); only ever used on CUDA."""
    num_workers: int = 0
    """Data loader worker processes (0: load in the training process)."""
    checkpoint_every: int = 1
    """Save ``checkpoint.pt`` every this many epochs (and always after the last)."""
    resume: bool = True
    """Resume from ``checkpoint.pt`` when the output folder has one; False starts over."""
    selection_metric: str = "macro_f1"
    """Validation figure that picks the best epoch (``val_loss`` or a key of the metrics)."""
    selection_mode: Literal["max", "min"] = "max"
    """Whether a larger or smaller selection figure is better."""
    scheduler: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule over the epochs (cosine decay to 1 % of ``lr``, or constant)."""
    max_grad_norm: float | None = 5.0
    """Gradient norm clipping (None: no clipping)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy for ``run.json``."""
        return asdict(self)


@dataclass
class RunResult:
    """What a finished ``fit`` returns."""

    out_dir: Path
    """The run folder."""
    device: str
    """Device the model was trained on."""
    epochs_run: int
    """Epochs trained in this call (0 when a finished run was only reloaded)."""
    best_epoch: int
    """1-based epoch whose weights are in ``best.pt``."""
    best_metrics: dict[str, float]
    """That epoch's log line."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Every epoch's log line, including those of earlier (resumed) calls."""
    resumed_from: int = 0
    """Epochs already done when this call started."""

    @property
    def best_path(self) -> Path:
        """Path of the best weights."""
        return self.out_dir / BEST

    @property
    def checkpoint_path(self) -> Path:
        """Path of the resumable state."""
        return self.out_dir / CHECKPOINT


def resolve_device(preference: str) -> str:
    """'cpu' or 'cuda' for a configured preference; 'cuda' without a GPU is an error."""
    import torch

    if preference == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda was asked for, but torch sees no CUDA GPU (is this the CPU build?)")
        return "cuda"
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if preference != "cpu":
        raise TrainingError(f"unknown device {preference!r}; use cpu, cuda or auto")
    return "cpu"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and make torch pick deterministic kernels."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # cuBLAS needs this workspace setting for deterministic matrix products on CUDA >= 10.2.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _rng_states(generator: torch.Generator) -> dict[str, Any]:
    import torch

    numpy_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    states: dict[str, Any] = {
        "python": random.getstate(),
        # torch.load(weights_only=True) accepts tensors and plain containers, not numpy arrays.
        "numpy": (numpy_state[0], torch.from_numpy(np.asarray(numpy_state[1]).astype(np.int64)),
                  int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])),
        "torch": torch.get_rng_state(),
        "loader": generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any], generator: torch.Generator) -> None:
    import torch

    python_state = states["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    generator.set_state(states["loader"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _to_device(value: Any, device: str) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    return value.to(device, non_blocking=True)


def _forward(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    output: torch.Tensor = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    return output


def _save_torch(obj: Any, path: Path) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


def progress_bar(
    items: Iterable[T], description: str, *, enabled: bool = True, status: Callable[[], str] | None = None,
) -> Iterator[T]:
    """Yield ``items`` while a rich progress bar (count, rate, elapsed, ETA, ``status()``) shows on stderr."""
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    total = len(items) if isinstance(items, Sized) else None
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=Console(stderr=True),
                  transient=True) as bar:
        task = bar.add_task(description, total=total, status="")
        for item in items:
            yield item
            bar.update(task, advance=1, status=status() if status else "")


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if mode == "max" else value < best


def predict(
    model: torch.nn.Module, data: Dataset[Any], *, batch_size: int = 256, device: str = "cpu",
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Run a model over a dataset; return all outputs and all targets as numpy arrays."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    outputs, targets = [], []
    model.eval()
    with torch.no_grad():
        for inputs, target in loader:
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp and device == "cuda"):
                output = _forward(model, _to_device(inputs, device))
            outputs.append(output.float().cpu().numpy())
            targets.append(target.numpy())
    if not outputs:
        return np.zeros((0,)), np.zeros((0,))
    return np.concatenate(outputs), np.concatenate(targets)


def fit(
    model: torch.nn.Module,
    train_data: Dataset[Any],
    val_data: Dataset[Any] | None,
    loss_fn: LossFn,
    config: TrainConfig,
    out_dir: Path,
    *,
    metrics_fn: MetricsFn,
    progress: bool = True,
    on_epoch_end: EpochCallback | None = None,
) -> RunResult:
    """Train ``model`` in place, checkpointing to ``out_dir``; return the best epoch's figures.

    On return the model holds the best epoch's weights. Without ``val_data`` the best
    epoch is picked on the training loss.
    """
    import torch
    from torch.utils.data import DataLoader
    if len(train_data) == 0:  # type: ignore[arg-type]
        raise TrainingError("the training set is empty")
    device = resolve_device(config.device)
    use_amp = config.amp and device == "cuda"
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.scheduler == "cosine":
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(config.epochs, 1), eta_min=config.lr * 0.01)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loader = DataLoader(
        train_data, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers,
        generator=generator, drop_last=False, pin_memory=device == "cuda",
        persistent_workers=False,
    )
    selection_key = config.selection_metric if val_data is not None else "train_loss"
    selection_mode = config.selection_mode if val_data is not None else "min"
    history: list[dict[str, float]] = []
    best_score: float | None = None
    best_epoch = 0
    start_epoch = 0
    checkpoint_path = out_dir / CHECKPOINT
    if config.resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _restore_rng_states(state["rng"], generator)
        history = [dict(line) for line in state["history"]]
        best_score, best_epoch, start_epoch = state["best_score"], int(state["best_epoch"]), int(state["epoch"])
        logger.info("resuming %s after epoch %d of %d", out_dir, start_epoch, config.epochs)
    elif not config.resume:
        # Starting over: drop the old log so that metrics.jsonl describes this run only.
        (out_dir / METRICS_LOG).unlink(missing_ok=True)

    # Running sums of the epoch's loss, read by the progress bar's status line.
    running = {"loss": 0.0, "seen": 0.0}

    def loss_status() -> str:
        return f"loss {running['loss'] / max(running['seen'], 1):.4f}"

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        model.train()
        running["loss"], running["seen"] = 0.0, 0.0
        for inputs, target in progress_bar(loader, f"epoch {epoch + 1}/{config.epochs}", enabled=progress,
                                           status=loss_status):
            inputs, target = _to_device(inputs, device), target.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                output = _forward(model, inputs)
                loss = loss_fn(output.float(), target)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {loss.item()} in epoch {epoch + 1}; lower --lr")
            scaled: torch.Tensor = scaler.scale(loss)
            scaled.backward()  # type: ignore[no-untyped-call]
            if config.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            batch = int(target.shape[0])
            running["loss"] += float(loss.detach()) * batch
            running["seen"] += batch
        line: dict[str, float] = {"epoch": float(epoch + 1), "train_loss": running["loss"] / max(running["seen"], 1),
                                  "lr": float(optimizer.param_groups[0]["lr"])}
        scheduler.step()
        if val_data is not None:
            # Validation must not consume the training RNG streams, or resuming would diverge.
            rng = _rng_states(generator)
            outputs, targets = predict(model, val_data, batch_size=config.batch_size * 2, device=device, amp=use_amp)
            with torch.no_grad():
                val_loss = float(loss_fn(torch.from_numpy(outputs), torch.from_numpy(targets))) if len(outputs) else 0.0
            line["val_loss"] = val_loss
            line.update({f"val_{k}": float(v) for k, v in metrics_fn(outputs, targets).items()})
            _restore_rng_states(rng, generator)
        line["seconds"] = time.perf_counter() - started
        history.append(line)
        key = selection_key if selection_key in line else f"val_{selection_key}"
        if key not in line:
            raise TrainingError(f"selection metric {config.selection_metric!r} is not among {sorted(line)}")
        if _is_better(line[key], best_score, selection_mode):
            best_score, best_epoch = line[key], epoch + 1
            _save_torch({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir / BEST)
        with (out_dir / METRICS_LOG).open("a") as log:
            log.write(json.dumps(line, sort_keys=True) + "\n")
        logger.info("epoch %d/%d %s", epoch + 1, config.epochs,
                    " ".join(f"{k}={v:.4g}" for k, v in line.items() if k != "epoch"))
        if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs:
            _save_torch({
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_states(generator),
                "history": history,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "epoch": epoch + 1,
            }, checkpoint_path)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, line)

    if not (out_dir / BEST).is_file():
        raise TrainingError(f"{out_dir} has no best.pt: no epoch produced a finite {selection_key}")
    model.load_state_dict(torch.load(out_dir / BEST, map_location=device, weights_only=True))
    model.to("cpu")
    best_line = history[best_epoch - 1] if 0 < best_epoch <= len(history) else {}
    return RunResult(out_dir=out_dir, device=device, epochs_run=config.epochs - start_epoch,
                     best_epoch=best_epoch, best_metrics=best_line, history=history, resumed_from=start_epoch)
