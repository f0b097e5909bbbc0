"""Export a trained bundle for deployment: one ONNX graph, image → class probabilities, checked against PyTorch.

The exported folder holds ``model.onnx`` and ``onnx_meta.json`` (class names, preprocessing, provenance). The
same facts are stored inside the ONNX file as ``metadata_props``, so the ``.onnx`` alone is enough for a
consumer. Nothing is written unless ONNX Runtime reproduces PyTorch's fp32 probabilities on real photos.

The same machinery builds the graph ``features`` runs for extraction (``embedding_onnx``): uint8 pixels →
pooled embedding, checked against PyTorch before it is used.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import timm
import torch
from torch import nn

from . import backbones, features
from .data import HeadstartError, Skipped, scan
from .files import atomic_path, atomic_write_text, sha256_file
from .predict import CONFIG_FILE, Classifier, load_run

ONNX_FILE = "model.onnx"
META_FILE = "onnx_meta.json"
META_FORMAT = 1
# Opset 17 (2022): run by every ONNX Runtime since 1.11, TensorRT 8.6+, OpenVINO 2023+, onnxruntime-web and
# CoreML/TFLite converters. These CNNs need no newer operator, so a newer opset would only shut out older runtimes.
OPSET = 17
ATOL = 1e-4  # largest accepted |p_onnx - p_torch| (fp32 both sides)
CHECK_IMAGES = 8  # photos run through both engines at export time


EMBED_RTOL = 1e-3  # largest accepted |e_onnx - e_torch| / max|e_torch| for the extraction graph


class ExportError(HeadstartError):
    """The ONNX graph could not be built, or ONNX Runtime does not reproduce PyTorch."""


def _need_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxruntime (headstart dependencies): pip install onnx onnxruntime") from None
    return onnx, onnxruntime


class Probabilities(nn.Module):
    """The whole classifier as one module: pixels → backbone → pooled features → head → softmax."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.forward_head(self.backbone.forward_features(image), pre_logits=True)
        return torch.softmax(self.head(pooled), dim=1)


def probabilities_module(clf: Classifier) -> Probabilities:
    """A fresh fp32, contiguous copy of the classifier, built with timm's export-friendly layers.

    ``exportable=True`` makes timm pick plain activations instead of its custom-autograd memory-efficient ones
    (which an exporter cannot see into). TF "same" padding (EfficientNet-Lite, the Keras MobileNets) is computed
    from the input size; the input size is fixed here, so the traced pads are constants and the graph is static
    apart from the batch dimension.
    """
    # eval() on the wrapper too: the exporter restores the top module's mode, and a new module starts in training.
    return Probabilities(exportable_copy(clf.backbone), copy.deepcopy(clf.head).float()).eval().to(memory_format=torch.contiguous_format)


def exportable_copy(lb: backbones.LoadedBackbone) -> nn.Module:
    """The backbone rebuilt with export-friendly layers, same weights, fp32, static padding."""
    with timm.layers.set_layer_config(exportable=True, no_jit=True):
        model = backbones.create(lb.spec, num_classes=int(getattr(lb.model, "num_classes", 0)))
    model.load_state_dict(lb.model.state_dict(), strict=True)
    return static_same_padding(model.float().eval(), lb.data_config["input_size"]).to(memory_format=torch.contiguous_format)


class Embeddings(nn.Module):
    """uint8 NHWC pixels → normalised NCHW → pooled embedding: the extraction graph ONNX Runtime runs."""

    def __init__(self, backbone: nn.Module, data_config: dict[str, Any]):
        super().__init__()
        self.backbone, self.data_config = backbone, data_config

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = features.normalize(pixels, self.data_config)
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)


