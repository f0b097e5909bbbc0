"""The command line: a thin shell over the Python API. Errors a person can act on are printed without a traceback."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from . import backbones, config, distributed
from .config import AUDIT_NEAR, RANGES, ConfigError, IgnoredSetting, TrainConfig, choices
from .data import HeadstartError

log = logging.getLogger("headstart")


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    rank = f"[rank {distributed.rank()}]" if distributed.rank() else ""
    handler.setFormatter(logging.Formatter(f"headstart{rank}: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _say(text: str, quiet: bool = False) -> None:
    """A first line at once, on a terminal: loading torch, timm and scikit-learn takes seconds before a command has
    anything else to say. Not written when stderr is a pipe or a file (logs stay clean) or when asked to be quiet."""
    if not quiet and sys.stderr.isatty():
        click.echo(f"headstart: {text}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HeadstartError as e:
            click.echo(f"headstart: error: {e}", err=True)
            sys.exit(130 if type(e).__name__ == "Interrupted" else 2)
        except KeyboardInterrupt:
            click.echo("headstart: interrupted; cached features are kept, so running the same command again resumes", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="headstart")
def main() -> None:
    """Transfer learning on images: a folder of labelled photos in, an accurate classifier out."""


# Defaults and choices of the training options come from TrainConfig, and every value is judged by it (tests/test_cli.py
# checks that the two agree), so the command line and the Python API cannot drift apart.
_DEFAULTS = TrainConfig()
ENGINES = ["pytorch", "onnxruntime"]


def _number_or_auto(ctx: click.Context, param: click.Parameter, value: str | None) -> float | str | None:
    """A number when the text is one; TrainConfig judges it (and any word other than auto)."""
    return _parsed(value, float)


def _whole_or_auto(ctx: click.Context, param: click.Parameter, value: str | None) -> int | float | str | None:
    """A whole number when the text is one (else as ``_number_or_auto``): TrainConfig refuses 256.5 by name."""
    return _parsed(value, int, float)


def _parsed(value: str | None, *kinds: type) -> Any:
    if value is None or value == "auto":
        return value
    for kind in kinds:
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _config(**opts: Any) -> TrainConfig:
    """The run's settings from the command's options, checked before any work starts: a bad value exits with
    status 2 (``headstart: error: field=value ...: allowed``) and leaves no run folder behind."""
    try:
        return TrainConfig(**opts)
    except ConfigError as e:  # name the option the user typed when it is not the field's own name (--epochs)
        flag = next((p.opts[0] for p in click.get_current_context().command.params if p.name == e.field), None)
        if flag and flag != "--" + e.field.replace("_", "-"):
            raise HeadstartError(f"{flag}: {e}") from None
        raise


def _warn_ignored(*configs: TrainConfig) -> None:
    """Say on stderr which options the run will not use (e.g. --augment without --finetune), each once, so a
    setting that does nothing is noticed instead of trusted."""
    for line in dict.fromkeys(s for cfg in configs for s in cfg.ignored()):
        click.echo(f"headstart: warning: {line}", err=True)
    warnings.simplefilter("ignore", IgnoredSetting)  # said here, before any work: the pipeline need not say it again


def _compute_options(f: Any) -> Any:
    """How the backbone computes: the same options for train and compare."""
    options = [
        click.option("--precision", type=click.Choice(choices("precision")), default=_DEFAULTS.precision, show_default=True,
                     help="int8: extract with the backbone quantized in ONNX Runtime on the CPU, calibrated on your "
                          "training photos (export stays fp32). Otherwise PyTorch's precision (fine-tuning; extraction "
                          "with --runtime pytorch); auto: bf16 where the CPU has it."),
        click.option("--runtime", type=click.Choice(choices("runtime")), default=_DEFAULTS.runtime, show_default=True,
                     help="What runs the frozen backbone for features: auto = ONNX Runtime on a CPU, PyTorch on a GPU."),
        click.option("--input-size", default=_DEFAULTS.input_size, callback=_whole_or_auto, metavar="N|auto",
                     help=f"Pixels (square) the backbone sees, {RANGES['input_size'].describe()}; default: its timm data "
                          "config, or with --finetune auto. auto: its own size or one of two larger (8/7, 9/7 of it), "
                          "whichever cross-validates best on the training photos; networks trained at 224 often do "
                          "better at 256-288 (the FixRes effect; see README)."),
        click.option("--crop-pct", default=_DEFAULTS.crop_pct, callback=_number_or_auto, metavar="P|auto",
                     help="Share of the shorter side kept by the centre crop; default: the backbone's timm data config "
                          "(about 0.88). 1.0 keeps the whole frame: better for product or catalogue photos. auto: "
                          "whichever of the two cross-validates better on the training photos (see README)."),
        click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True,
                     help="Photos per forward pass while extracting features: memory and speed, not results."),
        click.option("--workers", type=int, default=_DEFAULTS.workers, show_default=True, help="Decode workers (-1: one per spare core; ONNX Runtime extraction runs workers + 1 pipelines)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _head_options(f: Any) -> Any:
    """What the head is and how it learns: the same options for train and compare."""
    options = [
        click.option("--head", type=click.Choice(choices("head")), default=_DEFAULTS.head, show_default=True,
                     help="The classifier on the frozen backbone's features: linear (logistic regression), mlp (Dense 256 "
                          "+ ReLU + dropout + softmax, the classic), auto = whichever cross-validates better on train (the MLP from 3 photos a class)."),
        click.option("--class-weights", type=click.Choice(choices("class_weights")), default=_DEFAULTS.class_weights,
                     show_default=True,
                     help="Loss weights per class: auto = balanced when the largest class has over 1.5x the smallest's photos."),
        click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
                     help="Seeds the split, the cross-validation folds and every training run: the same seed gives the same run."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Run folder (default: runs/<data folder name>).")
@click.option("--backbone", default=_DEFAULTS.backbone, show_default=True, help="Registry name or any timm model name.")
@click.option("--weights", help="Local weight file (.safetensors or torch state dict) for the backbone.")
@_head_options
@click.option("--val-fraction", type=float, default=_DEFAULTS.val_fraction, show_default=True, help="Used only when the folder has no val/ split.")
@_compute_options
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Feature cache (default: $HEADSTART_CACHE or ~/.cache/headstart).")
@click.option("--exclude", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A list of photo paths to leave out (the exclude.txt of `headstart audit`, edited); nothing is deleted.")
@click.option("--finetune", is_flag=True, help="After the head, unfreeze the top of the backbone and keep training gently.")
@click.option("--unfreeze", type=int, default=_DEFAULTS.unfreeze, show_default=True, help="Top blocks to unfreeze when fine-tuning.")
@click.option("--unfreeze-layers", type=int, default=_DEFAULTS.unfreeze_layers, help="Instead: the last N layers with weights (the Keras way).")
@click.option("--ft-epochs", "--epochs", "ft_epochs", type=int, default=_DEFAULTS.ft_epochs, show_default=True,
              help="Fine-tuning epochs (--epochs: the same): the one-cycle's length on cached activations, the per-epoch loop's "
                   "most (early stopping may end it sooner).")
@click.option("--ft-lr", "--lr", "ft_lr", type=str, default=_DEFAULTS.ft_lr, callback=_number_or_auto, show_default=True, metavar="LR|auto",
              help="Head learning rate while fine-tuning (--lr: the same); the unfrozen blocks get geometrically less, down to "
                   "--backbone-lr-ratio of it. auto: lr-find's valley (see headstart lr-find).")
@click.option("--backbone-lr-ratio", type=float, default=_DEFAULTS.backbone_lr_ratio, show_default=True,
              help="The lowest unfrozen block's rate as a share of the head's (fastai's slice(lr × ratio, lr)).")
@click.option("--cache-bottom/--no-cache-bottom", default=_DEFAULTS.cache_bottom, show_default=True,
              help="Fine-tune on the frozen bottom's activations cached once per photo and view (minutes on a CPU; held-out "
                   "photos choose how much of it to keep), or run the per-epoch loop over photos (checkpoints, --resume; what "
                   "torchrun runs).")
@click.option("--ft-views", type=int, default=_DEFAULTS.ft_views, show_default=True,
              help="Augmented views (--augment) per training photo whose bottom activations are cached for fine-tuning.")
@click.option("--ft-holdout", type=float, default=_DEFAULTS.ft_holdout, show_default=True,
              help="Share of the training photos held out to choose what fine-tuning keeps (a share of the fine-tuned "
                   "weights, an epoch, or the frozen head).")
@click.option("--ft-mixup", type=float, default=_DEFAULTS.ft_mixup, show_default=True,
              help="timm Mixup alpha on the cached activations while fine-tuning (0: off).")
@click.option("--ft-ema", type=float, default=_DEFAULTS.ft_ema, show_default=True,
              help="timm ModelEmaV3 decay of the fine-tuned weights (0: off).")
@click.option("--train-bn", is_flag=True, help="Let BatchNorm statistics move while fine-tuning (off: the safe default).")
@click.option("--augment", default=_DEFAULTS.augment, show_default=True,
              help="Augmentation of the training photos: none, classic, rrc, randaugment, erasing (combine with +). Applies "
                   "when fine-tuning, to --backbone scratch, and to --aug-views; the frozen-backbone head alone sees each photo once.")
@click.option("--aug-views", type=int, default=_DEFAULTS.aug_views,
              help="Also cache K augmented views (--augment) of each training photo for the head: K more extractions.")
@click.option("--ft-batch-size", type=int, default=_DEFAULTS.ft_batch_size, show_default=True,
              help="Fine-tuning images per step and process (under torchrun the global batch is this × processes).")
@click.option("--resume", "resume_run", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Continue the interrupted run in this folder.")
@click.option("--nproc", type=int, default=0, help="Run as N processes on this machine (through torchrun; one per GPU).")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and the final summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
def train(data: Path, out: Path | None, quiet: bool, as_json: bool, resume_run: Path | None, nproc: int, **opts: Any) -> None:
    """Train a classifier on DATA (one sub-folder per class, or train/ + val/ split folders)."""
    cfg = _config(**opts)
    _say(f"training on {data} with {cfg.backbone}: loading libraries and listing the photos…",
         quiet or as_json or bool(nproc) or distributed.rank() > 0)
    from .pipeline import train as run

    if not nproc and distributed.rank() == 0:  # under --nproc, the relaunched rank 0 says it
        _warn_ignored(cfg)
    if nproc:
        _relaunch_under_torchrun(nproc)
    distributed.init()
    _setup_logging(quiet or as_json)
    out = distributed.broadcast(resume_run or out or _free_run_dir(Path("runs") / data.resolve().name))  # one folder for all ranks
    clf = run(data, out=out, config=cfg, progress=not (quiet or as_json) and sys.stderr.isatty(), resume=resume_run is not None)
    distributed.shutdown()
    if not distributed.is_main():
        return
    summary = {"run": str(out), "backbone": clf.backbone.spec.name, "head": clf.info["head"], "metrics": clf.info["metrics"],
               "skipped": len(clf.info["data"]["skipped"]), "timing": clf.info["timing"]}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _print_summary(clf, out)


def _print_summary(clf: Any, out: Path) -> None:
    from .evaluate import interval_text

    for name, m in clf.info["metrics"].items():
        absent = f"; no photos of {', '.join(m['absent'])}" if m.get("absent") else ""
        ci = interval_text(m)
        ci = f" ({ci})" if ci else ""
        click.echo(f"{name}: accuracy {m['accuracy']:.1%}{ci}  balanced {m['balanced_accuracy']:.1%}  macro-F1 {m['macro_f1']:.3f}  "
                   f"({m['n']} images{absent})")
    for stage, m in clf.info.get("stages", {}).items():
        if "val" in m:
            kept = "  (kept epoch 0: fine-tuning did not improve on the head)" if m.get("best_epoch") == 0 and stage == "finetune" else ""
            click.echo(f"  {stage}: val accuracy {m['val']['accuracy']:.1%}{kept}")
    t, scratch = clf.info["timing"], clf.info.get("stages", {}).get("scratch")
    if scratch is not None:  # no frozen features, no head fitted on them: the whole network learned here
        click.echo(f"trained from scratch for {scratch['epochs_run']} epochs (best epoch {scratch['best_epoch']}), {t['total_s']:.1f} s in all")
    else:
        click.echo(f"{t['embeddings_computed']} embeddings computed, {t['total_s']:.1f} s in all; head: {clf.info['head']['kind']}")
    click.echo(f"saved to {out}  (open {out / 'report.html'} in a browser; predict: headstart predict {out} PHOTO.jpg)")


@main.command("lr-find")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Folder for lr_find.csv and lr_find.png (default: runs/<data>-lr-find).")
@click.option("--backbone", default=_DEFAULTS.backbone, show_default=True, help="Registry name or any timm model name.")
@click.option("--weights", help="Local weight file (.safetensors or torch state dict) for the backbone.")
@click.option("--unfreeze", type=int, default=_DEFAULTS.unfreeze, show_default=True, help="Top blocks that fine-tuning would train.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help="Seeds the split and the sweep's batches.")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Feature cache (default: $HEADSTART_CACHE or ~/.cache/headstart).")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and the result.")
def lr_find(data: Path, out: Path | None, quiet: bool, **opts: Any) -> None:
    """The learning-rate range test of fine-tuning on DATA: the suggested --ft-lr, and the curve as CSV and PNG."""
    cfg = _config(finetune=True, **opts)
    _say(f"lr-find on {data} with {cfg.backbone}: loading libraries and listing the photos…", quiet)
    from .pipeline import lr_find as run

    _setup_logging(quiet)
    out = out or _free_run_dir(Path("runs") / f"{data.resolve().name}-lr-find")
    found = run(data, out=out, config=cfg, progress=not quiet and sys.stderr.isatty())
    click.echo(f"lr-find: {found.message}")
    click.echo(f"suggested: --ft-lr {found.lr:.2g}; curve: {out / 'lr_find.png'}")


def _relaunch_under_torchrun(nproc: int) -> None:
    """`headstart train … --nproc N` = `torchrun --standalone --nproc-per-node N -m headstart train …` (same options)."""
    if distributed.launched():
        raise HeadstartError("--nproc starts torchrun itself: drop it when launching with torchrun")
    if nproc < 1:
        raise HeadstartError(f"--nproc must be at least 1, not {nproc}")
    ctx = click.get_current_context()
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if param.name == "nproc" or value is None or value == param.default:
            continue
        if isinstance(param, click.Argument):
            args.insert(0, str(value))
        elif getattr(param, "is_flag", False):  # --flag, or the --no-flag of an on-by-default switch
            if value or param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            args += [param.opts[0], str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "headstart", "train", *args]
    if not (ctx.params["quiet"] or ctx.params["as_json"]):
        click.echo("headstart: " + " ".join(cmd), err=True)
    sys.exit(subprocess.call(cmd))


def _free_run_dir(base: Path) -> Path:
    """runs/name, or runs/name-2, -3 … so an earlier run is never overwritten by default."""
    if not base.exists():
        return base
    i = 2
    while base.with_name(f"{base.name}-{i}").exists():
        i += 1
    return base.with_name(f"{base.name}-{i}")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Folder for metrics.json and the readable files.")
@click.option("--split", help="Which split of DATA to use (default: test, else val, else everything).")
@click.option("--engine", type=click.Choice(ENGINES), default="pytorch", show_default=True, help="onnxruntime: the model exported by `headstart export`.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def evaluate(run: Path, data: Path, out: Path | None, split: str | None, engine: str, quiet: bool, as_json: bool) -> None:
    """Evaluate the trained model in RUN on another labelled folder DATA."""
    _say(f"evaluating {run} on {data}: loading the model…", quiet or as_json)
    from .predict import load

    _setup_logging(quiet or as_json)
    m = load(run).evaluate(data, out=out, split=split, progress=not (quiet or as_json) and sys.stderr.isatty(), engine=engine)
    for s in m["data"]["skipped"]:
        log.warning("skipped %s: %s", s["path"], s["reason"])
    if as_json:
        click.echo(json.dumps({k: m[k] for k in ("n", "accuracy", "accuracy_ci95", "balanced_accuracy", "macro_f1", "log_loss", "per_class")}, indent=2))
        return
    from .evaluate import format_report

    click.echo(format_report(m), nl=False)
    if out:
        click.echo(f"written to {out}")


@main.command()
@click.argument("items", nargs=-1, required=True)
@click.option("--imagenet", is_flag=True, help="Use the raw pretrained backbone and its 1000 ImageNet classes (no RUN).")
@click.option("--backbone", default=backbones.DEFAULT, show_default=True, help="With --imagenet: which backbone.")
@click.option("--weights", help="With --imagenet: a local weight file.")
@click.option("--top-k", "-k", type=int, default=5, show_default=True)
@click.option("--engine", type=click.Choice(ENGINES), default="pytorch", show_default=True, help="onnxruntime: the model exported by `headstart export`.")
@click.option("--json", "as_json", is_flag=True, help="One JSON list.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV: path, label, probability (top-1), then the top-k.")
def predict(items: tuple[str, ...], imagenet: bool, backbone: str, weights: str | None, top_k: int, engine: str, as_json: bool, as_csv: bool) -> None:
    """Predict: `headstart predict RUN PHOTO… ` or `headstart predict --imagenet PHOTO…` (folders are expanded)."""
    _say("loading the " + (f"ImageNet network {backbone}" if imagenet else "model") + "…")
    from .predict import load, predict_imagenet

    _setup_logging(True)
    if imagenet and engine != "pytorch":
        raise HeadstartError("--imagenet runs the raw backbone with PyTorch only; drop --engine, or export a trained run")
    if imagenet:
        preds = predict_imagenet(list(items), backbone=backbone, weights=weights, top_k=top_k)
    else:
        if len(items) < 2:
            raise HeadstartError("give a run folder and at least one image: headstart predict RUN PHOTO.jpg (or --imagenet PHOTO.jpg)")
        preds = load(items[0]).predict(list(items[1:]), top_k=top_k, engine=engine)
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in preds], indent=2))
    elif as_csv:
        w = csv.writer(sys.stdout)
        w.writerow(["path", "label", "probability", "top_k"])
        for p in preds:
            w.writerow([p.path, "", "", f"error: {p.error}"] if p.error else
                       [p.path, p.top[0][0], f"{p.top[0][1]:.6f}", "; ".join(f"{c}={q:.4f}" for c, q in p.top)])
    else:
        for p in preds:
            if p.error:
                click.echo(f"{p.path}\n  error: {p.error}")
                continue
            click.echo(p.path)
            for c, q in p.top:
                click.echo(f"  {q:7.2%}  {c}")
    if any(p.error for p in preds):
        sys.exit(1)


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder for model.onnx + onnx_meta.json (default: RUN).")
@click.option("--check-images", multiple=True, help="Photos (or folders) for the parity check (default: a spread of the run's own val photos).")
@click.option("--json", "as_json", is_flag=True)
def export(run: Path, fmt: str, out: Path | None, check_images: tuple[str, ...], as_json: bool) -> None:
    """Export RUN as one ONNX graph (image → probabilities), refused unless ONNX Runtime matches PyTorch.
    An ensemble folder exports each member into its own folder."""
    _say(f"exporting {run}: tracing the network and checking it against PyTorch…", as_json)
    from .export import export_onnx
    from .predict import is_ensemble, load_ensemble

    if is_ensemble(run):
        if out is not None:
            raise HeadstartError(f"'{run}' is an ensemble: its members are exported into their own folders; drop --out")
        folders = [m.path for m in load_ensemble(run).members]
    else:
        folders = [run]
    done = [export_onnx(f, out=out, check_images=list(check_images) or None) for f in folders]
    if as_json:
        rows = [{"onnx": str(r.onnx_path), "meta": str(r.meta_path), "max_abs_diff": r.max_diff, "images": r.images} for r in done]
        click.echo(json.dumps(rows if len(folders) > 1 else rows[0], indent=2))
        return
    for r in done:
        click.echo(f"wrote {r.onnx_path} ({r.onnx_path.stat().st_size / 1e6:.1f} MB) and {r.meta_path.name}")
        click.echo(f"parity on {r.images} photos: max |p_onnxruntime - p_pytorch| = {r.max_diff:.2g} (limit 1e-4, fp32)")
    example = "" if len(done) > 1 else f"   (or examples/predict_onnx.py {done[0].onnx_path.parent} PHOTO.jpg)"
    click.echo(f"use it: headstart predict {run} PHOTO.jpg --engine onnxruntime{example}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def demo(out: Path, quiet: bool) -> None:
    """Train on the demo photos (the CC0 clothing set, 10 types) and print the report. They are read from
    $HEADSTART_SHARED/datasets/clothing when present, else downloaded once and checked against headstart's manifest."""
    _say("demo: loading libraries and the demo photos…", quiet)
    from .demo import demo_data

    _setup_logging(quiet)
    folder = demo_data()
    log.info("demo data: %s", folder)
    from .pipeline import train as run

    clf = run(folder, out=out, progress=not quiet and sys.stderr.isatty())
    _print_summary(clf, out)
    click.echo("\nvalidation report (" + str(out / "classification_report.txt") + "):")
    click.echo((out / "classification_report.txt").read_text(), nl=False)


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--backbones", "names", required=True, help="Comma-separated names, e.g. efficientnet_lite0,efficientnet_lite1,mobilenetv2.")
@click.option("--out", type=click.Path(path_type=Path), help="Folder for the leaderboard and one run per backbone (default: runs/<data>-compare).")
@click.option("--finetune", is_flag=True, help="Fine-tune each backbone too, not only train its head.")
@click.option("--ensemble", is_flag=True, help="Add a row for the pretrained runs averaged (runs/<...>/ensemble; see `headstart ensemble`).")
@click.option("--weights", "weight_files", multiple=True, metavar="BACKBONE=FILE",
              help="A local weight file for one backbone, e.g. --weights mobilenetv2=mobilenetv2_100.safetensors (repeat per "
                   "backbone; others are looked for as train does: the weights folder, packages, the hub).")
