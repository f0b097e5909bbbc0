"""The models that predict: a trained run (``Classifier``), an average of runs (``Ensemble``), the deployed ONNX
graph of a run (``OnnxModel``), and the raw ImageNet network (``predict_imagenet``); saving and loading them.

A run folder holds ``config.json`` (backbone, weights digest, classes, preprocessing, metrics) and
``model.safetensors`` (backbone + head tensors). Nothing is pickled, so loading a bundle never runs code.
Every model answers ``proba(paths, engine=, use_cache=, progress=, root=)``, and ``predict_images`` /
``evaluate_folder`` turn that into ranked predictions or metrics, for any of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

from . import backbones, evaluate, features, heads, onnx, transforms
from .data import IMAGE_EXTENSIONS, HeadstartError, Skipped, open_rgb, scan
from .files import atomic_path, atomic_write_text, sha256_file
from .heads import HeadState

if TYPE_CHECKING:  # imported where a network runs; applying a head to cached features needs numpy only
    from torch import nn

BUNDLE_FORMAT = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
INT8_FILE = "features.int8.onnx"  # an int8 run's quantized backbone: calibrated on its training photos, not remade elsewhere
ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = 1


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
            self._head_module = heads.to_torch(self.info["head"], len(self.classes), self._head_state)
        return self._head_module

    def head_state(self) -> HeadState:
        if self._head_module is not None:
            return heads.to_arrays(self._head_module)
        return self._head_state

    # ---------------------------------------------------------------------------------------- inference

    def features(self, paths: Sequence[str | os.PathLike], *, use_cache: bool = True, progress: bool = False, root: Path | None = None, **kw: Any) -> features.Features:
        settings = self.info.get("train_config", {})  # as asked at training time: the same runtime choice is made again
        precision, made = settings.get("precision", "auto"), self.info.get("features", {})
        if made.get("runtime") == "onnxruntime":  # the head learnt ONNX Runtime's embeddings: the same precision and graph
            precision = made.get("precision", "fp32")
        calibration = onnx.Calibration(tuple(made["calibration"])) if made.get("calibration") else None
        kw.setdefault("cache_dir", settings.get("cache_dir"))  # the run's cache: its exported (and int8) graphs are there
        if calibration and self.path is not None and (self.path / INT8_FILE).is_file():  # a run moved here: its own graph
            onnx.keep_int8_graph(self.backbone, calibration, self.path / INT8_FILE, kw["cache_dir"])
        return features.extract([Path(p) for p in paths], self.backbone, use_cache=use_cache, progress=progress, root=root,
                                precision=precision, runtime=settings.get("runtime", "auto"), calibration=calibration, **kw)

    def proba_from_features(self, x: np.ndarray) -> np.ndarray:
        return heads.proba(self.info["head"], self.head_state(), x)

    def proba(self, paths: Sequence[Path], *, engine: str = "pytorch", use_cache: bool = True, progress: bool = False,
              root: Path | None = None) -> tuple[np.ndarray, features.Features]:
        """Class probabilities of the images that decode (rows follow ``f.ok``), computed by PyTorch (backbone
        at the run's precision, then the head) or by ONNX Runtime on the exported ``model.onnx`` (fp32)."""
        if engine == "onnxruntime":
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
        calibration = self.info.get("features", {}).get("calibration")
        graph = calibration and onnx.int8_graph(self.backbone, onnx.Calibration(tuple(calibration)),
                                                self.info.get("train_config", {}).get("cache_dir"))
        if graph:
            with atomic_path(folder / INT8_FILE) as tmp:
                tmp.write_bytes(graph)
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


def graph_gradcam(clf: Classifier, photo: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """The photo as the model sees it (H, W, 3 uint8) and the Grad-CAM heat (H, W in [0, 1]) of its predicted class
    at the map the backbone's global pooling reads, from the cached feature graph: the pooling spreads a class
    score's gradient evenly over that map, so each channel's Grad-CAM weight is the head's input gradient
    (``heads.input_gradient``) and neither torch nor the network's build is needed. None when the graph is not
    cached for these weights or its embedding is not such a pooling (``explain.gradcam`` then runs in PyTorch)."""
    session = onnx.map_session(clf.backbone, clf.info.get("train_config", {}).get("cache_dir"))
    if session is None:
        return None
    cfg = clf.backbone.data_config
    pixels = transforms.pixel_transform(cfg)(open_rgb(photo, transforms.decode_size(cfg)))
    emb, fmap = session.run(None, {"pixels": pixels[None]})
    spec, state = clf.info["head"], clf.head_state()
    c = int(heads.logits(spec, state, emb)[0].argmax())
    cam = np.maximum(np.tensordot(heads.input_gradient(spec, state, emb[0], c), fmap[0], axes=1), 0).astype(np.float32)
    heat = np.asarray(Image.fromarray(cam, mode="F").resize(pixels.shape[1::-1], Image.Resampling.BILINEAR))
    peak = float(heat.max())
    return pixels, (heat / peak if peak > 0 else heat).astype(np.float32)


def load(folder: str | os.PathLike) -> Classifier | Ensemble:
    """A saved run (``Classifier``) or ensemble of runs (``Ensemble``): both predict and evaluate."""
    return load_ensemble(folder) if is_ensemble(folder) else load_run(folder)


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
    from safetensors.numpy import load_file

    b = cfg["backbone"]
    spec = backbones.from_bundle(b["name"], b["timm_name"], b.get("kwargs", {}), b.get("cfg_overlay", {}))
    try:
        sd = load_file(str(model_path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a file that is not safetensors
        raise HeadstartError(f"'{model_path}' is not a safetensors file ({e}); refusing to load — retrain or restore the bundle") from None
    head = {k[5:]: v for k, v in sd.items() if k.startswith("head.")}
    want = heads.shapes(cfg["head"], len(cfg["classes"]))
    got = {k: tuple(v.shape) for k, v in head.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:2]
        raise HeadstartError(f"'{model_path}' does not fit its {CONFIG_FILE} (head tensors {diff}); refusing to load")
    arrays = {k[9:]: v for k, v in sd.items() if k.startswith("backbone.")}

    def build() -> nn.Module:
        import torch

        model = backbones.create(spec, num_classes=b.get("num_classes", 0))
        try:
            model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
        except RuntimeError as e:
            raise HeadstartError(f"'{model_path}' does not fit its {CONFIG_FILE} ({' '.join(str(e).split())[:200]}); refusing to load") from None
        return model.eval()

    # The network is built when something runs through it. A cached ONNX graph of this architecture with these
    # weights proves they fit, and answers a prediction without torch or timm; without one, build it now, so a
    # bundle that does not fit its config is refused here rather than at first use.
    lb = backbones.LoadedBackbone(spec, None, cfg["preprocess"], b["weights_source"], b["weights_digest"], int(cfg["head"]["dim"]),
                                  b.get("num_classes", 0), build=build, arrays=arrays)
    if not onnx.has_feature_graph(lb, cfg.get("train_config", {}).get("cache_dir")):  # where the run's graphs are
        _ = lb.model  # built, and checked against the config
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
    metrics = evaluate.evaluate(y, proba, model.classes, [str(p) for p in kept], split=f"'{ds.root}' ({name})")
    metrics["data"] = {"folder": str(ds.root), "split": name, "images": int(f.ok.sum()), "engine": engine,
                       "skipped": [vars(k) for k in ds.skipped + f.skipped]}
    if out is not None:
        evaluate.write(metrics, Path(out))
    return metrics


def predict_imagenet(paths: Sequence[str | os.PathLike], backbone: str = backbones.DEFAULT, weights: str | None = None, top_k: int = 5,
                     precision: str = "auto", runtime: str = "auto") -> list[Prediction]:
    """The raw pretrained network with its 1000 ImageNet classes: a quick check that the weights are right.

    The same runtime choice as every other prediction (ONNX Runtime fp32 on a CPU), so its numbers agree with
    ``explain --imagenet`` (PyTorch fp32) to the printed digit."""
    from timm.data import ImageNetInfo

    lb = backbones.load(backbone, weights)
    if lb.num_classes != 1000:
        raise HeadstartError(f"the weights for '{backbone}' have no ImageNet classifier (headless file); give a full ImageNet checkpoint")
    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(1000)]
    paths = expand_images(paths)
    f = features.extract(paths, lb, use_cache=False, progress=False, precision=precision, runtime=runtime, output="logits")
    return _rank(paths, f, heads.softmax(f.x), names, top_k)


def expand_images(items: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to the images inside them (sorted)."""
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


# ----------------------------------------------------------------------------------------------- ensembles


@dataclass(repr=False)
class Ensemble:
    """Several runs trained on the same photos and classes, their class probabilities averaged (``ensemble.build``
    makes one). It predicts and evaluates like a single run."""

    members: list[Classifier]
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __repr__(self) -> str:
        return f"Ensemble({' + '.join(m.backbone.spec.name for m in self.members)}, classes={self.classes}, path={self.path})"

    @property
    def classes(self) -> list[str]:
        return self.members[0].classes

    def proba(self, paths: Sequence[Path], *, engine: str = "pytorch", use_cache: bool = True, progress: bool = False,
              root: Path | None = None) -> tuple[np.ndarray, features.Features]:
        """The members' mean probabilities for the images every member could read (rows follow ``f.ok``)."""
        parts = [m.proba(paths, engine=engine, use_cache=use_cache, progress=progress, root=root) for m in self.members]
        ok = np.logical_and.reduce([f.ok for _, f in parts])
        mean = sum(p[ok[f.ok]] for p, f in parts) / len(parts)
        skipped = list({s.path: s for _, f in parts for s in f.skipped}.values())
        return mean, features.Features(mean, ok, skipped, sum(f.computed for _, f in parts), sum(f.seconds for _, f in parts),
                                       parts[0][1].runtime)

    def predict(self, paths: Sequence[str | os.PathLike], top_k: int = 5, progress: bool = False, engine: str = "pytorch") -> list[Prediction]:
        return predict_images(self, paths, top_k, progress, engine)

    def evaluate(self, folder: str | os.PathLike | None = None, out: str | os.PathLike | None = None, split: str | None = None,
                 progress: bool = False, engine: str = "pytorch") -> dict[str, Any]:
        return evaluate_folder(self, folder, out, split, progress, engine)

    def save(self, folder: str | os.PathLike) -> Path:
        """Members first, then the record that names them: a reader finds a whole ensemble or none."""
        folder = Path(folder)
        names = [f"{i + 1}-{m.backbone.spec.name}" for i, m in enumerate(self.members)]
        for name, m in zip(names, self.members):
            m.save(folder / "members" / name)
        record = {"format": ENSEMBLE_FORMAT, "classes": self.classes, "members": [f"members/{n}" for n in names], **self.info}
        atomic_write_text(folder / ENSEMBLE_FILE, json.dumps(record, indent=2, default=str))
        self.path = folder
        return folder


def load_ensemble(folder: str | os.PathLike) -> Ensemble:
    """An ensemble folder written by ``Ensemble.save``; each member is checked as ``load_run`` checks a run."""
    folder = Path(folder)
    try:
        record = json.loads((folder / ENSEMBLE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise HeadstartError(f"'{folder / ENSEMBLE_FILE}' cannot be read ({e}); rebuild it with `headstart ensemble`") from None
    if record.get("format") != ENSEMBLE_FORMAT:
        raise HeadstartError(f"'{folder}' was written by an incompatible headstart (ensemble format {record.get('format')})")
    members = [load_run(folder / m) for m in record["members"]]
    info = {k: v for k, v in record.items() if k not in ("format", "classes", "members")}
    return Ensemble(members, info, folder)


def is_ensemble(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ENSEMBLE_FILE).is_file()


# ------------------------------------------------------------------------------- the exported ONNX graph


class OnnxModel:
    """An exported run folder opened with ONNX Runtime: the ``--engine onnxruntime`` path of predict and evaluate."""

    def __init__(self, folder: str | os.PathLike, bundle_sha256: str | None = None):
        onnx.need_ort()
        folder = Path(folder)
        onnx_path, meta_path = folder / onnx.ONNX_FILE, folder / onnx.META_FILE
        if not onnx_path.is_file() or not meta_path.is_file():
            raise HeadstartError(f"'{folder}' has no exported model ({onnx.ONNX_FILE} + {onnx.META_FILE}): run `headstart export {folder}` first")
        self.meta = json.loads(meta_path.read_text())
        if sha256_file(onnx_path) != self.meta.get("onnx_sha256"):
            raise HeadstartError(f"'{onnx_path}' does not match {onnx.META_FILE}: it was changed or damaged; run `headstart export` again")
        if bundle_sha256 is not None and self.meta.get("bundle_sha256") != bundle_sha256:
            raise HeadstartError(f"'{onnx_path}' was exported from another version of this run's weights: run `headstart export {folder}` again")
        self.classes: list[str] = self.meta["classes"]
        self.data_config: dict[str, Any] = self.meta["preprocess"]["timm_data_config"]
        self.session = onnx.session(onnx_path)

    def proba_array(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": np.ascontiguousarray(x, np.float32)})[0]

    def proba(self, paths: Sequence[Path], *, batch_size: int = 32, workers: int = -1, root: Path | None = None) -> features.Features:
        """Probabilities for the photos that decode, as ``Features`` whose ``x`` holds probabilities (rows follow ``ok``)."""
        start = time.perf_counter()
        rows, ok, skipped = [], np.zeros(len(paths), bool), []
        for idx, batch, bad in features.normalized_batches(paths, self.data_config, batch_size, workers):
            if batch is not None:
                rows.append(self.proba_array(batch))
                ok[idx] = True
            skipped += [Skipped(features.shown_path(paths[j], root), err) for j, err in bad]
        x = np.concatenate(rows) if rows else np.zeros((0, len(self.classes)), np.float32)
        return features.Features(x, ok, skipped, computed=int(ok.sum()), seconds=time.perf_counter() - start)


def open_for(clf: Classifier) -> OnnxModel:
    """The exported model that belongs to a loaded bundle (same folder, same weights)."""
    if clf.path is None:
        raise HeadstartError("this classifier is not saved: save it and run `headstart export RUN` before using --engine onnxruntime")
    sha = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        sha = json.loads((clf.path / CONFIG_FILE).read_text())["model_sha256"]
    return OnnxModel(clf.path, sha)
