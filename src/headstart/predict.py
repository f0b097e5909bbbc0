"""The trained-model bundle: save, load (safely, digest-checked), predict and evaluate.

A run folder holds ``config.json`` (backbone, weights digest, classes, preprocessing, metrics) and
``model.safetensors`` (backbone + head tensors). Nothing is pickled, so loading a bundle never runs code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from safetensors.numpy import save_file

from . import backbones, features
from .data import HeadstartError, Skipped, scan
from .files import atomic_path, atomic_write_text, sha256_file

if TYPE_CHECKING:  # imported where a network runs; applying a head to cached features needs numpy only
    from torch import nn

    from .ensemble import Ensemble

BUNDLE_FORMAT = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

HeadState = dict[str, np.ndarray]  # the head's tensors, keyed like its torch module's state dict (heads.make_head)


def head_logits(state: HeadState, x: np.ndarray) -> np.ndarray:
    """The head applied to pooled features: standardise → Linear (→ ReLU → Linear), dropout being off at inference."""
    z = (np.asarray(x, np.float32) - state["0.mean"]) / state["0.std"]
    z = z @ state["1.weight"].T + state["1.bias"]
    if "4.weight" in state:
        z = np.maximum(z, 0) @ state["4.weight"].T + state["4.bias"]
    return z


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), best first
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path}
        if self.error:
            d["error"] = self.error
        else:
            d["label"], d["probability"] = self.top[0]
            d["top"] = [{"label": c, "probability": round(p, 6)} for c, p in self.top]
        return d


class Classifier:
    """A backbone (frozen or fine-tuned) plus a trained head, and everything needed to use them later.

    The head is given as a torch module or as its arrays (``info["head"]`` says its shape); the module is made
    when first asked for, and from then on it is the head (fine-tuning or a test may change it in place). The
    arrays are kept, so a thread reading them while another builds the module still finds them.
    """

    def __init__(self, backbone: backbones.LoadedBackbone, head: nn.Module | HeadState, classes: list[str], info: dict[str, Any]):
        self.backbone, self.classes, self.info = backbone, list(classes), info
        self._head_module = head.eval() if not isinstance(head, dict) else None
        self._head_state = head if isinstance(head, dict) else None
        self.path: Path | None = None

    @property
    def head(self) -> nn.Sequential:
        if self._head_module is None:
            from .heads import to_module

            self._head_module = to_module(self.info["head"], len(self.classes), self._head_state)
        return self._head_module

    def head_state(self) -> HeadState:
        if self._head_module is not None:
            from .heads import to_arrays

            return to_arrays(self._head_module)
        return self._head_state

    # ---------------------------------------------------------------------------------------- inference

    def features(self, paths: Sequence[str | os.PathLike], *, use_cache: bool = True, progress: bool = False, root: Path | None = None, **kw: Any) -> features.Features:
        settings = self.info.get("train_config", {})  # as asked at training time: the same runtime choice is made again
        return features.extract([Path(p) for p in paths], self.backbone, use_cache=use_cache, progress=progress, root=root,
                                precision=settings.get("precision", "auto"), runtime=settings.get("runtime", "auto"), **kw)

    def proba_from_features(self, x: np.ndarray) -> np.ndarray:
        return softmax(head_logits(self.head_state(), x))

    def proba(self, paths: Sequence[Path], *, engine: str = "pytorch", use_cache: bool = True, progress: bool = False,
              root: Path | None = None) -> tuple[np.ndarray, features.Features]:
        """Class probabilities of the images that decode (rows follow ``f.ok``), computed by PyTorch (backbone
        at the run's precision, then the head) or by ONNX Runtime on the exported ``model.onnx`` (fp32)."""
        if engine == "onnxruntime":
            from .export import open_for

            f = open_for(self).proba(list(paths), root=root)
            return f.x, f
        if engine != "pytorch":
            raise HeadstartError(f"unknown engine '{engine}': use pytorch or onnxruntime")
        f = self.features(paths, use_cache=use_cache, progress=progress, root=root)
        return self.proba_from_features(f.x), f

    def predict(self, paths: Sequence[str | os.PathLike], top_k: int = 5, progress: bool = False, engine: str = "pytorch") -> list[Prediction]:
        """Top-k classes for each image; an unreadable image gets an ``error`` instead of a crash."""
        return predict_images(self, paths, top_k, progress, engine)

    def evaluate(self, folder: str | os.PathLike | None = None, out: str | os.PathLike | None = None, split: str | None = None, progress: bool = False,
                 engine: str = "pytorch") -> dict[str, Any]:
        """Metrics on another labelled folder (its test split, else val, else all of it); without a folder,
        the metrics recorded at training time."""
        return evaluate_folder(self, folder, out, split, progress, engine)

    # ------------------------------------------------------------------------------------------ bundle

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every tensor of the bundle as numpy arrays: built from the cache alone when the backbone never ran."""
        sd = {f"backbone.{k}": v for k, v in self.backbone.state_arrays().items()}
        return sd | {f"head.{k}": v for k, v in self.head_state().items()}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the bundle atomically: weights first, then the config that names their digest."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / MODEL_FILE) as tmp:
            save_file(self.state_dict(), str(tmp), metadata={"format": "headstart"})
        cfg = {
            "format": BUNDLE_FORMAT,
            "backbone": {
                "name": self.backbone.spec.name,
                "timm_name": self.backbone.spec.timm_name,
                "kwargs": self.backbone.spec.kwargs,
                "cfg_overlay": self.backbone.spec.cfg_overlay,
                "num_classes": self.backbone.num_classes,
                "weights_source": self.backbone.source,
                "weights_digest": self.backbone.digest,
            },
            "preprocess": self.backbone.data_config,
            "classes": self.classes,
            "model_sha256": sha256_file(folder / MODEL_FILE),
            **self.info,
        }
        atomic_write_text(folder / CONFIG_FILE, json.dumps(cfg, indent=2, default=str))
        self.path = folder
        return folder


def load(folder: str | os.PathLike) -> Classifier | Ensemble:
    """A saved run (``Classifier``) or ensemble of runs (``ensemble.Ensemble``): both predict and evaluate."""
    from . import ensemble

    return ensemble.load(folder) if ensemble.is_ensemble(folder) else load_run(folder)


def load_run(folder: str | os.PathLike) -> Classifier:
    """A saved bundle; refused with a clear error when its files are missing, altered or inconsistent."""
    folder = Path(folder)
    cfg_path, model_path = folder / CONFIG_FILE, folder / MODEL_FILE
    if (folder / "ensemble.json").is_file():
        members = ", ".join(sorted(p.name for p in (folder / "members").glob("*")))
        raise HeadstartError(f"'{folder}' is an ensemble: this takes one network, one of its members in {folder / 'members'} ({members})")
    if not cfg_path.is_file() or not model_path.is_file():
        raise HeadstartError(f"'{folder}' is not a headstart model folder (needs {CONFIG_FILE} and {MODEL_FILE}); train one with `headstart train`")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, OSError) as e:
        raise HeadstartError(f"'{cfg_path}' is not valid JSON ({e}); the bundle is damaged — retrain or restore it") from None
    if cfg.get("format") != BUNDLE_FORMAT:
        raise HeadstartError(f"'{folder}' was written by an incompatible headstart (format {cfg.get('format')})")
    if sha256_file(model_path) != cfg.get("model_sha256"):
        raise HeadstartError(f"'{model_path}' does not match the digest in {CONFIG_FILE}: the weights were changed or damaged; refusing to load")
    from safetensors.torch import load_file

    from .heads import make_head

    b = cfg["backbone"]
    spec = backbones.Backbone(b["name"], b["timm_name"], "from bundle", kwargs=b.get("kwargs", {}), cfg_overlay=b.get("cfg_overlay", {}))
    try:
        sd = load_file(str(model_path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a file that is not safetensors
        raise HeadstartError(f"'{model_path}' is not a safetensors file ({e}); refusing to load — retrain or restore the bundle") from None
    model = backbones.create(spec, num_classes=b.get("num_classes", 0))
    head_cfg = cfg["head"]
    head = make_head(head_cfg["kind"], head_cfg["dim"], len(cfg["classes"]), head_cfg.get("hidden", 256), head_cfg.get("dropout", 0.5))
    try:
        model.load_state_dict({k[9:]: v for k, v in sd.items() if k.startswith("backbone.")}, strict=True)
        head.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("head.")}, strict=True)
    except RuntimeError as e:
        raise HeadstartError(f"'{model_path}' does not fit its {CONFIG_FILE} ({' '.join(str(e).split())[:200]}); refusing to load") from None
    lb = backbones.LoadedBackbone(spec, model.eval(), cfg["preprocess"], b["weights_source"], b["weights_digest"],
                                  backbones.embedding_dim(model), b.get("num_classes", 0))
    info = {k: v for k, v in cfg.items() if k not in ("format", "backbone", "preprocess", "classes", "model_sha256")}
    clf = Classifier(lb, head, cfg["classes"], info)
    clf.path = folder
    return clf


# What predicts and evaluates needs of a model: ``classes``, ``info`` and ``proba(paths, engine=, use_cache=,
# progress=, root=)``. A Classifier has them, and so has an ensemble of classifiers (ensemble.py).


def predict_images(model: Any, paths: Sequence[str | os.PathLike], top_k: int = 5, progress: bool = False, engine: str = "pytorch") -> list[Prediction]:
    paths = expand_images(paths)
    proba, f = model.proba(paths, engine=engine, use_cache=False, progress=progress)
    return _rank(paths, f, proba, model.classes, top_k)


def evaluate_folder(model: Any, folder: str | os.PathLike | None = None, out: str | os.PathLike | None = None, split: str | None = None,
                    progress: bool = False, engine: str = "pytorch") -> dict[str, Any]:
    from . import evaluate as ev

    if folder is None:
        return model.info.get("metrics", {})
    ds = scan(folder, classes=model.classes)
    name = split or next(s for s in ("test", "val", "all", "train") if s in ds.splits)
    if name not in ds.splits:
        raise HeadstartError(f"'{folder}' has no '{name}' split; it has {', '.join(ds.splits)}")
    s = ds.splits[name]
    proba, f = model.proba(s.paths, engine=engine, progress=progress, root=ds.root)
    y = np.asarray(s.labels)[f.ok]
    kept = [p for p, ok in zip(s.paths, f.ok) if ok]
    metrics = ev.evaluate(y, proba, model.classes, [str(p) for p in kept])
    metrics["data"] = {"folder": str(ds.root), "split": name, "images": int(f.ok.sum()), "engine": engine,
                       "skipped": [vars(k) for k in ds.skipped + f.skipped]}
    if out is not None:
        ev.write(metrics, Path(out))
    return metrics


def predict_imagenet(paths: Sequence[str | os.PathLike], backbone: str = backbones.DEFAULT, weights: str | None = None, top_k: int = 5, precision: str = "auto") -> list[Prediction]:
    """The raw pretrained network with its 1000 ImageNet classes: a quick check that the weights are right."""
    import torch
    from timm.data import ImageNetInfo

    lb = backbones.load(backbone, weights)
    if getattr(lb.model, "num_classes", 0) != 1000:
        raise HeadstartError(f"the weights for '{backbone}' have no ImageNet classifier (headless file); give a full ImageNet checkpoint")
    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(1000)]
    paths = expand_images(paths)
    model = features.prepare(lb.model)
    tf = features.eval_transform(lb.data_config)
    from .data import open_rgb

    good, errors, tensors = [], {}, []
    for i, p in enumerate(paths):
        try:
            tensors.append(tf(open_rgb(p, features.decode_size(lb.data_config))))
            good.append(i)
        except ValueError as e:
            errors[i] = str(e)
    proba = np.zeros((0, 1000), np.float32)
    if tensors:
        with torch.inference_mode(), features.autocast(features.resolve_precision(precision)):
            logits = model(torch.stack(tensors).contiguous(memory_format=torch.channels_last))
        proba = torch.softmax(logits.float(), 1).numpy()
    ok = np.zeros(len(paths), bool)
    ok[good] = True
    f = features.Features(proba, ok, [Skipped(str(paths[i]), e) for i, e in errors.items()])
    return _rank(paths, f, proba, names, top_k)


def expand_images(items: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to the images inside them (sorted)."""
    from .data import IMAGE_EXTENSIONS

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in q.relative_to(p).parts))
        else:
            out.append(p)
    if not out:
        raise HeadstartError("no images given: pass image files or folders that contain images")
    return out


def _rank(paths: Sequence[Path], f: features.Features, proba: np.ndarray, names: Sequence[str], top_k: int) -> list[Prediction]:
    errors = {s.path: s.reason for s in f.skipped}
    out, row = [], 0
    for p, ok in zip(paths, f.ok):
        if not ok:
            out.append(Prediction(str(p), error=errors.get(str(p), "cannot decode")))
            continue
        order = np.argsort(-proba[row])[:top_k]
        out.append(Prediction(str(p), [(names[j], float(proba[row, j])) for j in order]))
        row += 1
    return out