@click.option("--require-pretrained", is_flag=True, help="Stop with an error when a backbone has no pretrained weights here (default: list it as skipped).")
@_head_options
@_compute_options
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Feature cache (default: $HEADSTART_CACHE or ~/.cache/headstart).")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and the leaderboard.")
@click.option("--json", "as_json", is_flag=True, help="Print the leaderboard as JSON.")
def compare(data: Path, names: str, out: Path | None, quiet: bool, as_json: bool, ensemble: bool, require_pretrained: bool,
            weight_files: tuple[str, ...], **opts: Any) -> None:
    """Train each backbone on the same split of DATA and rank them (leaderboard, plot, report.html)."""
    cfg = _config(**opts)
    _say(f"comparing {names} on {data}: loading libraries and listing the photos…", quiet or as_json)
    from .compare import compare as run
    from .report import format_table

    _warn_ignored(*(dataclasses.replace(cfg, backbone=name.strip()) for name in names.split(",") if name.strip()))
    _setup_logging(quiet or as_json)
    out = out or _free_run_dir(Path("runs") / f"{data.resolve().name}-compare")
    settings = {k: getattr(cfg, k) for k in opts if k != "finetune"}  # as checked (paths as text)
    rows = run(data, names.split(","), out, finetune=cfg.finetune, require_pretrained=require_pretrained, ensemble=ensemble,
               weights=_weight_map(weight_files), progress=not (quiet or as_json) and sys.stderr.isatty(), **settings)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(format_table(rows), nl=False)
    for r in rows:
        if r["status"] != "ok":
            click.echo(f"{r['backbone']}: {r['status']} — {r.get('reason', '')}")
    click.echo(f"saved to {out}  (leaderboard.csv, accuracy_vs_latency.png, report.html)")


