"""Export a training run to ONNX, check it against PyTorch, and register it in the model cache.

``export_run(run_dir, name)``:

1. rebuilds the run's model from ``run.json`` and loads ``best.pt``;
2. appends the softmax (the workers read probabilities) and exports with the
   TorchScript-based ``torch.onnx.export`` at opset 17 with a symbolic batch axis ``N``
   (and a symbolic time axis ``T`` for sequence models);
3. writes the metadata the workers read into the ONNX file: ``classlens.labels``,
   ``classlens.levels`` / ``classlens.heads`` (engagement), ``classlens.input_spec``,
   ``classlens.preprocessing`` (in words), ``classlens.metrics``,
   ``classlens.data_fingerprint``, ``classlens.run_id``, ``classlens.task``, ``classlens.trained``;
4. with ``fp16``, stores every float32 weight as float16 followed by a ``Cast`` back to
   float32: half the file size, the same float32 arithmetic in every onnxruntime build
   (a full float16 graph needs a GPU to pay off and loses accuracy on CPUs);
5. checks parity: onnxruntime and PyTorch on *real* inputs — samples of the run's own
   data for image models; for feature / sequence models the run folder's
   ``parity_inputs.npy`` (feature numbers saved by the training code) or inputs passed
   by the caller — within ``1e-4`` (``2e-2`` with fp16) absolute difference in probabilities;
6. writes ``<model_cache_dir>/<name>/model.onnx`` and ``model.json`` atomically and adds
   the model to the cache's local manifest, so ``CLASSLENS_EMOTION_MODEL=<name>`` (or
   ``classlens models use emotion <name>``) makes the workers load it.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from training.run import InputSpec, RunInfo, TrainingError, load_trained_model, write_atomic

ONNX_OPSET = 17
"""Operator set of exported models; loads in every onnxruntime the project supports."""
PARITY_TOLERANCE = 1e-4
"""Largest absolute difference in output probabilities allowed between ONNX and PyTorch."""
PARITY_TOLERANCE_FP16 = 2e-2
"""The same with float16 weights."""
PARITY_SAMPLES = 32
"""Real samples used for the parity check."""
INPUT_NAME = "input"
"""Name of the exported model's input."""
OUTPUT_NAME = "probabilities"
"""Name of the exported model's output."""

PREPROCESSING = {
    "image": "runtime aligned 112x112 crop (vision.geometry.align_face) -> centred crop_fraction -> colour conversion "
             "-> area resize to size x size -> values in value_range; normalisation is inside the model",
    "features": "per-face feature vector in the order of input_spec.features",
    "sequence": "per-frame feature vectors of one clip, [N, T, F]",
}
"""What the runtime must do to build a model's input, by input kind (``classlens.preprocessing``)."""


@dataclass(frozen=True)
class ExportResult:
    """What an export produced."""

    name: str
    """Model name in the cache and the local manifest."""
    path: Path
    """The ONNX file."""
    sha256: str
    """Its hash."""
    parity_max_abs_diff: float
    """Largest difference between ONNX and PyTorch probabilities on the parity inputs."""
    parity_samples: int
    """How many real inputs the parity check used."""
    fp16: bool
    """Whether weights are stored as float16."""
    size_bytes: int
    """File size."""


