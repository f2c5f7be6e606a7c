"""Commands for training, exporting, evaluating and selecting models.

``classlens train emotion``, ``classlens export``, ``classlens evaluate`` and
``classlens models use``; registered in :mod:`classlens.cli`. torch and the training
modules are imported inside the commands, so ``classlens --help`` stays fast.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.console import Console

if TYPE_CHECKING:
    from training.loop import TrainConfig

console = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)

train_app = typer.Typer(help="Train emotion and engagement models.", no_args_is_help=True)
# `classlens train engagement` (DAiSEE) is in this group too: train_engagement_command below.

Device = Literal["cpu", "cuda", "auto"]


@train_app.command("emotion")
def train_emotion_command(
    data: Annotated[list[Path], typer.Option(
        "--data", help="FER2013 CSV, FER+ or CK+ folder, a folder with labels.csv, or a folder per class; "
                       "repeat to combine sets (e.g. FER+ and CK+).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder (checkpoints, run.json, report.html).")],
    model: Annotated[str, typer.Option("--model", help="mini-xception, resnet or face-api (fine-tuned from "
                                                        "face-api's expression network; --input-size 112).")]
    = "mini-xception",
    epochs: Annotated[int, typer.Option(min=1, help="Epochs in total (a resumed run goes on up to this).")] = 60,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option()] = 1e-4,
    seed: Annotated[int, typer.Option(help="Same seed, same machine: same result.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda (mixed precision) or auto.")] = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA.")] = True,
    input_size: Annotated[int, typer.Option(min=32, max=128, help="Square grey input side (48 or 64).")] = 64,
    faces: Annotated[str, typer.Option(help="detect: find and align faces as the runtime does; "
                                                "as-is: images already are face crops.")] = "detect",
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.15,
    test_fraction: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.15,
    num_workers: Annotated[int, typer.Option(min=0, help="Data loader processes.")] = 0,
    width: Annotated[int, typer.Option(min=4, help="Base width of --model resnet.")] = 32,
    blocks: Annotated[int, typer.Option(min=1, help="Residual blocks per stage of --model resnet.")] = 2,
    frozen_blocks: Annotated[int, typer.Option(
        min=0, max=4, help="Dense blocks of --model face-api kept at face-api's weights.")] = 3,
    class_weighting: Annotated[str, typer.Option(
        help="Loss weight per class: inverse (frequency), sqrt (its square root) or none.")] = "inverse",
    fer2013_weight: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Weight of FER2013's own label in FER+ soft targets.")] = 0.25,
    restart: Annotated[bool, typer.Option("--restart", help="Start over instead of resuming checkpoint.pt.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train an emotion model (the product's seven classes); resumes an interrupted run in --out."""
    from classlens.cli_common import user_errors
    from kernel.errors import BadInputError
    from kernel.settings import load_settings

    with user_errors():
        if device not in ("cpu", "cuda", "auto") or faces not in ("detect", "as-is"):
            raise BadInputError("--device is cpu, cuda or auto; --faces is detect or as-is")
        from training.emotion_train import CLASS_WEIGHTINGS, train_emotion

        if class_weighting not in CLASS_WEIGHTINGS:
            raise BadInputError(f"--class-weighting is one of {', '.join(CLASS_WEIGHTINGS)}")
        from training.loop import TrainConfig

        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                             device=device, amp=amp, num_workers=num_workers,  # type: ignore[arg-type]
                             resume=not restart)
        run = train_emotion(data, out_dir, family=model, config=config, input_size=input_size,
                            faces=faces, val_fraction=val_fraction,  # type: ignore[arg-type]
                            test_fraction=test_fraction, settings=load_settings(), progress=not quiet,
                            model_options=({"width": width, "blocks": blocks} if model == "resnet" else
                                           {"frozen_blocks": frozen_blocks} if model == "face-api" else None),
                            class_weighting=class_weighting,  # type: ignore[arg-type]
                            fer2013_weight=fer2013_weight)
        best = run.result.best_metrics
        out.print(f"run {run.info.run_id} in {out_dir}: best epoch {run.result.best_epoch}, "
                  + ", ".join(f"{k}={v:.3f}" for k, v in best.items() if k.startswith("val_") and k != "val_count"))
        if run.test is not None:
            out.print(f"test: accuracy {run.test.accuracy:.3f}, macro-F1 {run.test.macro_f1:.3f}, "
                      f"UAR {run.test.uar:.3f} ({run.test.count} faces)")
        out.print(f"report: {out_dir / 'report.html'}")