def embedding_onnx(lb: backbones.LoadedBackbone) -> bytes:
    """The backbone as an ONNX graph (input ``pixels``, uint8 N×H×W×3; output ``embedding``), after checking
    that ONNX Runtime reproduces PyTorch fp32 on a few synthetic images. Raises ``ExportError`` otherwise."""
    _, ort = _need_onnx()
    h, w = (int(v) for v in lb.data_config["input_size"][-2:])
    try:
        module = Embeddings(exportable_copy(lb), lb.data_config).eval()
        data = to_onnx(module, torch.zeros(2, h, w, 3, dtype=torch.uint8), "pixels", "embedding")
        # smooth gradients plus noise: real-image-like statistics without reading any photo
        g = np.random.default_rng(0)
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, None, :, None]
        check = np.clip(ramp * g.uniform(0.3, 1, (3, 1, 1, 3)) + g.normal(0, 25, (3, h, w, 3)), 0, 255).astype(np.uint8)
        with torch.inference_mode():
            want = module(torch.from_numpy(check)).numpy()
        got = _session(ort, data).run(None, {"pixels": check})[0]
    except Exception as e:  # noqa: BLE001 - any exporter/runtime failure means: use PyTorch instead
        raise ExportError(f"export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    err = float(np.abs(got - want).max() / max(1e-6, float(np.abs(want).max())))
    if not err <= EMBED_RTOL:
        raise ExportError(f"ONNX Runtime differs from PyTorch by {err:.2g} of the embedding scale (> {EMBED_RTOL:g})")
    return data


def static_same_padding(model: nn.Module, input_size: Sequence[int]) -> nn.Module:
    """Replace timm's ``Conv2dSame`` (TF "same" pads recomputed from the input's shape on every call, which
    exports as Shape/Ceil/Pad arithmetic) by a constant ``ZeroPad2d`` + ``Conv2d`` for this fixed input size,
    so the graph is static apart from the batch dimension."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sizes[name] = tuple(args[0].shape[-2:])
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if isinstance(m, Conv2dSame)]
    with torch.no_grad():
        model.forward_features(torch.zeros(1, *input_size))
    for h in hooks:
        h.remove()
    for name, hw in sizes.items():
        old = model.get_submodule(name)
        conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, 0, old.dilation, old.groups, old.bias is not None)
        conv.load_state_dict(old.state_dict())
        parent, _, child = name.rpartition(".")
        pad = pad_same_arg(list(hw), list(old.kernel_size), list(old.stride), list(old.dilation))
        setattr(model.get_submodule(parent), child, nn.Sequential(nn.ZeroPad2d(pad), conv))
    return model


def to_onnx(module: nn.Module, example: torch.Tensor, input_name: str = "image", output_name: str = "probabilities") -> bytes:
    """The traced ONNX graph, batch dimension dynamic.

    The TorchScript exporter (``dynamo=False``) is used on purpose: it exports these CNNs in under a second and
    needs nothing beyond torch, while the torch.export-based one needs ``onnxscript`` and minutes-long tracing and
    emits opset 18+ only. It is deprecated (a warning, silenced here) but present in every torch this package
    allows (<2.15); the parity check below catches any mistranslation either way.
    """
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=OPSET, input_names=[input_name],
                          output_names=[output_name], dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                          do_constant_folding=True)
    return buf.getvalue()


def preprocess_info(data_config: dict[str, Any]) -> dict[str, Any]:
    """timm's eval preprocessing spelled out, so a consumer without timm can reproduce it."""
    size = int(data_config["input_size"][-1])
    crop_pct = float(data_config.get("crop_pct", 0.875))
    return {
        "input_size": [int(v) for v in data_config["input_size"]],  # C, H, W
        "resize_shorter_side": int(np.floor(size / crop_pct)),  # keep the aspect ratio
        "crop_pct": crop_pct,
        "crop_mode": data_config.get("crop_mode", "center"),
        "interpolation": data_config.get("interpolation", "bicubic"),
        "mean": [float(v) for v in data_config["mean"]],
        "std": [float(v) for v in data_config["std"]],
        "scale": "pixels / 255, then (x - mean) / std, RGB, NCHW float32",
        "timm_data_config": data_config,
    }


@dataclass
class ExportResult:
    onnx_path: Path
    meta_path: Path
    max_diff: float  # largest |p_onnx - p_torch| over the check images and classes
    images: int  # how many photos the check used
    top1_agree: bool


def export_onnx(run: str | os.PathLike, out: str | os.PathLike | None = None,
                check_images: Sequence[str | os.PathLike] | None = None, atol: float = ATOL) -> ExportResult:
    """Write ``out/model.onnx`` (default: into the run folder) after checking it against PyTorch on real photos.

    Raises ``HeadstartError`` and writes nothing when the ONNX Runtime probabilities differ by more than ``atol``.
    """
    onnx, ort = _need_onnx()
    clf = load_run(run)
    out = Path(out) if out is not None else Path(run)
    bundle_sha = json.loads((Path(run) / CONFIG_FILE).read_text())["model_sha256"]
    module = probabilities_module(clf)
    pre = preprocess_info(clf.backbone.data_config)
    model = onnx.load_model_from_string(to_onnx(module, torch.zeros(2, *pre["input_size"])))
    onnx.checker.check_model(model)
    meta = {
        "format": META_FORMAT,
        "classes": clf.classes,
        "preprocess": pre,
        "input": "image", "output": "probabilities", "opset": OPSET,
        "backbone": {"name": clf.backbone.spec.name, "timm_name": clf.backbone.spec.timm_name, "weights_digest": clf.backbone.digest},
        "head": clf.info.get("head", {}).get("kind"),
        "bundle_sha256": bundle_sha,
    }
    for key, value in (("classes", clf.classes), ("preprocess", pre), ("headstart", meta)):
        model.metadata_props.add(key=key, value=json.dumps(value))
    model.doc_string = f"headstart classifier: {len(clf.classes)} classes, image (N,3,H,W) -> probabilities (N,{len(clf.classes)})"
    data = model.SerializeToString()

    paths = _check_paths(clf, check_images)
    x, ok, _ = _decode(paths, clf.backbone.data_config)
    if not ok.any():
        raise HeadstartError(f"none of the {len(paths)} check images could be decoded: give readable photos with check_images / --check-images")
    with torch.inference_mode():
        want = module(torch.from_numpy(x)).numpy()
    session = _session(ort, data)
    got = np.concatenate([session.run(None, {"image": x[:1]})[0], session.run(None, {"image": x[1:]})[0]]) if len(x) > 1 else session.run(None, {"image": x})[0]
    diff = float(np.abs(got - want).max())
    top1 = bool((got.argmax(1) == want.argmax(1)).all())
    if not diff <= atol:  # also refuses NaN
        raise HeadstartError(
            f"ONNX Runtime disagrees with PyTorch on {len(x)} check images: max probability difference {diff:.3g} > {atol:g}; "
            f"'{out / ONNX_FILE}' was not written. The run itself is fine (use --engine pytorch); please report this with the "
            f"backbone ({clf.backbone.spec.timm_name}) and the torch/onnxruntime versions."
        )
    meta |= {"parity": {"images": int(len(x)), "max_abs_diff": diff, "atol": atol, "reference": "PyTorch fp32"},
             "onnx_sha256": hashlib.sha256(data).hexdigest()}
    # model first, then the meta that names its digest: an interrupted export is detected, never half-trusted
    with atomic_path(out / ONNX_FILE) as tmp:
        tmp.write_bytes(data)
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2))
    return ExportResult(out / ONNX_FILE, out / META_FILE, diff, int(len(x)), top1)