def _wrap_with_softmax(model: Any, activation: str) -> Any:
    import torch

    class WithProbabilities(torch.nn.Module):
        """The trained network followed by the softmax the workers expect."""

        def __init__(self, network: torch.nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            output: torch.Tensor = self.network(inputs)
            return torch.softmax(output, dim=-1) if activation == "softmax" else output

    wrapped = WithProbabilities(model)
    wrapped.eval()
    return wrapped


def _example_input(spec: InputSpec) -> tuple[Any, dict[int, str]]:
    import torch

    if spec.kind == "image":
        return torch.zeros(1, spec.channels, spec.size, spec.size), {0: "N"}
    if spec.kind == "features":
        return torch.zeros(1, len(spec.features)), {0: "N"}
    return torch.zeros(1, 8, len(spec.features)), {0: "N", 1: "T"}


def default_parity_inputs(info: RunInfo, run_dir: Path, *, count: int = PARITY_SAMPLES) -> npt.NDArray[np.float32]:
    """Real model inputs for the parity check: samples of the run's own data."""
    spec = info.input_spec
    saved = run_dir / "parity_inputs.npy"
    if saved.is_file():
        return np.asarray(np.load(saved), np.float32)[:count]
    data_path = info.config.get("data")
    if spec.kind != "image" or info.task != "emotion" or not data_path:
        raise TrainingError(
            f"{run_dir}: no parity_inputs.npy and no emotion data recorded; pass real inputs for the parity check")
    from training.face_sets import load_emotion_data

    # Runs record one data path, or several (FER+ with CK+): the first one gives the samples.
    first_path = data_path[0] if isinstance(data_path, list) else data_path
    data = load_emotion_data(Path(first_path), spec.size, faces=info.config.get("faces", "detect"),
                             cache_dir=run_dir / "cache")
    step = max(1, len(data) // count)
    return data.inputs[::step][:count]


def weights_to_fp16(model: Any) -> None:
    """Store every float32 initializer as float16 with a Cast back to float32 in front of its users."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    casts = []
    kept = []
    for initializer in graph.initializer:
        if initializer.data_type != TensorProto.FLOAT:
            kept.append(initializer)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(initializer).astype(np.float16),
                                       f"{initializer.name}__fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [initializer.name], to=TensorProto.FLOAT,
                                      name=f"{initializer.name}__cast"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)


@dataclass(frozen=True)
class _CheckedExport:
    """An exported ONNX model that passed the parity check, with what made it."""

    data: bytes
    wrapped: Any
    info: RunInfo
    difference: float
    samples: int


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise TrainingError(f"{name!r} is not a valid model name (no slashes, not hidden)")


def _export_checked(run_dir: Path, *, fp16: bool, parity_inputs: npt.NDArray[np.float32] | None) -> _CheckedExport:
    """The run's best model as ONNX bytes with metadata, checked against PyTorch on real inputs."""
    import onnx
    import onnxruntime
    import torch
    from onnx import helper

    model, info = load_trained_model(run_dir)
    activation = str(info.config.get("output_activation", "softmax"))
    wrapped = _wrap_with_softmax(model, activation)
    from training.emotion_models import FaceApiEmotionNet

    if isinstance(model, FaceApiEmotionNet) and activation == "softmax":
        # The traced export of TensorFlow's asymmetric padding leaves shape arithmetic in the
        # graph (about 1.6 times slower on a CPU); face-api's own graph builder writes the same
        # network with the padding in each Conv. The parity check below holds it to PyTorch.
        from model_export.face_api import build_face_api_expression_onnx
        from training.face_api_net import face_api_layout_weights

        exported = build_face_api_expression_onnx(face_api_layout_weights(model.network),
                                                  grey=info.input_spec.channels == 1, labels=info.labels)
    else:
        example, axes = _example_input(info.input_spec)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript.
            warnings.simplefilter("ignore", DeprecationWarning)
            destination: Any = buffer  # the exporter writes to file objects too; its annotation says paths only
            torch.onnx.export(wrapped, (example,), destination, dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "N"}},
                              opset_version=ONNX_OPSET, do_constant_folding=True)
        exported = onnx.load_from_string(buffer.getvalue())
    properties = {
        "classlens.task": info.task,
        "classlens.trained": "true",
        "classlens.model_family": info.model_family,
        "classlens.labels": json.dumps(info.labels),
        "classlens.input_spec": info.input_spec.to_json(),
        "classlens.preprocessing": PREPROCESSING[info.input_spec.kind],
        "classlens.metrics": json.dumps(info.metrics, sort_keys=True, default=str),
        "classlens.data_fingerprint": info.data_fingerprint,
        "classlens.data": info.data_description,
        "classlens.run_id": info.run_id,
        "classlens.fp16_weights": "true" if fp16 else "false",
    }
    if info.task == "engagement":
        properties["classlens.levels"] = json.dumps(info.labels)
    if info.heads:
        properties["classlens.heads"] = json.dumps(info.heads)
    helper.set_model_props(exported, properties)
    if fp16:
        weights_to_fp16(exported)
    onnx.checker.check_model(exported)
    data = exported.SerializeToString()

    inputs = parity_inputs if parity_inputs is not None else default_parity_inputs(info, run_dir)
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    if inputs.shape[0] == 0:
        raise TrainingError("the parity check needs at least one real input")
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    onnx_out = np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0], np.float32)
    with torch.no_grad():
        torch_out = wrapped(torch.from_numpy(inputs)).numpy()
    difference = float(np.abs(onnx_out - torch_out).max())
    tolerance = PARITY_TOLERANCE_FP16 if fp16 else PARITY_TOLERANCE
    if not difference <= tolerance:
        raise TrainingError(f"ONNX and PyTorch disagree by {difference:.2e} (> {tolerance:g}); not exported")
    return _CheckedExport(data=data, wrapped=wrapped, info=info, difference=difference, samples=int(inputs.shape[0]))


