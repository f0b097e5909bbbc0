"""Look inside a backbone: its layers, the feature maps of any layer, and Grad-CAM heat-maps.

Everything works on a ``Subject``: the backbone whose layers have names, the function from an image batch to class
scores, the class names and timm's preprocessing. A trained bundle (``headstart.load``) and the raw ImageNet
network (``backbones.load``) both become one, so the same code explains either.

Grad-CAM (Selvaraju et al., 2017): the gradient of one class score with respect to a layer's activation,
averaged over space, weights that activation's channels; the ReLU of the weighted sum shows where the evidence
for the class lies. It is written out here (a forward hook and one ``autograd.grad``) rather than taken from
the pytorch-grad-cam package, which ships only as a source archive and pulls in OpenCV, ttach and SciPy.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from . import backbones, transforms
from .config import HeadstartError
from .data import open_rgb, to_rgb
from .files import atomic_path
from .plots import overlay, thumbnail
from .predict import Classifier, load_run


@dataclass
class Subject:
    """What is explained: a backbone with named layers and, when it has classes, a way to score them."""

    model: nn.Module  # the timm backbone; its ``named_modules()`` names are the layer names
    scores: Callable[[torch.Tensor], torch.Tensor] | None  # (N, 3, H, W) → (N, classes) logits; None: headless
    classes: list[str]
    data_config: dict[str, Any]  # timm's preprocessing for the backbone
    name: str  # for titles and messages
    head: nn.Module | None = None  # a run's trained head (heads.HEADS' layers), scored after the backbone's pooling


Source = Union[Subject, Classifier, backbones.LoadedBackbone, str, os.PathLike]  # a run folder is loaded
ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]


def imagenet_classes() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def imagenet(backbone: str = backbones.DEFAULT, weights: str | os.PathLike | None = None) -> Subject:
    """The raw pretrained network with its 1000 ImageNet classes."""
    return as_subject(backbones.load(backbone, weights))


def as_subject(source: Source) -> Subject:
    """A Subject from a trained Classifier, a run folder, a LoadedBackbone (ImageNet head) or a Subject."""
    if isinstance(source, Subject):
        return source
    if isinstance(source, (str, os.PathLike)):
        source = load_run(source)
    if isinstance(source, Classifier):
        model, head = source.backbone.model.eval(), source.head.eval()

        def scores(x: torch.Tensor) -> torch.Tensor:  # the same path as prediction: pooled features → head
            return head(model.forward_head(model.forward_features(x), pre_logits=True))

        return Subject(model, scores, source.classes, source.backbone.data_config, f"{source.backbone.spec.name} + head", head)
    if isinstance(source, backbones.LoadedBackbone):
        model = source.model.eval()
        n = int(getattr(model, "num_classes", 0))
        classes = imagenet_classes() if n == 1000 else [str(i) for i in range(n)]
        return Subject(model, model if n else None, classes, source.data_config, f"{source.spec.name} (ImageNet)")
    raise TypeError(f"cannot explain a {type(source).__name__}: give a Classifier, a run folder or a LoadedBackbone")


def preprocess(subj: Subject, image: ImageLike, whole: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """The image as the model sees it (timm's eval transform): a (1, 3, H, W) batch, and the same pixels as
    (H, W, 3) uint8 for display, so heat-maps line up with what is shown.

    ``whole=True`` resizes the shortest side to the input size and crops nothing, so the whole photo is explained
    (a convolutional network takes any size); scores may then differ slightly from ``predict``'s centre crop.
    """
    cfg = subj.data_config
    if isinstance(image, (str, os.PathLike)):
        try:
            pil = open_rgb(image, transforms.decode_size(cfg))
        except ValueError as e:
            raise HeadstartError(f"cannot read '{image}': {e}") from None
    elif isinstance(image, np.ndarray):
        pil = to_rgb(Image.fromarray(image))
    else:
        pil = to_rgb(image)
    tf = transforms.whole_frame_transform(cfg) if whole else transforms.eval_transform(cfg)
    x = tf(pil).unsqueeze(0)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    shown = ((x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return x, shown


# ------------------------------------------------------------------------------------------------ layers


@dataclass(frozen=True)
class Layer:
    name: str  # what --layer / --feature-maps take
    type: str
    shape: tuple[int, ...] | None  # output for one image at the model's input size, batch left out; None: not a tensor
    params: int  # parameters inside this module (children included)
    part: str = "backbone"  # or "head": the run's trained head, after the backbone's pooling (not a --layer choice)


def layers(source: Source, max_depth: int | None = None) -> list[Layer]:
    """Every named module (names with at most ``max_depth`` parts) with its output shape, found by running one
    blank image through the model; a run's trained head follows the backbone as ``head``, ``head.0`` …"""
    subj = as_subject(source)
    shapes = _trace(subj)
    named = [(n, m) for n, m in subj.model.named_modules() if n and (max_depth is None or n.count(".") < max_depth)]
    rows = [Layer(n, type(m).__name__, shapes.get(n), sum(p.numel() for p in m.parameters())) for n, m in named]
    return rows + (_head_layers(subj, subj.head, subj.scores, max_depth) if subj.head is not None and subj.scores else [])


def _head_layers(subj: Subject, head: nn.Module, scores: Callable[[torch.Tensor], torch.Tensor], max_depth: int | None) -> list[Layer]:
    """The trained head's layers (the bundle's, built from heads.HEADS) with the shapes one blank image gives them."""
    named = [("head" + (f".{n}" if n else ""), m) for n, m in head.named_modules()]
    named = [(n, m) for n, m in named if max_depth is None or n.count(".") < max_depth]
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:  # returns None: a hook's result would replace the output
            shapes[name] = tuple(out.shape[1:])

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in named]
    try:
        with torch.no_grad():
            scores(torch.zeros(1, *subj.data_config["input_size"]))
    finally:
        for h in handles:
            h.remove()
    return [Layer(n, type(m).__name__, shapes.get(n), sum(p.numel() for p in m.parameters()), "head") for n, m in named]