def _check_paths(clf: Classifier, given: Sequence[str | os.PathLike] | None) -> list[Path]:
    """Photos for the parity check: the ones given, else a spread of the bundle's own validation photos."""
    if given:
        from .predict import expand_images

        return expand_images(given)
    root = clf.info.get("data", {}).get("root")
    if not root or not Path(root).is_dir():
        raise HeadstartError(f"the training photos ({root}) are not here for the parity check: give a few photos with --check-images")
    ds = scan(root, classes=clf.classes)
    split = ds.splits.get("val") or ds.splits.get("test") or next(iter(ds.splits.values()))
    pick = np.unique(np.linspace(0, len(split) - 1, min(CHECK_IMAGES, len(split))).round().astype(int))
    return [split.paths[i] for i in pick]


def _session(ort, model: bytes | str | os.PathLike):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=["CPUExecutionProvider"])


def _decode(paths: Sequence[Path], data_config: dict[str, Any], batch_size: int = 32, workers: int = -1, root: Path | None = None):
    """The same decode and timm eval preprocessing the PyTorch path uses, as one float32 NCHW array (rows follow ``ok``)."""
    arrays, ok, skipped = [], np.zeros(len(paths), bool), []
    for idx, batch, bad in _batches(paths, data_config, batch_size, workers):
        if batch is not None:
            arrays.append(batch)
            ok[idx] = True
        skipped += [Skipped(features._show(paths[j], root), err) for j, err in bad]
    size = [int(v) for v in data_config["input_size"]]
    x = np.concatenate(arrays) if arrays else np.zeros((0, *size), np.float32)
    return np.ascontiguousarray(x, np.float32), ok, skipped