def _weight_map(items: tuple[str, ...]) -> dict[str, str]:
    """``--weights NAME=FILE`` (repeatable) as {name: file}; ``compare`` checks names and files before any training."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not (sep and name.strip() and path.strip()):
            raise HeadstartError(f"--weights {item}: give BACKBONE=FILE, e.g. --weights mobilenetv2=mobilenetv2_100.safetensors")
        out[name.strip()] = path.strip()
    return out


@main.command("audit")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path),
              help="Folder for audit.json, audit.html and exclude.txt (default: the run or comparison folder given; "
                   "runs/<data>-audit for a data folder).")
@click.option("--near", type=float, default=AUDIT_NEAR, show_default=True,
              help="Copy similarity from which two photos count as near duplicates (1 = the same picture).")
@click.option("--backbone", default=_DEFAULTS.backbone, show_default=True, help="For a data folder: the backbone whose embeddings compare photos.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help="For a data folder without val/: the split's seed.")
@click.option("--val-fraction", type=float, default=_DEFAULTS.val_fraction, show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Feature cache (default: $HEADSTART_CACHE or ~/.cache/headstart).")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the findings' counts and files as JSON.")
def audit_command(data: Path, out: Path | None, near: float, quiet: bool, as_json: bool, **opts: Any) -> None:
    """Audit the photos of DATA (a data folder, a run folder or a comparison folder): duplicates, leaks across
    splits, likely mislabels, outliers, unreadable and poor images. Writes audit.json, audit.html, exclude.txt;
    nothing is deleted or moved."""
    _say(f"auditing {data}: loading libraries and listing the photos…", quiet or as_json)
    from .audit import audit, is_run_folder

    _setup_logging(quiet or as_json)
    out = out or (data if is_run_folder(data) else _free_run_dir(Path("runs") / f"{data.resolve().name}-audit"))
    result = audit(data, out, near=near, config=_config(**opts), progress=not (quiet or as_json) and sys.stderr.isatty())
    files = {name: str(out / name) for name in ("audit.json", "audit.html", "exclude.txt")}
    if as_json:
        click.echo(json.dumps({"summary": result.summary(), "files": files, "timing": result.timing}, indent=2))
        return
    for kind, n in result.summary().items():
        click.echo(f"{kind:<16} {n}")
    click.echo("nothing found" if not result.findings else f"written to {out}  (audit.html; edit exclude.txt, then "
               f"headstart train DATA --exclude {files['exclude.txt']})")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the ensemble (members are copied into it).")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def ensemble(runs: tuple[Path, ...], out: Path, quiet: bool, as_json: bool) -> None:
    """Average the class probabilities of several RUNS (same photos and classes) into one model that predicts and
    evaluates like a run. A comparison folder stands for its runs with pretrained weights."""
    _say("averaging " + ", ".join(map(str, runs)) + "…", quiet or as_json)
    from .ensemble import build

    _setup_logging(quiet or as_json)
    ens = build(list(runs), out, progress=not (quiet or as_json) and sys.stderr.isatty())
    if as_json:
        click.echo(json.dumps({"metrics": ens.info["metrics"], "members": ens.info["member_metrics"]}, indent=2))
        return
    for m in ens.info["member_metrics"]:
        click.echo(f"{m['backbone']:<24} " + "  ".join(f"{s} {100 * m[s]['accuracy']:.1f}%" for s in ("val", "test") if s in m) + f"  ({m['run']})")
    click.echo(f"{'ensemble':<24} " + "  ".join(f"{s} {100 * v['accuracy']:.1f}%" for s, v in ens.info["metrics"].items()))
    click.echo(f"saved to {out}  (predict: headstart predict {out} PHOTO.jpg)")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(run: Path) -> None:
    """(Re)build RUN/report.html from a run folder (train) or a comparison folder (compare)."""
    from .pipeline import gradcam_overlay
    from .predict import load_run
    from .report import build_report

    try:  # a run folder with its model gets Grad-CAM beside each worst error, as after training
        overlay = gradcam_overlay(load_run(run))
    except HeadstartError:
        overlay = None
    click.echo(f"written {build_report(run, error_overlay=overlay)}")


@main.command("backbones")
@click.option("--json", "as_json", is_flag=True)
def list_backbones(as_json: bool) -> None:
    """The registry: names, timm models, input size and whether weights are available here."""
    _say("reading each backbone's input size from timm and looking for its weights…", as_json)
    rows = []
    for spec in backbones.REGISTRY.values():
        rows.append({"name": spec.name, "timm": spec.timm_name, "input": backbones.input_size(spec), "weights": backbones.availability(spec), "about": spec.about})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    w = max(len(r["weights"]) for r in rows)
    click.echo(f"{'name':<19} {'timm model':<26} {'input':>5}  {'weights here':<{w}}  about")
    for r in rows:
        click.echo(f"{r['name']:<19} {r['timm']:<26} {r['input']:>5}  {r['weights']:<{w}}  {r['about']}")
    for name, why in backbones.UNAVAILABLE.items():
        click.echo(f"{name:<19} {'-':<26} {'-':>5}  {'not in timm':<{w}}  {why.split('. ')[-1].replace('Use --backbone', 'use')}")
    folders = " or ".join(str(d) for d in config.weights_dirs())
    click.echo(f"\nAny timm model name works too. Weights offline: --weights FILE, or a file named after the timm model "
               f"(e.g. mobilenetv2_100.safetensors) in the weights folder {folders} (set $HEADSTART_WEIGHTS).")


# ------------------------------------------------------------------------ look inside (explain.py): layers, explain


def _explain_subject(run: str | None, imagenet: bool, backbone: str, weights: str | None) -> Any:
    from . import explain

    if imagenet:
        return explain.imagenet(backbone, weights)
    if run is None:
        raise HeadstartError("give a run folder (trained with `headstart train`), or --imagenet for the raw pretrained network")
    return explain.as_subject(run)


_imagenet_opts = [
    click.option("--imagenet", is_flag=True, help="The raw pretrained backbone and its 1000 ImageNet classes (no RUN)."),
    click.option("--backbone", default=backbones.DEFAULT, show_default=True, help="With --imagenet: which backbone."),
    click.option("--weights", help="With --imagenet: a local weight file."),
]


def _with_imagenet_opts(f: Any) -> Any:
    for opt in reversed(_imagenet_opts):
        f = opt(f)
    return f


@main.command()
@click.argument("run", required=False)
@_with_imagenet_opts
@click.option("--depth", type=int, help="Only names with at most this many dotted parts (1: stages, 2: blocks).")
@click.option("--json", "as_json", is_flag=True)
def layers(run: str | None, imagenet: bool, backbone: str, weights: str | None, depth: int | None, as_json: bool) -> None:
    """The backbone's layers: names (for explain --feature-maps / --layer), types, output shapes, parameters."""
    _say("building the network to read its layers…", as_json)
    from . import explain

    subj = _explain_subject(run, imagenet, backbone, weights)
    rows = explain.layers(subj, depth)
    marks = {explain.first_conv(subj): "first conv"}
    try:
        marks[explain.default_layer(subj)] = "Grad-CAM default (last conv stage)"
    except HeadstartError:
        pass
    if as_json:
        click.echo(json.dumps([{**vars(r), "note": marks.get(r.name, "")} for r in rows], indent=2))
        return
    width = min(48, max(len(r.name) for r in rows))
    click.echo(f"{subj.name}, input {'×'.join(map(str, subj.data_config['input_size']))}")
    click.echo(f"{'name':<{width}}  {'type':<22} {'output':>14} {'params':>10}")
    for i, r in enumerate(rows):
        if r.part == "head" and (i == 0 or rows[i - 1].part != "head"):
            click.echo(f"-- the trained head: pooled features → class scores ({', '.join(subj.classes[:4])}{' …' if len(subj.classes) > 4 else ''})")
        shape = "×".join(map(str, r.shape)) if r.shape is not None else "-"
        note = f"  <- {marks[r.name]}" if r.name in marks and r.part == "backbone" else ""
        click.echo(f"{r.name:<{width}}  {r.type:<22} {shape:>14} {r.params:>10,}{note}")