def first_conv(source: Source) -> str:
    """The first convolution: its feature maps are the classic 'edges and colours' view."""
    subj = as_subject(source)
    for name, m in subj.model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    raise HeadstartError(f"backbone '{subj.name}' has no Conv2d layer; pick a layer by name (see `headstart layers`)")


# the default Grad-CAM layer of each model (or why there is none), found once by _trace
_DEFAULT_LAYER: "weakref.WeakKeyDictionary[nn.Module, str | HeadstartError]" = weakref.WeakKeyDictionary()


def default_layer(source: Source) -> str:
    """The module whose output the model pools into its embedding — the last convolutional stage.

    Found generically by ``_trace``: the modules that returned exactly the tensor ``forward_features`` returns;
    the outermost of them (with parameters, if there is a tie) is the name people recognise ('bn2', 'layer4',
    'features', 'Mixed_7c').
    """
    subj = as_subject(source)
    if subj.model not in _DEFAULT_LAYER:
        _trace(subj)
    found = _DEFAULT_LAYER[subj.model]
    if isinstance(found, HeadstartError):
        raise found
    return found


def _trace(subj: Subject) -> dict[str, tuple[int, ...]]:
    """One pass of a blank image with a hook on every module: each module's output shape, and (remembered per
    model) the default Grad-CAM layer."""
    model = subj.model
    modules = {n: m for n, m in model.named_modules() if n}
    shapes: dict[str, tuple[int, ...]] = {}
    last: dict[str, Any] = {"out": None, "names": [], "spatial": None}

    def record(name: str):
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                shapes.setdefault(name, tuple(out.shape[1:]))
                if out.dim() == 4:
                    last["spatial"] = name
            if out is not last["out"]:
                last["out"], last["names"] = out, []
            last["names"].append(name)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            feats = model.forward_features(torch.zeros(1, *subj.data_config["input_size"]))
            names, spatial = (last["names"] if last["out"] is feats else []), last["spatial"]
            model.forward_head(feats)
    finally:
        for h in handles:
            h.remove()
    if not (isinstance(feats, torch.Tensor) and feats.dim() == 4):
        _DEFAULT_LAYER[model] = HeadstartError(
            f"backbone '{subj.name}' has no convolutional feature map before pooling (its features have shape "
            f"{tuple(getattr(feats, 'shape', ()))}); Grad-CAM needs a (channels, height, width) layer: pick one by name"
        )
    elif names:
        _DEFAULT_LAYER[model] = min(names, key=lambda n: (n.count("."), not any(True for _ in modules[n].parameters()), names.index(n)))
    elif spatial:
        _DEFAULT_LAYER[model] = spatial  # forward_features ends in a plain function: the last module with a feature map
    else:
        _DEFAULT_LAYER[model] = HeadstartError(f"cannot find the last convolutional stage of '{subj.name}': pick a layer by name")
    return shapes


