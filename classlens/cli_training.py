"""Commands for training, exporting, evaluating and selecting models.

``classlens train emotion``, ``classlens export``, ``classlens evaluate`` and
``classlens models use``; registered in :mod:`classlens.cli`. torch and the training
modules are imported inside the commands, so ``classlens --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

console = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)

train_app = typer.Typer(help="Train emotion and engagement models.", no_args_is_help=True)
# `classlens train engagement` (DAiSEE) is in this group too: train_engagement_command below.

Device = Literal["cpu", "cuda", "auto"]


@train_app.command("emotion")
def train_emotion_command(
    data: Annotated[Path, typer.Option("--data", help="FER2013 CSV, a folder with labels.csv, or a folder per class.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder (checkpoints, run.json, report.html).")],
    model: Annotated[str, typer.Option("--model", help="mini-xception or resnet.")] = "mini-xception",
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
    restart: Annotated[bool, typer.Option("--restart", help="Start over instead of resuming checkpoint.pt.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train an emotion model (FER2013's seven classes); resumes an interrupted run in --out."""
    from classlens.cli import _user_errors
    from classlens.errors import BadInputError
    from classlens.settings import load_settings

    with _user_errors():
        if device not in ("cpu", "cuda", "auto") or faces not in ("detect", "as-is"):
            raise BadInputError("--device is cpu, cuda or auto; --faces is detect or as-is")
        from training.emotion_train import train_emotion
        from training.loop import TrainConfig

        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                             device=device, amp=amp, num_workers=num_workers,  # type: ignore[arg-type]
                             resume=not restart)
        run = train_emotion(data, out_dir, family=model, config=config, input_size=input_size,
                            faces=faces, val_fraction=val_fraction,  # type: ignore[arg-type]
                            test_fraction=test_fraction, settings=load_settings(), progress=not quiet)
        best = run.result.best_metrics
        out.print(f"run {run.info.run_id} in {out_dir}: best epoch {run.result.best_epoch}, "
                  + ", ".join(f"{k}={v:.3f}" for k, v in best.items() if k.startswith("val_") and k != "val_count"))
        if run.test is not None:
            out.print(f"test: accuracy {run.test.accuracy:.3f}, macro-F1 {run.test.macro_f1:.3f}, "
                      f"UAR {run.test.uar:.3f} ({run.test.count} faces)")
        out.print(f"report: {out_dir / 'report.html'}")


@train_app.command("engagement")
def train_engagement_command(
    daisee: Annotated[Path, typer.Option("--daisee", help="DAiSEE folder (DataSet/ and Labels/ inside).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder (checkpoints, run.json, report.html).")],
    model: Annotated[str, typer.Option("--model", help="frame, temporal, transfer or features.")] = "frame",
    init: Annotated[Path | None, typer.Option("--init", help="Emotion run to start from (--model transfer).")] = None,
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
    from classlens.cli import _user_errors
    from classlens.errors import BadInputError
    from classlens.settings import load_settings

    with _user_errors():
        if device not in ("cpu", "cuda", "auto"):
            raise BadInputError("--device is cpu, cuda or auto")
        from training.engagement_train import EngagementTrainOptions, train_engagement
        from training.loop import TrainConfig, resolve_device

        resolve_device(device)  # fail before the slow face extraction when --device cuda has no GPU
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,  # type: ignore[arg-type]
                             resume=not restart)
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


def export_command(
    run: Annotated[Path, typer.Argument(help="Training run folder (with run.json and best.pt).")],
    name: Annotated[str, typer.Option("--name", help="Model name in the cache, e.g. daisee-engagement-v1.")],
    fp16: Annotated[bool, typer.Option("--fp16", help="Store weights as float16 (half the size).")] = False,
) -> None:
    """Export a run to ONNX in the model cache, check parity with PyTorch, register it."""
    from classlens.cli import _user_errors
    from classlens.settings import load_settings

    with _user_errors():
        from training.export import export_run

        settings = load_settings()
        parity = None
        if (run / "run.json").is_file():
            from training.run import RunInfo

            info = RunInfo.load(run)
            if info.task == "engagement" and info.input_spec.kind == "image":
                # Frame engagement runs keep no pixels: their parity crops are made again from DAiSEE.
                from training.engagement_train import engagement_parity_inputs

                parity = engagement_parity_inputs(run, settings)
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
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Evaluate an emotion model (default or trained) on a data set: accuracy, macro-F1, UAR, per class."""
    from classlens.cli import _user_errors
    from classlens.errors import BadInputError
    from classlens.settings import load_settings

    with _user_errors():
        if faces not in ("detect", "as-is"):
            raise BadInputError("--faces is detect or as-is")
        if (data / "DataSet").is_dir() and (data / "Labels").is_dir():
            _evaluate_engagement(model, data, out_dir, split or "Test", quiet)
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


def _evaluate_engagement(model: str, daisee: Path, out_dir: Path | None, split: str, quiet: bool) -> None:
    """``classlens evaluate MODEL --data <DAiSEE folder>``: an engagement model as the workers run it."""
    from classlens.settings import load_settings
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
    from classlens.cli import _user_errors
    from classlens.errors import BadInputError
    from classlens.settings import MODEL_SELECTION_FIELDS, MODEL_SELECTION_FILE, load_settings, read_model_selection
    from model_export.cache import ModelCache
    from training.run import write_atomic

    with _user_errors():
        if role not in MODEL_SELECTION_FIELDS:
            raise BadInputError(f"role must be one of {', '.join(MODEL_SELECTION_FIELDS)}, not {role!r}")
        settings = load_settings()
        cache = ModelCache(settings.model_cache_dir, local_models_dir=settings.local_models_dir)
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