def _batches(paths: Sequence[Path], data_config: dict[str, Any], batch_size: int, workers: int):
    """Normalised float32 NCHW batches: the deployed graph's input format."""
    for idx, pixels, bad in features.decoded_batches(list(paths), data_config, batch_size, workers):
        x = None if pixels is None else np.ascontiguousarray(features.normalize(torch.from_numpy(pixels), data_config).numpy())
        yield idx, x, bad


# --------------------------------------------------------------------------------------------- inference


class OnnxModel:
    """An exported folder opened with ONNX Runtime: the ``--engine onnxruntime`` path of predict and evaluate."""

    def __init__(self, folder: str | os.PathLike, bundle_sha256: str | None = None):
        _, ort = _need_onnx()
        folder = Path(folder)
        onnx_path, meta_path = folder / ONNX_FILE, folder / META_FILE
        if not onnx_path.is_file() or not meta_path.is_file():
            raise HeadstartError(f"'{folder}' has no exported model ({ONNX_FILE} + {META_FILE}): run `headstart export {folder}` first")
        self.meta = json.loads(meta_path.read_text())
        if sha256_file(onnx_path) != self.meta.get("onnx_sha256"):
            raise HeadstartError(f"'{onnx_path}' does not match {META_FILE}: it was changed or damaged; run `headstart export` again")
        if bundle_sha256 is not None and self.meta.get("bundle_sha256") != bundle_sha256:
            raise HeadstartError(f"'{onnx_path}' was exported from another version of this run's weights: run `headstart export {folder}` again")
        self.classes: list[str] = self.meta["classes"]
        self.data_config: dict[str, Any] = self.meta["preprocess"]["timm_data_config"]
        self.session = _session(ort, onnx_path)

    def proba_array(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": np.ascontiguousarray(x, np.float32)})[0]

    def proba(self, paths: Sequence[Path], *, batch_size: int = 32, workers: int = -1, root: Path | None = None) -> features.Features:
        """Probabilities for the photos that decode, as ``Features`` whose ``x`` holds probabilities (rows follow ``ok``)."""
        import time

        start = time.perf_counter()
        rows, ok, skipped = [], np.zeros(len(paths), bool), []
        for idx, batch, bad in _batches(paths, self.data_config, batch_size, workers):
            if batch is not None:
                rows.append(self.proba_array(batch))
                ok[idx] = True
            skipped += [Skipped(features._show(paths[j], root), err) for j, err in bad]
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