def _module(subj: Subject, name: str) -> nn.Module:
    modules = dict(subj.model.named_modules())
    if name in modules and name:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise HeadstartError(f"no layer '{name}' in backbone '{subj.name}': list the names with `headstart layers`.{hint}")


class _Captured(Exception):
    """Raised by a capture hook that needs nothing after its layer: the rest of the forward pass is skipped."""


@contextlib.contextmanager
def _capture(subj: Subject, name: str, stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the output of layer ``name`` during the forward passes inside the block (``stop``: end the pass there)."""
    module, box = _module(subj, name), {}

    def hook(_m: nn.Module, _i: Any, out: Any) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
            raise HeadstartError(
                f"layer '{name}' outputs {shape}, not a (channels, height, width) feature map: "
                "pick a convolutional layer (see `headstart layers`)"
            )
        box["act"] = out
        if stop:
            raise _Captured
        return out.clone()  # a later in-place op (ReLU(inplace=True)) must not change what was captured

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------ feature maps


@dataclass
class FeatureMaps:
    maps: np.ndarray  # (n, h, w) float32: the first n channels of the layer's output for this image
    layer: str
    type: str
    channels: int  # how many channels the layer has in all
    image: np.ndarray  # (H, W, 3) uint8: the photo as the model saw it


def resolve_layer(source: Source, layer: str | None) -> str:
    """A layer name, with two shorthands (unless the model has modules so named): 'first' (or None), the first
    convolution, and 'last', the last convolutional stage."""
    subj = as_subject(source)
    if layer in (None, "first") and layer not in dict(subj.model.named_modules()):
        return first_conv(subj)
    if layer == "last" and layer not in dict(subj.model.named_modules()):
        return default_layer(subj)
    return layer


def feature_maps(source: Source, image: ImageLike, layer: str | None = None, count: int = 64, whole: bool = False) -> FeatureMaps:
    """The first ``count`` channels of one layer's activation (default: the first convolution)."""
    if count < 1:
        raise HeadstartError(f"--count must be at least 1, not {count}")
    subj = as_subject(source)
    layer = resolve_layer(subj, layer)
    x, shown = preprocess(subj, image, whole)
    with _capture(subj, layer, stop=True) as box, torch.no_grad(), contextlib.suppress(_Captured):
        subj.model(x)
    if "act" not in box:
        raise HeadstartError(f"layer '{layer}' is not used when the model runs on an image; pick another")
    act = box["act"][0].float()
    return FeatureMaps(act[:count].numpy(), layer, type(_module(subj, layer)).__name__, act.shape[0], shown)


def feature_grid(*panels: FeatureMaps, title: str | None = None) -> Figure:
    """The photo, then each layer's channels as small images (each with its own contrast, numbered),
    side by side: early layers show edges and colours, late ones parts."""
    if not panels:
        raise ValueError("feature_grid needs at least one FeatureMaps")
    grids = []
    for p in panels:
        cols = math.ceil(math.sqrt(len(p.maps)))
        grids.append((cols, math.ceil(len(p.maps) / cols)))
    rows = max(r for _, r in grids)
    width = 2.6 + sum(c * 0.95 + 0.3 for c, _ in grids)
    fig = Figure(figsize=(width, max(3.2, rows * 0.95 + 1.0)), dpi=100)
    subs = fig.subfigures(1, 1 + len(panels), width_ratios=[2.6] + [c * 0.95 + 0.3 for c, _ in grids])
    ax = subs[0].add_subplot(1, 1, 1)
    ax.imshow(panels[0].image)
    ax.set_title("input (as the model sees it)", fontsize=8)
    ax.axis("off")
    for sub, p, (cols, prow) in zip(subs[1:], panels, grids):
        axes = sub.subplots(rows, cols, squeeze=False)
        for k, a in enumerate(axes.flat):
            a.axis("off")
            r, c = divmod(k, cols)
            if r < prow and k < len(p.maps):
                a.imshow(p.maps[k], cmap="viridis")
                a.set_title(str(k), fontsize=6, pad=1)
        h, w = p.maps.shape[1:]
        sub.suptitle(f"{p.layer} ({p.type})\n{p.channels}×{h}×{w}; first {len(p.maps)} of {p.channels} channels", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0)
    return fig


# ---------------------------------------------------------------------------------------------- Grad-CAM


@dataclass
class GradCam:
    heat: np.ndarray  # (H, W) float32 in [0, 1], aligned with ``image``
    image: np.ndarray  # (H, W, 3) uint8: the photo as the model saw it (resized, centre-cropped)
    target: str  # the class the heat-map explains
    probability: float  # the model's probability for ``target``
    predicted: str
    confidence: float  # the probability of ``predicted``
    layer: str


def class_index(classes: list[str], target: str | int) -> int:
    """A class by index, exact name, or (ImageNet) any of its comma-separated names, case-insensitively."""
    if isinstance(target, int) or str(target).isdigit():
        i = int(target)
        if 0 <= i < len(classes):
            return i
        raise HeadstartError(f"class index {i} is out of range (0–{len(classes) - 1})")
    if target in classes:
        return classes.index(target)
    key = str(target).strip().casefold()
    for i, c in enumerate(classes):
        if key == c.casefold() or key in (part.strip().casefold() for part in c.split(",")):
            return i
    close = difflib.get_close_matches(str(target), classes, n=5, cutoff=0.5)
    shown = ", ".join(close) if close else ", ".join(classes[:10]) + (" …" if len(classes) > 10 else "")
    raise HeadstartError(f"unknown class '{target}': the model's classes include {shown}")


def gradcam(source: Source, image: ImageLike, target: str | int | None = None, layer: str | None = None, whole: bool = False) -> GradCam:
    """Where in the photo the evidence for ``target`` (default: the predicted class) lies, at ``layer``
    (default: the last convolutional stage); ``whole``: see ``preprocess``."""
    subj = as_subject(source)
    if subj.scores is None:
        raise HeadstartError(f"'{subj.name}' has no classifier (headless weights): Grad-CAM needs class scores")
    layer = layer or default_layer(subj)
    x, shown = preprocess(subj, image, whole)
    x.requires_grad_(True)  # builds the graph through the layer even when every weight is frozen
    with _capture(subj, layer) as box, torch.enable_grad():
        logits = subj.scores(x)
    if "act" not in box:
        raise HeadstartError(f"layer '{layer}' is not used to compute the class scores; pick one before the pooling")
    proba = torch.softmax(logits.detach()[0].float(), 0)
    top = int(proba.argmax())
    c = top if target is None else class_index(subj.classes, target)
    act = box["act"]
    # the class score less the mean score: softmax ignores a shift common to every class, and a binary linear head
    # keeps one class's logit at 0, whose own gradient would be zero everywhere (a blank map for that class)
    (grad,) = torch.autograd.grad(logits[0, c] - logits[0].mean(), act, allow_unused=True)
    if grad is None:
        raise HeadstartError(f"the class scores do not depend on layer '{layer}'; pick one before the pooling")
    weights = grad.float().mean(dim=(2, 3), keepdim=True)  # one weight per channel: its average gradient
    cam = torch.relu((weights * act.detach().float()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    heat = (cam / peak if peak > 0 else cam).numpy().astype(np.float32)
    return GradCam(heat, shown, subj.classes[c], float(proba[c]), subj.classes[top], float(proba[top]), layer)


def gradcam_figure(cam: GradCam, title: str | None = None) -> Figure:
    """The photo beside its Grad-CAM overlay, titled with the prediction and its confidence."""
    fig = Figure(figsize=(8, 4.4), dpi=100)
    a, b = fig.subplots(1, 2)
    a.imshow(cam.image)
    a.set_title("input (as the model sees it)", fontsize=9)
    b.imshow(overlay(cam.image, cam.heat))
    b.set_title(f"Grad-CAM for '{cam.target}' ({cam.probability:.1%}) at {cam.layer}", fontsize=9)
    for ax in (a, b):
        ax.axis("off")
    head = f"predicted: {cam.predicted} ({cam.confidence:.1%})"
    fig.suptitle(f"{title}\n{head}" if title else head, fontsize=11)
    fig.tight_layout()
    return fig


def gradcam_thumbnail(source: Source, image: ImageLike, size: int = 224, target: str | int | None = None) -> Image.Image:
    """A small Grad-CAM overlay (longer side ``size`` px) for galleries such as the report's worst errors."""
    cam = gradcam(source, image, target=target)
    return thumbnail(cam.image, cam.heat, size)


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write a figure as PNG atomically (a reader never sees half a picture). A ``Figure`` made here belongs to no
    pyplot window, so nothing needs closing: it is freed with its last reference."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path