def export_run(
    run_dir: Path,
    name: str,
    *,
    cache_dir: Path,
    fp16: bool = False,
    parity_inputs: npt.NDArray[np.float32] | None = None,
) -> ExportResult:
    """Export a run's best model into the model cache under ``name``; see the module docstring."""
    import hashlib

    from model_export.manifest import MANIFEST, ModelSource, ModelSpec, register_local_model

    if name in MANIFEST:
        raise TrainingError(f"{name} is a packaged model's name; choose another --name")
    _check_name(name)
    checked = _export_checked(run_dir, fp16=fp16, parity_inputs=parity_inputs)
    data, info, difference = checked.data, checked.info, checked.difference
    digest = hashlib.sha256(data).hexdigest()
    target = cache_dir.expanduser() / name
    write_atomic(target / "model.onnx", data)
    meta = {
        "name": name, "role": info.task, "sha256": digest, "conversion": "trained",
        "run": str(run_dir.resolve()), "run_id": info.run_id, "fp16_weights": str(fp16).lower(),
        "parity_max_abs_diff": f"{difference:.3e}",
        "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_atomic(target / "model.json", (json.dumps(meta, indent=2) + "\n").encode())
    headline = {k: v for k, v in info.metrics.items() if isinstance(v, (int, float))}
    register_local_model(cache_dir, ModelSpec(
        name=name, role=info.task,
        source=ModelSource(kind="trained", sha256=digest), conversion="none",
        licence="as the training data's licence allows",
        description=(f"{info.model_family} trained by ClassLens (run {info.run_id}) on {info.data_description}; "
                     f"metrics {json.dumps(headline, sort_keys=True)}"),
        labels=tuple(info.labels), input_spec=info.input_spec.to_json(),
        extra={"run_id": info.run_id, "data_fingerprint": info.data_fingerprint},
    ))
    return ExportResult(name=name, path=target / "model.onnx", sha256=digest, parity_max_abs_diff=difference,
                        parity_samples=checked.samples, fp16=fp16, size_bytes=len(data))


def _fingerprint_recipe(info: RunInfo) -> dict[str, Any]:
    """What a card needs to recompute the run's data fingerprint from the data folders."""
    if info.task == "emotion":
        from training.emotion_data import DEFAULT_FER2013_WEIGHT

        folders = info.config.get("data", [])
        return {"kind": "emotion", "folders": [Path(str(folder)).name for folder in folders],
                "fer2013_weight": info.config.get("fer2013_weight", DEFAULT_FER2013_WEIGHT)}
    return {"kind": "engagement", "folders": [Path(str(folder)).name for folder in info.config.get("images", [])]}


PROBE_SAMPLES = 4
"""Inputs in a model card's parity probe."""

CARD_TEMPLATE_FIELDS = ("summary", "data", "command", "licence", "notes")
"""What a card template (written by a person, kept in ``training/cards/``) must give."""


def ship_run(
    run_dir: Path,
    name: str,
    folder: Path,
    *,
    template: Path,
    evaluations: dict[str, Path],
    fp16: bool = False,
    parity_inputs: npt.NDArray[np.float32] | None = None,
) -> Path:
    """Write a run's model into ``folder`` as ``<name>.onnx`` with its model card; return the card's path.

    The card (:class:`model_export.model_cards.ModelCard`) takes the words of ``template``
    (summary, data and their terms, the reproducing command, licence, notes), the metrics
    of each ``evaluation.json`` in ``evaluations`` (name → file, as ``classlens evaluate``
    writes it), and adds what only the run knows: the data fingerprint, the architecture,
    the training time, the file's sha256 and a parity probe of the training run's outputs.
    """
    import hashlib

    import torch

    from model_export.model_cards import CARD_SUFFIX, ModelCard, ParityProbe

    _check_name(name)
    try:
        words = json.loads(template.read_text())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot read the card template {template}: {exc}") from None
    missing = [key for key in CARD_TEMPLATE_FIELDS if key not in words]
    if missing:
        raise TrainingError(f"{template}: the card template lacks {', '.join(missing)}")
    metrics: dict[str, dict[str, Any]] = {}
    for evaluation_name, path in evaluations.items():
        try:
            metrics[evaluation_name] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TrainingError(f"cannot read the evaluation {path}: {exc}") from None
    checked = _export_checked(run_dir, fp16=fp16, parity_inputs=parity_inputs)
    info = checked.info
    spec = info.input_spec
    shape = ([PROBE_SAMPLES, spec.channels, spec.size, spec.size] if spec.kind == "image"
             else [PROBE_SAMPLES, len(spec.features)])
    probe = ParityProbe(seed=20261203, shape=shape, low=0.0, high=255.0 if spec.kind == "image" else 1.0, outputs=[])
    with torch.no_grad():
        expected = checked.wrapped(torch.from_numpy(probe.inputs())).numpy()
    probe.outputs = [[round(float(value), 7) for value in row] for row in expected]
    parameters = sum(int(p.numel()) for p in checked.wrapped.parameters())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    card = ModelCard(
        name=name, role=info.task, summary=str(words["summary"]),
        architecture=f"{info.model_family} {json.dumps(info.model_kwargs, sort_keys=True)}, "
                     f"{parameters:,} parameters",
        labels=list(info.labels), input_spec=spec.to_json(),
        sha256=hashlib.sha256(checked.data).hexdigest(),
        data=list(words["data"]), data_fingerprint=info.data_fingerprint, command=str(words["command"]),
        metrics={"training run (validation, best epoch)": dict(info.metrics), **metrics},
        licence=str(words["licence"]), parity=probe, fingerprint_recipe=_fingerprint_recipe(info),
        training_seconds=round(sum(float(row.get("seconds", 0.0)) for row in history), 1),
        notes=list(words["notes"]),
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{name}.onnx", checked.data)
    card_path = folder / f"{name}{CARD_SUFFIX}"
    write_atomic(card_path, card.to_json().encode())
    return card_path