@main.command()
@click.argument("items", nargs=-1, required=True)
@_with_imagenet_opts
@click.option("--gradcam", is_flag=True, help="Heat-map of where in the photo the evidence for a class lies.")
@click.option("--class", "target", help="With --gradcam: the class to explain (default: the predicted one).")
@click.option("--layer", help="With --gradcam: the layer (default: the last convolutional stage; see `headstart layers`).")
@click.option("--feature-maps", "maps", multiple=True, metavar="LAYER",
              help="Channel activations of LAYER as a grid ('first': first conv, 'last': last conv stage); twice for side by side.")
@click.option("--count", type=int, default=64, show_default=True, help="With --feature-maps: how many channels.")
@click.option("--whole", is_flag=True, help="Show the whole photo (no centre crop); scores may differ slightly from predict.")
@click.option("--out", type=click.Path(path_type=Path), help="PNG file (default: RUN/explain/PHOTO-gradcam.png or -features.png).")
def explain(items: tuple[str, ...], imagenet: bool, backbone: str, weights: str | None, gradcam: bool, target: str | None,
            layer: str | None, maps: tuple[str, ...], count: int, whole: bool, out: Path | None) -> None:
    """Look inside: `headstart explain RUN PHOTO --gradcam` or `--feature-maps LAYER` (or --imagenet PHOTO)."""
    from . import explain as ex

    if gradcam == bool(maps):
        raise HeadstartError("choose one view: --gradcam, or --feature-maps LAYER (names: `headstart layers RUN`)")
    if (target or layer) and not gradcam:
        raise HeadstartError("--class and --layer go with --gradcam (for feature maps, name the layer in --feature-maps)")
    want = 1 if imagenet else 2
    if len(items) != want:
        raise HeadstartError("give one photo: headstart explain RUN PHOTO.jpg … (or headstart explain --imagenet PHOTO.jpg …)")
    _say("loading the network…")
    subj = _explain_subject(None if imagenet else items[0], imagenet, backbone, weights)
    photo = Path(items[-1])
    folder = Path(items[0]) / "explain" if not imagenet else Path("explain")
    if gradcam:
        cam = ex.gradcam(subj, photo, target=target, layer=layer, whole=whole)
        path = ex.save_figure(ex.gradcam_figure(cam, title=photo.name), out or folder / f"{photo.stem}-gradcam.png")
        click.echo(f"predicted: {cam.predicted} ({cam.confidence:.1%}); Grad-CAM for '{cam.target}' ({cam.probability:.1%}) at layer {cam.layer}")
    else:
        panels = [ex.feature_maps(subj, photo, layer=name, count=count, whole=whole) for name in maps]
        path = ex.save_figure(ex.feature_grid(*panels, title=photo.name), out or folder / f"{photo.stem}-features.png")
        for p in panels:
            click.echo(f"{p.layer} ({p.type}): {len(p.maps)} of {p.channels} channels, {p.maps.shape[1]}×{p.maps.shape[2]}")
    click.echo(f"written to {path}")


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; anything but loopback lets other machines in (a warning says so).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
def serve(folder: Path, host: str, port: int, open_browser: bool) -> None:
    """A local page to try a run (or a comparison's runs) on photos, see its mistakes and its audit: `headstart serve RUN`."""
    _say(f"loading {folder}…")
    from .serve import serve as run_server

    _setup_logging(False)
    try:
        run_server(folder, host=host, port=port, open_browser=open_browser, say=lambda s: click.echo(f"headstart: {s}", err=True))
    except OSError as e:
        raise HeadstartError(f"cannot listen on {host}:{port} ({e.strerror or e}); try another --port") from None


if __name__ == "__main__":
    main()
