"""Export a trained bundle for deployment: one ONNX graph, image → class probabilities, checked against PyTorch.

The exported folder holds ``model.onnx`` and ``onnx_meta.json`` (class names, preprocessing, provenance). The
same facts are stored inside the ONNX file as ``metadata_props``, so the ``.onnx`` alone is enough for a
consumer. Nothing is written unless ONNX Runtime reproduces PyTorch's fp32 probabilities on real photos.

Tracing and the ONNX Runtime session come from ``onnx.py``, which also builds the graph extraction runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .config import HeadstartError
from .data import scan
from .features import normalized_batches
from .files import atomic_path, atomic_write_text
from .onnx import META_FILE, ONNX_FILE, OPSET, exportable_copy, need_onnx, session, to_onnx
from .predict import CONFIG_FILE, Classifier, expand_images, load_run
from .transforms import preprocess_info

META_FORMAT = 1
log = logging.getLogger("headstart")
ATOL = 1e-4  # largest accepted |p_onnx - p_torch| (fp32 both sides)
CHECK_IMAGES = 8  # photos run through both engines at export time


class Probabilities(nn.Module):
    """The whole classifier as one module: pixels → backbone → pooled features → head → softmax."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.forward_head(self.backbone.forward_features(image), pre_logits=True)
        return torch.softmax(self.head(pooled), dim=1)


def probabilities_module(clf: Classifier) -> Probabilities:
    """A fresh fp32, contiguous copy of the classifier, built with timm's export-friendly layers (``onnx.exportable_copy``):
    the graph is static apart from the batch dimension."""
    # eval() on the wrapper too: the exporter restores the top module's mode, and a new module starts in training.
    return Probabilities(exportable_copy(clf.backbone), copy.deepcopy(clf.head).float()).eval().to(memory_format=torch.contiguous_format)


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
    clf = load_run(run)
    out = Path(out) if out is not None else Path(run)
    if clf.info.get("features", {}).get("precision") == "int8":  # the exported graph is traced from PyTorch: fp32
        log.warning("the run extracted its features in int8; the exported model.onnx runs the backbone in fp32 (its "
                    "predictions agree with the run's on nearly every photo, not all)")
    module = probabilities_module(clf)
    meta = _meta(clf, json.loads((Path(run) / CONFIG_FILE).read_text())["model_sha256"])
    data = _graph(module, clf, meta)
    diff, images, top1 = _parity(module, data, _check_paths(clf, check_images), clf.backbone.data_config)
    if not diff <= atol:  # also refuses NaN
        raise HeadstartError(
            f"ONNX Runtime disagrees with PyTorch on {images} check images: max probability difference {diff:.3g} > {atol:g}; "
            f"'{out / ONNX_FILE}' was not written. The run itself is fine (use --engine pytorch); please report this with the "
            f"backbone ({clf.backbone.spec.timm_name}) and the torch/onnxruntime versions."
        )
    meta |= {"parity": {"images": images, "max_abs_diff": diff, "atol": atol, "reference": "PyTorch fp32"},
             "onnx_sha256": hashlib.sha256(data).hexdigest()}
    # model first, then the meta that names its digest: an interrupted export is detected, never half-trusted
    with atomic_path(out / ONNX_FILE) as tmp:
        tmp.write_bytes(data)
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2))
    return ExportResult(out / ONNX_FILE, out / META_FILE, diff, images, top1)


def _meta(clf: Classifier, bundle_sha: str) -> dict[str, Any]:
    """What a consumer needs besides the graph: classes, preprocessing, provenance."""
    return {
        "format": META_FORMAT,
        "classes": clf.classes,
        "preprocess": preprocess_info(clf.backbone.data_config),
        "input": "image", "output": "probabilities", "opset": OPSET,
        "backbone": {"name": clf.backbone.spec.name, "timm_name": clf.backbone.spec.timm_name, "weights_digest": clf.backbone.digest},
        "head": clf.info.get("head", {}).get("kind"),
        "bundle_sha256": bundle_sha,
    }


def _graph(module: nn.Module, clf: Classifier, meta: dict[str, Any]) -> bytes:
    """The traced, checked graph with the meta facts inside it as ``metadata_props``."""
    onnx, _ = need_onnx()
    model = onnx.load_model_from_string(to_onnx(module, torch.zeros(2, *meta["preprocess"]["input_size"])))
    onnx.checker.check_model(model)
    for key, value in (("classes", clf.classes), ("preprocess", meta["preprocess"]), ("headstart", meta)):
        model.metadata_props.add(key=key, value=json.dumps(value))
    model.doc_string = f"headstart classifier: {len(clf.classes)} classes, image (N,3,H,W) -> probabilities (N,{len(clf.classes)})"
    return model.SerializeToString()


def _parity(module: nn.Module, data: bytes, paths: list[Path], data_config: dict[str, Any]) -> tuple[float, int, bool]:
    """Largest |p_onnx - p_torch| on real photos (one alone, then the rest as a batch), how many, and top-1 agreement."""
    batches = [x for _, x, _ in normalized_batches(paths, data_config) if x is not None]
    if not batches:
        raise HeadstartError(f"none of the {len(paths)} check images could be decoded: give readable photos with check_images / --check-images")
    x = np.concatenate(batches)
    with torch.inference_mode():
        want = module(torch.from_numpy(x)).numpy()
    check = session(data)
    got = np.concatenate([check.run(None, {"image": x[:1]})[0], check.run(None, {"image": x[1:]})[0]]) if len(x) > 1 else check.run(None, {"image": x})[0]
    return float(np.abs(got - want).max()), int(len(x)), bool((got.argmax(1) == want.argmax(1)).all())


def _check_paths(clf: Classifier, given: Sequence[str | os.PathLike] | None) -> list[Path]:
    """Photos for the parity check: the ones given, else a spread of the bundle's own validation photos."""
    if given:
        return expand_images(given)
    root = clf.info.get("data", {}).get("root")
    if not root or not Path(root).is_dir():
        raise HeadstartError(f"the training photos ({root}) are not here for the parity check: give a few photos with --check-images")
    ds = scan(root, classes=clf.classes)
    split = ds.splits.get("val") or ds.splits.get("test") or next(iter(ds.splits.values()))
    pick = np.unique(np.linspace(0, len(split) - 1, min(CHECK_IMAGES, len(split))).round().astype(int))
    return [split.paths[i] for i in pick]
