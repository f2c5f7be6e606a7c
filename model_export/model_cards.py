"""Models that ClassLens trained itself and ships inside the package, each with a model card.

A shipped model is two files in ``model_export/packaged/``: ``<name>.onnx`` and
``<name>.card.json``. The card says what a user must know before trusting the numbers the
model makes:

* the data it was trained, selected and measured on, and those data's terms;
* the measured metrics, each naming the split it comes from;
* the exact command that reproduces it, and the fingerprint of its training data;
* the ONNX file's sha256, and a parity probe: a few fixed inputs (made from a seed, so
  the card stays small) and the outputs the training run's PyTorch model gave for them.

:func:`load_packaged_model` refuses a model whose file, card or manifest disagree, and
says which; :func:`check_parity` runs the probe under onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import numpy as np
import numpy.typing as npt

from kernel.errors import ModelSupplyError
from model_export.archives import sha256_of_bytes

PACKAGED_DIR = "packaged"
"""Folder inside :mod:`model_export` that holds the shipped ONNX files and their cards."""

CARD_SUFFIX = ".card.json"
"""File-name ending of a model card, next to ``<name>.onnx``."""

PARITY_TOLERANCE = 1e-4
"""Largest difference in output probability the parity probe accepts (float32 arithmetic)."""


@dataclass
class ParityProbe:
    """Fixed inputs made from a seed, and the training run's outputs for them."""

    seed: int
    """Seed of ``numpy.random.default_rng`` that makes the inputs."""
    shape: list[int]
    """Input shape ``[N, C, H, W]`` (or ``[N, F]``) of the probe batch."""
    low: float
    """Smallest input value (uniform draw)."""
    high: float
    """Largest input value (uniform draw)."""
    outputs: list[list[float]]
    """What the training run's PyTorch model returned for the probe batch (probabilities)."""

    def inputs(self) -> npt.NDArray[np.float32]:
        """The probe batch, made again from the seed."""
        rng = np.random.default_rng(self.seed)
        return rng.uniform(self.low, self.high, size=self.shape).astype(np.float32)


@dataclass
class ModelCard:
    """What a shipped model is, what it was trained and measured on, and how to make it again."""

    name: str
    """The model's name in the manifest."""
    role: str
    """emotion or engagement."""
    summary: str
    """One paragraph a teacher can read: what the model is and how well it measured."""
    architecture: str
    """Network family and size."""
    labels: list[str]
    """Output classes in output order."""
    input_spec: str
    """The model's input, in words."""
    sha256: str
    """sha256 of the ONNX file."""
    data: list[dict[str, str]]
    """Each data set used: ``name``, ``use`` (training, selection, test), ``terms``."""
    data_fingerprint: str
    """Fingerprint of the training data as the training run recorded it."""
    command: str
    """The exact commands that reproduce the model from ``../shared/data``."""
    metrics: dict[str, dict[str, Any]]
    """Measured figures by evaluation name; each says its split in ``split``."""
    licence: str
    """Terms the weights inherit from their training data."""
    parity: ParityProbe
    """Fixed inputs and the training run's outputs for them."""
    fingerprint_recipe: dict[str, Any] = field(default_factory=dict)
    """How to recompute :attr:`data_fingerprint` from the data folders: ``kind`` (emotion or
    engagement), ``folders`` (names under the data root) and, for emotion, ``fer2013_weight``."""
    training_seconds: float = 0.0
    """Seconds spent in the training epochs, as the run measured them (data loading and the
    frozen blocks' features not included; docs/models.md gives the whole command's wall time)."""
    notes: list[str] = field(default_factory=list)
    """Caveats: what the model is not good at, and why."""

    def to_json(self) -> str:
        """The card as indented JSON."""
        return json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str) -> ModelCard:
        """Parse a card; a malformed one raises :class:`ModelSupplyError` naming ``source``."""
        try:
            raw = json.loads(text)
            raw["parity"] = ParityProbe(**raw["parity"])
            return cls(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelSupplyError(f"{source}: not a valid model card ({exc})") from None


def packaged_folder() -> Traversable:
    """The folder inside the installed package that holds the shipped models."""
    return resources.files("model_export").joinpath(PACKAGED_DIR)


def packaged_names(folder: Traversable | None = None) -> list[str]:
    """Names of the models shipped in the package (or in ``folder``)."""
    folder = folder or packaged_folder()
    if not folder.is_dir():
        return []
    return sorted(entry.name[: -len(CARD_SUFFIX)] for entry in folder.iterdir() if entry.name.endswith(CARD_SUFFIX))


def read_card(name: str, folder: Traversable | None = None) -> ModelCard:
    """The card of a shipped model."""
    card_file = (folder or packaged_folder()).joinpath(f"{name}{CARD_SUFFIX}")
    if not card_file.is_file():
        raise ModelSupplyError(f"{name}: the package ships no model card {name}{CARD_SUFFIX}; reinstall ClassLens")
    return ModelCard.from_json(card_file.read_text(encoding="utf-8"), source=f"{name}{CARD_SUFFIX}")


def load_packaged_model(name: str, expected_sha256: str, folder: Traversable | None = None) -> bytes:
    """The ONNX bytes of a shipped model, after checking them against its card and the manifest.

    Refuses, with the reason, a file that is missing, a card that is missing or malformed,
    a file whose hash is not the card's, or a card whose hash is not the manifest's.
    """
    folder = folder or packaged_folder()
    card = read_card(name, folder)
    model_file = folder.joinpath(f"{name}.onnx")
    if not model_file.is_file():
        raise ModelSupplyError(f"{name}: the package ships no {name}.onnx; reinstall ClassLens")
    data = model_file.read_bytes()
    actual = sha256_of_bytes(data)
    if actual != card.sha256:
        raise ModelSupplyError(f"{name}: {name}.onnx has sha256 {actual}, but its model card says {card.sha256}; "
                               "the file or the card was changed after export")
    if card.sha256 != expected_sha256:
        raise ModelSupplyError(f"{name}: the model card's sha256 {card.sha256} is not the manifest's "
                               f"{expected_sha256}; the card and the manifest disagree")
    recorded = model_fingerprint(data)
    if recorded != card.data_fingerprint:
        raise ModelSupplyError(f"{name}: the model was trained on data with fingerprint {recorded or 'none'}, "
                               f"its card says {card.data_fingerprint}")
    return data


def model_fingerprint(model_bytes: bytes) -> str:
    """The training-data fingerprint an exported model carries in its metadata (empty when none)."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    return next((prop.value for prop in model.metadata_props if prop.key == "classlens.data_fingerprint"), "")


def check_parity(card: ModelCard, model_bytes: bytes) -> float:
    """Run the card's probe under onnxruntime; return the largest difference, raise above tolerance."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    inputs = card.parity.inputs()
    outputs = np.asarray(session.run(None, {session.get_inputs()[0].name: inputs})[0], np.float64)
    expected = np.asarray(card.parity.outputs, np.float64)
    if outputs.shape != expected.shape:
        raise ModelSupplyError(f"{card.name}: the probe gives outputs of shape {outputs.shape}, "
                               f"the card recorded {expected.shape}")
    difference = float(np.abs(outputs - expected).max())
    if difference > PARITY_TOLERANCE:
        raise ModelSupplyError(f"{card.name}: outputs differ from the training run's by {difference:.2e} "
                               f"(tolerance {PARITY_TOLERANCE:g})")
    return difference
