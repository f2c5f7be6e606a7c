"""A training run's folder: its layout, ``run.json``, and rebuilding its model.

Layout of ``<out>/``::

    run.json         what was trained: task, model family and factory, labels, input spec,
                     data fingerprint, seed, configuration, final metrics
    checkpoint.pt    the latest state (model, optimiser, scheduler, RNG states, epoch);
                     a new ``fit`` on the same folder resumes from it
    best.pt          the model weights of the best validation epoch
    metrics.jsonl    one JSON line per epoch
    report.html      the run report (training curves, confusion matrices)
    cache/           derived numbers only (face keypoints, features), never pixels

The model is rebuilt from ``run.json``'s ``model_factory`` (``module:function``) called
with ``model_kwargs``, so export and evaluation work for every model family, including
those defined outside this package.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kernel.errors import ClassLensError

if TYPE_CHECKING:
    import torch

Task = Literal["emotion", "engagement"]

RUN_JSON = "run.json"
"""File name of a run's description."""
CHECKPOINT = "checkpoint.pt"
"""File name of a run's latest resumable state."""
BEST = "best.pt"
"""File name of the best epoch's weights."""
METRICS_LOG = "metrics.jsonl"
"""File name of the per-epoch metrics log."""
REPORT = "report.html"
"""File name of a run's HTML report."""
CACHE_DIR = "cache"
"""Sub-folder for derived numbers (keypoints, features); never pixels."""


class TrainingError(ClassLensError):
    """A training run, a data set or an export cannot go on; the message says why."""

    exit_code = 2


@dataclass
class InputSpec:
    """What a model's input tensor is, so that a runtime can build it from an aligned crop.

    Workers read this from the exported ONNX metadata (``classlens.input_spec``).
    """

    kind: Literal["image", "features", "sequence"] = "image"
    """An image crop, a feature vector, or a sequence of per-frame features."""
    channels: int = 1
    """1 for grey, 3 for colour (image inputs)."""
    size: int = 64
    """Square side in pixels (image inputs)."""
    colour: Literal["grey", "rgb", "bgr"] = "grey"
    """Channel order of image inputs."""
    value_range: Literal["0-255", "0-1"] = "0-255"
    """Pixel values as fed to the ONNX model; normalisation beyond this is folded into the model."""
    crop_fraction: float = 0.9
    """Centred share of the runtime's aligned crop the model sees (the runtime default is 0.9)."""
    features: list[str] = field(default_factory=list)
    """Column names of feature inputs, in order."""

    def to_json(self) -> str:
        """Compact JSON for ONNX metadata."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        """Rebuild from :meth:`to_json`'s content, ignoring unknown keys from newer versions."""
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


@dataclass
class RunInfo:
    """Content of ``run.json``."""

    task: Task
    """emotion or engagement."""
    model_family: str
    """Short family name (mini-xception, resnet, frame, temporal, ...)."""
    model_factory: str
    """``module:function`` that builds the ``torch.nn.Module``."""
    model_kwargs: dict[str, Any]
    """Keyword arguments of the factory."""
    labels: list[str]
    """Output classes in order (emotions, or the four levels)."""
    input_spec: InputSpec
    """The model's input."""
    data_fingerprint: str
    """sha256 over the training data's file list / rows and labels."""
    seed: int
    """Seed of the run."""
    config: dict[str, Any] = field(default_factory=dict)
    """The :class:`training.loop.TrainConfig` used, and data options."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Final figures (best epoch's validation metrics, test metrics when evaluated)."""
    heads: list[str] = field(default_factory=list)
    """Names of output heads for multi-head models (boredom, engagement, ...); empty for one head."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    """Short unique id, carried into exported models."""
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    """When the run started."""
    data_description: str = ""
    """One line: what the model was trained on."""

    def save(self, out_dir: Path) -> Path:
        """Write ``run.json`` atomically."""
        data = asdict(self)
        return write_atomic(out_dir / RUN_JSON, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    @classmethod
    def load(cls, out_dir: Path) -> RunInfo:
        """Read ``run.json`` of a run folder."""
        path = out_dir / RUN_JSON
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TrainingError(f"{out_dir} is not a training run (no {RUN_JSON})") from None
        except ValueError as exc:
            raise TrainingError(f"{path} is not valid JSON ({exc})") from None
        data["input_spec"] = InputSpec.from_dict(data.get("input_spec", {}))
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


def write_atomic(path: Path, data: bytes) -> Path:
    """Write bytes to a temporary file beside ``path`` and rename it, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates 0600 files; reports and exported models are read by other users (workers).
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def data_fingerprint(items: Iterable[tuple[str, object]]) -> str:
    """sha256 over (identifier, label) pairs: file paths or row hashes with their labels, in order."""
    digest = hashlib.sha256()
    for identifier, label in items:
        digest.update(f"{identifier}\t{label}\n".encode())
    return digest.hexdigest()


def import_factory(dotted: str) -> Any:
    """Import ``module:function``."""
    module_name, _, attribute = dotted.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise TrainingError(f"cannot import the model factory {dotted!r} ({exc})") from None


def build_model(info: RunInfo) -> torch.nn.Module:
    """A fresh model of the run's family, built by its factory."""
    model: torch.nn.Module = import_factory(info.model_factory)(**info.model_kwargs)
    return model


def load_trained_model(out_dir: Path, *, which: Literal["best", "last"] = "best") -> tuple[torch.nn.Module, RunInfo]:
    """The run's model with its best (or last checkpointed) weights, in eval mode on CPU."""
    import torch

    info = RunInfo.load(out_dir)
    model = build_model(info)
    path = out_dir / (BEST if which == "best" else CHECKPOINT)
    if not path.is_file():
        raise TrainingError(f"{out_dir} has no {path.name}; train it first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state))
    model.eval()
    return model, info
