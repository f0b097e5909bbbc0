"""The command line: a thin shell over the Python API. Errors a person can act on are printed without a traceback."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from . import backbones
from .config import TrainConfig
from .data import HeadstartError

log = logging.getLogger("headstart")


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("headstart: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HeadstartError as e:
            click.echo(f"headstart: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("headstart: interrupted; cached features are kept, so running the same command again resumes", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="headstart")
def main() -> None:
    """Transfer learning on images: a folder of labelled photos in, an accurate classifier out."""


_DEFAULTS = TrainConfig()


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Run folder (default: runs/<data folder name>).")
@click.option("--backbone", default=_DEFAULTS.backbone, show_default=True, help="Registry name or any timm model name.")
@click.option("--weights", help="Local weight file (.safetensors or torch state dict) for the backbone.")
@click.option("--head", type=click.Choice(["auto", "mlp", "linear"]), default=_DEFAULTS.head, show_default=True)
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--val-fraction", type=float, default=_DEFAULTS.val_fraction, show_default=True, help="Used only when the folder has no val/ split.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default=_DEFAULTS.precision, show_default=True)
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True)
@click.option("--workers", type=int, default=_DEFAULTS.workers, show_default=True, help="Decode processes (-1: automatic).")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Feature cache (default: $HEADSTART_CACHE or ~/.cache/headstart).")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and the final summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
def train(data: Path, out: Path | None, quiet: bool, as_json: bool, **opts: Any) -> None:
    """Train a classifier on DATA (one sub-folder per class, or train/ + val/ split folders)."""
    from .train import train as run

    _setup_logging(quiet or as_json)
    out = out or _free_run_dir(Path("runs") / data.resolve().name)
    opts["cache_dir"] = str(opts["cache_dir"]) if opts["cache_dir"] else None
    clf = run(data, out=out, progress=not (quiet or as_json) and sys.stderr.isatty(), **opts)
    summary = {"run": str(out), "backbone": clf.backbone.spec.name, "head": clf.info["head"], "metrics": clf.info["metrics"],
               "skipped": len(clf.info["data"]["skipped"]), "timing": clf.info["timing"]}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _print_summary(clf, out)


def _print_summary(clf: Any, out: Path) -> None:
    for name, m in clf.info["metrics"].items():
        click.echo(f"{name}: accuracy {m['accuracy']:.1%}  balanced {m['balanced_accuracy']:.1%}  macro-F1 {m['macro_f1']:.3f}  ({m['n']} images)")
    t = clf.info["timing"]
    click.echo(f"{t['embeddings_computed']} embeddings computed, {t['total_s']:.1f} s in all; head: {clf.info['head']['kind']}")
    click.echo(f"saved to {out}  (predict: headstart predict {out} PHOTO.jpg)")


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
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def evaluate(run: Path, data: Path, out: Path | None, split: str | None, quiet: bool, as_json: bool) -> None:
    """Evaluate the trained model in RUN on another labelled folder DATA."""
    from .predict import load

    _setup_logging(quiet or as_json)
    m = load(run).evaluate(data, out=out, split=split, progress=not (quiet or as_json) and sys.stderr.isatty())
    for s in m["data"]["skipped"]:
        log.warning("skipped %s: %s", s["path"], s["reason"])
    if as_json:
        click.echo(json.dumps({k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "log_loss", "per_class")}, indent=2))
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
@click.option("--json", "as_json", is_flag=True, help="One JSON list.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV: path, label, probability (top-1), then the top-k.")
def predict(items: tuple[str, ...], imagenet: bool, backbone: str, weights: str | None, top_k: int, as_json: bool, as_csv: bool) -> None:
    """Predict: `headstart predict RUN PHOTO… ` or `headstart predict --imagenet PHOTO…` (folders are expanded)."""
    from .predict import load, predict_imagenet

    _setup_logging(True)
    if imagenet:
        preds = predict_imagenet(list(items), backbone=backbone, weights=weights, top_k=top_k)
    else:
        if len(items) < 2:
            raise HeadstartError("give a run folder and at least one image: headstart predict RUN PHOTO.jpg (or --imagenet PHOTO.jpg)")
        preds = load(items[0]).predict(list(items[1:]), top_k=top_k)
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
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def demo(out: Path, quiet: bool) -> None:
    """Train on the bundled demo photos (10 clothing types) and print the report."""
    from .demo import demo_data
    from .evaluate import format_report

    _setup_logging(quiet)
    folder = demo_data()
    log.info("demo data: %s", folder)
    from .train import train as run

    clf = run(folder, out=out, progress=not quiet and sys.stderr.isatty())
    _print_summary(clf, out)
    click.echo("\nvalidation report (" + str(out / "classification_report.txt") + "):")
    click.echo((out / "classification_report.txt").read_text(), nl=False)


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--backbones", "names", required=True, help="Comma-separated names, e.g. efficientnet_lite0,efficientnet_lite1,mobilenetv2.")
@click.option("--out", type=click.Path(path_type=Path), help="Folder for the leaderboard and one run per backbone (default: runs/<data>-compare).")
@click.option("--finetune", is_flag=True, help="Fine-tune each backbone too, not only train its head.")
@click.option("--require-pretrained", is_flag=True, help="Stop with an error when a backbone has no pretrained weights here (default: list it as skipped).")
@click.option("--head", type=click.Choice(["auto", "mlp", "linear"]), default=_DEFAULTS.head, show_default=True)
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default=_DEFAULTS.precision, show_default=True)
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True)
@click.option("--workers", type=int, default=_DEFAULTS.workers, show_default=True, help="Decode processes (-1: automatic).")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Feature cache (default: $HEADSTART_CACHE or ~/.cache/headstart).")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and the leaderboard.")
@click.option("--json", "as_json", is_flag=True, help="Print the leaderboard as JSON.")
def compare(data: Path, names: str, out: Path | None, quiet: bool, as_json: bool, **opts: Any) -> None:
    """Train each backbone on the same split of DATA and rank them (leaderboard, plot, report.html)."""
    from .compare import compare as run
    from .compare import format_table

    _setup_logging(quiet or as_json)
    out = out or _free_run_dir(Path("runs") / f"{data.resolve().name}-compare")
    opts["cache_dir"] = str(opts["cache_dir"]) if opts["cache_dir"] else None
    rows = run(data, names.split(","), out, progress=not (quiet or as_json) and sys.stderr.isatty(), **opts)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(format_table(rows), nl=False)
    for r in rows:
        if r["status"] != "ok":
            click.echo(f"{r['backbone']}: {r['status']} — {r.get('reason', '')}")
    click.echo(f"saved to {out}  (leaderboard.csv, accuracy_vs_latency.png, report.html)")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(run: Path) -> None:
    """(Re)build RUN/report.html from a run folder (train) or a comparison folder (compare)."""
    from .report import build_report

    click.echo(f"written {build_report(run)}")


@main.command("backbones")
@click.option("--json", "as_json", is_flag=True)
def list_backbones(as_json: bool) -> None:
    """The registry: names, timm models, input size and whether weights are available here."""
    import timm

    rows = []
    for spec in backbones.REGISTRY.values():
        cfg = timm.models.get_pretrained_cfg(spec.timm_name)
        size = cfg.input_size[-1] if cfg is not None else "?"
        rows.append({"name": spec.name, "timm": spec.timm_name, "input": size, "weights": backbones.availability(spec), "about": spec.about})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<19} {'timm model':<26} {'input':>5}  {'weights here':<36} about")
    for r in rows:
        click.echo(f"{r['name']:<19} {r['timm']:<26} {r['input']:>5}  {r['weights']:<36} {r['about']}")
    click.echo("\nAny timm model name works too (with --weights FILE offline).")


if __name__ == "__main__":
    main()