@train_app.command("engagement")
def train_engagement_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder (checkpoints, run.json, report.html).")],
    daisee: Annotated[Path | None, typer.Option("--daisee", help="DAiSEE folder (DataSet/ and Labels/ inside).")]
    = None,
    images: Annotated[list[Path] | None, typer.Option(
        "--images", help="Folder of labelled face images (labels.csv: path, engagement 0-3, optional split), "
                         "e.g. ../shared/data/daisee_frames; needs --init with a face-api emotion model.")] = None,
    frozen_blocks: Annotated[int, typer.Option(min=0, max=4, help="--images: dense blocks kept frozen.")] = 3,
    selection_fraction: Annotated[float, typer.Option(
        min=0.05, max=0.5, help="--images: share of Train that selects the best epoch.")] = 0.15,
    selection_by: Annotated[str, typer.Option(
        help="--images: the selection slice is random Train frames (frames) or whole pseudo-subjects grouped "
             "by the recogniser (faces).")] = "frames",
    class_weighting: Annotated[str, typer.Option(help="--images: inverse, sqrt or none.")] = "inverse",
    model: Annotated[str, typer.Option("--model", help="frame, temporal, transfer or features.")] = "frame",
    init: Annotated[Path | None, typer.Option(
        "--init", help="Emotion model to start from: a run folder (--model transfer, --images) or, with --images, "
                        "a face-api emotion model by name or ONNX file (e.g. classlens-emotion-v1).")] = None,
    backbone: Annotated[str, typer.Option(help="Emotion architecture of the frame backbone.")] = "mini-xception",
    fps: Annotated[float, typer.Option(help="Frames sampled per second of clip: 1 or 2.")] = 1.0,
    folds: Annotated[int, typer.Option(min=0, help="Subject-disjoint cross-validation folds first (0: none).")] = 0,
    subgroups: Annotated[Path | None, typer.Option(help="CSV subject,group for per-subgroup metrics.")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs in total (a resumed run goes on up to this).")] = 30,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Same seed, same machine: same result.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda (mixed precision) or auto.")] = "auto",
    restart: Annotated[bool, typer.Option("--restart", help="Start over instead of resuming checkpoint.pt.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train an engagement model on DAiSEE (four states, levels 0-3); resumes an interrupted run in --out."""
    from classlens.cli_common import user_errors
    from kernel.errors import BadInputError
    from kernel.settings import load_settings

    with user_errors():
        if device not in ("cpu", "cuda", "auto"):
            raise BadInputError("--device is cpu, cuda or auto")
        if (daisee is None) == (not images):
            raise BadInputError("give either --daisee (DAiSEE videos) or --images (labelled face images)")
        from training.engagement_train import EngagementTrainOptions, train_engagement
        from training.loop import TrainConfig, resolve_device

        resolve_device(device)  # fail before the slow face extraction when --device cuda has no GPU
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,  # type: ignore[arg-type]
                             resume=not restart, selection_metric="uar")
        if images:
            _train_engagement_images(images, out_dir, init, config, frozen_blocks, selection_fraction,
                                     class_weighting, quiet, selection_by)
            return
        assert daisee is not None
        config = replace(config, selection_metric="macro_f1")
        options = EngagementTrainOptions(daisee=daisee, out=out_dir, model=model, init=init,  # type: ignore[arg-type]
                                         backbone=backbone, fps=fps, folds=folds, subgroups=subgroups, config=config)
        result = train_engagement(options, load_settings(), progress=not quiet, echo=out.print)
        for name in ("clip engagement", "frame engagement"):
            if name in result.test_metrics:
                m = result.test_metrics[name]
                out.print(f"test, {name}: accuracy {m.accuracy:.3f}, macro-F1 {m.macro_f1:.3f}, UAR {m.uar:.3f}, "
                          f"engaged AUC {m.engaged_auc if m.engaged_auc is not None else float('nan'):.3f} "
                          f"({m.count})")
        out.print(f"run {result.info.run_id}; report: {out_dir / 'report.html'}")


def _train_engagement_images(images: list[Path], out_dir: Path, init: Path | None, config: TrainConfig,
                             frozen_blocks: int, selection_fraction: float, class_weighting: str, quiet: bool,
                             selection_by: str = "frames") -> None:
    """``classlens train engagement --images DIR --init MODEL``: a frame model from labelled face images."""
    from kernel.errors import BadInputError
    from kernel.settings import load_settings
    from training.emotion_train import CLASS_WEIGHTINGS
    from training.engagement_images import train_engagement_images

    if init is None:
        raise BadInputError("--images needs --init: a face-api emotion run or model (e.g. classlens-emotion-v1) "
                            "to start from")
    if class_weighting not in CLASS_WEIGHTINGS:
        raise BadInputError(f"--class-weighting is one of {', '.join(CLASS_WEIGHTINGS)}")
    run = train_engagement_images(images, out_dir, init=init, settings=load_settings(), config=config,
                                  frozen_blocks=frozen_blocks, selection_fraction=selection_fraction,
                                  class_weighting=class_weighting,  # type: ignore[arg-type]
                                  progress=not quiet, selection_by=selection_by)
    for name, m in (("test, trained model", run.test), ("test, configured default", run.baseline)):
        if m is not None:
            out.print(f"{name}: accuracy {m.accuracy:.3f}, macro-F1 {m.macro_f1:.3f}, UAR {m.uar:.3f}, "
                      f"engaged AUC {m.engaged_auc if m.engaged_auc is not None else float('nan'):.3f} ({m.count})")
    out.print(f"run {run.info.run_id}; report: {out_dir / 'report.html'}")


def export_command(
    run: Annotated[Path, typer.Argument(help="Training run folder (with run.json and best.pt).")],
    name: Annotated[str, typer.Option("--name", help="Model name in the cache, e.g. daisee-engagement-v1.")],
    fp16: Annotated[bool, typer.Option("--fp16", help="Store weights as float16 (half the size).")] = False,
    ship: Annotated[Path | None, typer.Option(
        "--ship", help="Write NAME.onnx and its model card into this folder (model_export/packaged to ship "
                       "it with ClassLens) instead of the model cache.")] = None,
    card: Annotated[Path | None, typer.Option(
        "--card", help="With --ship: the card's words (training/cards/NAME.json).")] = None,
    evaluation: Annotated[list[str] | None, typer.Option(
        "--evaluation", help="With --ship: NAME=PATH of an evaluation.json to put in the card (repeatable).")]
    = None,
) -> None:
    """Export a run to ONNX in the model cache (or ship it with a model card), checking parity with PyTorch."""
    from classlens.cli_common import user_errors
    from kernel.settings import load_settings

    with user_errors():
        from training.export import export_run

        settings = load_settings()
        parity = None
        if (run / "run.json").is_file():
            from training.run import RunInfo

            info = RunInfo.load(run)
            if info.task == "engagement" and "images" in info.config:
                from training.engagement_images import run_parity_inputs

                parity = run_parity_inputs(run, settings)
            elif info.task == "engagement" and info.input_spec.kind == "image":
                # Frame engagement runs keep no pixels: their parity crops are made again from DAiSEE.
                from training.engagement_train import engagement_parity_inputs

                parity = engagement_parity_inputs(run, settings)
        if ship is not None:
            from kernel.errors import BadInputError
            from training.export import ship_run

            if card is None:
                raise BadInputError("--ship needs --card: the model card's words")
            pairs = [item.partition("=") for item in evaluation or []]
            if any(not key or not path for key, _, path in pairs):
                raise BadInputError("--evaluation is NAME=PATH")
            card_path = ship_run(run, name, ship, template=card, fp16=fp16, parity_inputs=parity,
                                 evaluations={key: Path(path) for key, _, path in pairs})
            out.print(f"{name}: {ship / (name + '.onnx')} and {card_path}")
            return
        result = export_run(run, name, cache_dir=settings.model_cache_dir, fp16=fp16, parity_inputs=parity)
        out.print(f"{name}: {result.path} ({result.size_bytes} bytes, sha256 {result.sha256[:12]}…), parity "
                  f"max |Δ| {result.parity_max_abs_diff:.1e} on {result.parity_samples} real inputs")
        info_role = json.loads(result.path.with_name("model.json").read_text())["role"]
        out.print(f"use it: classlens models use {info_role} {name}")


def evaluate_command(
    model: Annotated[str, typer.Argument(help="Model name, ONNX file or training run folder.")],
    data: Annotated[Path, typer.Option("--data", help="FER2013 CSV, labels.csv folder, class folders or DAiSEE.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write evaluation.html and .json here.")] = None,
    faces: Annotated[str, typer.Option(help="detect (as the runtime) or as-is (face crops).")] = "detect",
    split: Annotated[str | None, typer.Option(help="FER2013 Usage (e.g. PrivateTest) or DAiSEE split (Test).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Evaluate an emotion model (default or trained) on a data set: accuracy, macro-F1, UAR, per class."""
    from classlens.cli_common import user_errors
    from kernel.errors import BadInputError
    from kernel.settings import load_settings

    with user_errors():
        if faces not in ("detect", "as-is"):
            raise BadInputError("--faces is detect or as-is")
        if (data / "DataSet").is_dir() and (data / "Labels").is_dir():
            _evaluate_engagement(model, data, out_dir, split or "Test", quiet)
            return
        from training.engagement_images import is_engagement_folder

        if is_engagement_folder(data):
            _evaluate_engagement_images(model, data, out_dir, split, quiet)
            return
        from training.evaluate import evaluate

        result = evaluate(model, data, settings=load_settings(), out_dir=out_dir,
                          faces=faces, split=split, progress=not quiet)  # type: ignore[arg-type]
        out.print(f"model: {result.model}\ndata: {result.data}")
        if result.dropped:
            out.print("left out: " + ", ".join(f"{n} {reason}" for reason, n in sorted(result.dropped.items())))
        out.print(result.per_class_markdown())
        if result.report_path is not None:
            out.print(f"report: {result.report_path}")


def _evaluate_engagement_images(model: str, data: Path, out_dir: Path | None, split: str | None, quiet: bool) -> None:
    """``classlens evaluate MODEL --data <labelled face images>``: an engagement model as the workers run it."""
    from kernel.settings import load_settings
    from training.engagement_images import evaluate_engagement_images

    result = evaluate_engagement_images(model, data, settings=load_settings(), split=split, out_dir=out_dir,
                                        progress=not quiet)
    m = result.metrics
    out.print(f"model: {result.model}\ndata: {result.data}")
    if result.dropped:
        out.print("left out: " + ", ".join(f"{n} {reason}" for reason, n in sorted(result.dropped.items())))
    auc = m.engaged_auc if m.engaged_auc is not None else float("nan")
    out.print(f"accuracy {m.accuracy:.3f}, UAR {m.uar:.3f}, macro-F1 {m.macro_f1:.3f}, engaged AUC {auc:.3f} "
              f"({m.count} faces)")
    out.print("recall per level: " + ", ".join(f"{label} {r:.3f}" for label, r in zip(m.labels, m.recall,
                                                                                       strict=True)))
    if out_dir is not None:
        out.print(f"report: {out_dir / 'evaluation.html'}")


def _evaluate_engagement(model: str, daisee: Path, out_dir: Path | None, split: str, quiet: bool) -> None:
    """``classlens evaluate MODEL --data <DAiSEE folder>``: an engagement model as the workers run it."""
    from kernel.settings import load_settings
    from training.engagement_train import evaluate_engagement

    result = evaluate_engagement(model, daisee, load_settings(), split=split, out_dir=out_dir, progress=not quiet)
    out.print(f"model: {result.model}\ndata: {result.data}")
    for name, m in result.metrics.items():
        auc = m.engaged_auc if m.engaged_auc is not None else float("nan")
        out.print(f"{name}: accuracy {m.accuracy:.3f}, macro-F1 {m.macro_f1:.3f}, UAR {m.uar:.3f}, "
                  f"engaged AUC {auc:.3f} ({m.count})")
    if result.report_path is not None:
        out.print(f"report: {result.report_path}")


def models_use(
    role: Annotated[str, typer.Argument(help="emotion or engagement.")],
    name: Annotated[str, typer.Argument(help="Model name (packaged or exported) or ONNX path; 'default' resets.")],
) -> None:
    """Make the workers use a model for a role (kept in the model cache; the environment still wins)."""
    from classlens.cli_common import user_errors
    from kernel.errors import BadInputError
    from kernel.settings import MODEL_SELECTION_FIELDS, MODEL_SELECTION_FILE, load_settings, read_model_selection
    from pipeline.models import model_cache_for
    from training.run import write_atomic

    with user_errors():
        if role not in MODEL_SELECTION_FIELDS:
            raise BadInputError(f"role must be one of {', '.join(MODEL_SELECTION_FIELDS)}, not {role!r}")
        settings = load_settings()
        cache = model_cache_for(settings)
        selection = read_model_selection(settings.model_cache_dir)
        if name == "default":
            selection.pop(role, None)
        else:
            try:
                spec = cache.spec(name)
            except KeyError:
                if not Path(name).expanduser().is_file():
                    raise BadInputError(f"{name!r} is neither a known model nor an ONNX file; "
                                        "see `classlens models list`") from None
                name = str(Path(name).expanduser().resolve())
            else:
                if spec.role != role:
                    raise BadInputError(f"{name} is a {spec.role} model, not an {role} model")
            selection[role] = name
        write_atomic(settings.model_cache_dir / MODEL_SELECTION_FILE,
                     (json.dumps(selection, indent=2, sort_keys=True) + "\n").encode())
        field_name = MODEL_SELECTION_FIELDS[role]
        effective = getattr(load_settings(), field_name)
        out.print(f"{role}: {selection.get(role, 'default')} (workers now load {effective})")
        if effective != selection.get(role, effective):
            console.print(f"[yellow]note:[/] CLASSLENS_{field_name.upper()} is set and takes precedence")
