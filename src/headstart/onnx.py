"""ONNX graphs and the one ONNX Runtime session factory.

Three graphs are built from a backbone, each traced by torch's exporter and checked against PyTorch fp32 before
anyone uses them:

* the *feature graph* ``features`` runs for extraction on a CPU (uint8 NHWC pixels → pooled embedding, or the
  ImageNet logits for ``predict --imagenet``), exported once per backbone and kept in ``<cache>/onnx/``;
* the deployed classifier (image → probabilities) that ``export.py`` writes into a run folder and
  ``predict.OnnxModel`` runs for ``--engine onnxruntime``;
* fine-tuning's frozen bottom (``bottom_session``), whose activations are cached once per photo and view.

Measured here ONNX Runtime runs EfficientNet-Lite0 at 4× PyTorch's fp32 eager speed with fp32's numbers.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import cache
from .backbones import LoadedBackbone, create
from .config import HeadstartError, __version__
from .transforms import normalize

if TYPE_CHECKING:  # imported where a graph is built: running a cached graph needs onnxruntime only
    import torch
    from torch import nn

log = logging.getLogger("headstart")

# Opset 17 (2022): run by every ONNX Runtime since 1.11, TensorRT 8.6+, OpenVINO 2023+, onnxruntime-web and
# CoreML/TFLite converters. These CNNs need no newer operator, so a newer opset would only shut out older runtimes.
OPSET = 17
EMBED_RTOL = 1e-3  # largest accepted |e_onnx - e_torch| / max|e_torch| for the feature graph
ONNX_FILE = "model.onnx"
META_FILE = "onnx_meta.json"
OUTPUTS = ("embedding", "logits")  # what a feature graph computes


class ExportError(HeadstartError):
    """The ONNX graph could not be built, or ONNX Runtime does not reproduce PyTorch."""


def need_onnx() -> tuple[Any, Any]:
    """onnx and ONNX Runtime, for making or editing a graph (export, quantization, graph surgery)."""
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxruntime (headstart dependencies): pip install onnx onnxruntime") from None
    return onnx, need_ort()


def need_ort() -> Any:
    """ONNX Runtime alone: running a graph that is already made (a cached export, an exported run) needs nothing
    else, and importing ``onnx`` as well cost 0.9 s of every new-photos run."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("running an ONNX graph needs onnxruntime (a headstart dependency): pip install onnxruntime") from None
    return onnxruntime


# ------------------------------------------------------------------------------------------- sessions


def session(model: str | os.PathLike | bytes, threads: int = 0, spin: bool = True):
    """An ONNX Runtime CPU session for a graph file or bytes, errors-only logging; a file's session is kept per
    (path, size, mtime), so a file replaced on disk is opened anew. ``threads=0``: ONNX Runtime's default.
    ``spin=False`` stops busy-waiting between batches, for when decode threads need the other core (measured:
    80 → 110 img/s end to end)."""
    if isinstance(model, bytes):
        return _session(model, threads, spin)
    st = os.stat(model)
    return _session(str(model), threads, spin, (st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=8)
def _session(model: str | bytes, threads: int, spin: bool, _stamp: tuple = ()):
    ort = need_ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _cached_session(store: cache.Store, name: str, suffix: str, make: Callable[[], bytes | None], threads: int = 0,
                    damaged: str = ""):
    """The session of the graph cached as ``name + suffix``, else of the graph ``make()`` returns, written there first
    (an unwritable cache still gives a session, from the bytes); None when ``make`` has no graph. A file ONNX Runtime
    cannot read is made again, the cache's one policy; ``damaged`` is the warning that says so (path, then reason)."""
    path = store.path(name, suffix)
    if path.is_file():
        try:
            return session(path, threads, spin=False)
        except Exception as e:  # noqa: BLE001 - whatever ORT says of a damaged file, the cure is to make it again
            if damaged:
                log.warning(damaged, path, str(e).splitlines()[0][:200])
    data = make()
    if data is None:
        return None
    return session(path, threads, spin=False) if store.write_bytes(name, suffix, data) else session(data, threads, spin=False)


# ------------------------------------------------------------------------------------------ tracing


def to_onnx(module: nn.Module, example: torch.Tensor, input_name: str = "image", output_name: str = "probabilities") -> bytes:
    """The traced ONNX graph, batch dimension dynamic.

    The TorchScript exporter (``dynamo=False``) is used on purpose: it exports these CNNs in under a second and
    needs nothing beyond torch, while the torch.export-based one needs ``onnxscript`` and minutes-long tracing and
    emits opset 18+ only. It is deprecated (a warning, silenced here) but present in every torch this package
    allows (<2.15); the parity checks catch any mistranslation either way.
    """
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=OPSET, input_names=[input_name],
                          output_names=[output_name], dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                          do_constant_folding=True)
    return buf.getvalue()


def exportable_copy(lb: LoadedBackbone) -> nn.Module:
    """The backbone rebuilt with export-friendly layers, same weights, fp32, static padding.

    ``exportable=True`` makes timm pick plain activations instead of its custom-autograd memory-efficient ones
    (which an exporter cannot see into). TF "same" padding (EfficientNet-Lite, the Keras MobileNets) is computed
    from the input size; the input size is fixed, so the traced pads are constants.
    """
    import timm
    import torch

    with timm.layers.set_layer_config(exportable=True, no_jit=True):
        model = create(lb.spec, num_classes=int(getattr(lb.model, "num_classes", 0)))
    model.load_state_dict(lb.model.state_dict(), strict=True)
    return static_same_padding(model.float().eval(), lb.data_config["input_size"]).to(memory_format=torch.contiguous_format)


def static_same_padding(model: nn.Module, input_size: Sequence[int]) -> nn.Module:
    """Replace timm's ``Conv2dSame`` (TF "same" pads recomputed from the input's shape on every call, which
    exports as Shape/Ceil/Pad arithmetic) by a constant ``ZeroPad2d`` + ``Conv2d`` for this fixed input size,
    so the graph is static apart from the batch dimension."""
    import torch
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg
    from torch import nn

    sizes: dict[str, tuple[int, ...]] = {}

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


def _pixels_module(lb: LoadedBackbone, output: str) -> nn.Module:
    """uint8 NHWC pixels → normalised NCHW → pooled embedding (or ImageNet logits): the feature graph's module."""
    from torch import nn

    class Pixels(nn.Module):
        def __init__(self, backbone: nn.Module):
            super().__init__()
            self.backbone = backbone

        def forward(self, pixels):
            x = normalize(pixels, lb.data_config)
            return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=output == "embedding")

    return Pixels(exportable_copy(lb)).eval()


def feature_graph(lb: LoadedBackbone, output: str = "embedding") -> bytes:
    """The backbone as an ONNX graph (input ``pixels``, uint8 N×H×W×3; output ``embedding`` or ``logits``), after
    checking that ONNX Runtime reproduces PyTorch fp32 on a few synthetic images. Raises ``ExportError`` otherwise."""
    import torch

    h, w = (int(v) for v in lb.data_config["input_size"][-2:])
    # smooth gradients plus noise: real-image-like statistics without reading any photo
    g = np.random.default_rng(0)
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, None, :, None]
    check = np.clip(ramp * g.uniform(0.3, 1, (3, 1, 1, 3)) + g.normal(0, 25, (3, h, w, 3)), 0, 255).astype(np.uint8)
    try:
        module = _pixels_module(lb, output)
    except Exception as e:  # noqa: BLE001 - any failure to build it means: use PyTorch instead
        raise _failed(e) from e
    return faithful_graph(module, torch.zeros(2, h, w, 3, dtype=torch.uint8), check, "pixels", output)


def faithful_graph(module: nn.Module, example: torch.Tensor, check: np.ndarray, input_name: str, output_name: str) -> bytes:
    """``module`` traced to an ONNX graph, once ONNX Runtime has reproduced its PyTorch fp32 output on ``check`` to
    ``EMBED_RTOL`` of the output's scale; ``ExportError`` otherwise, any exporter or runtime failure included."""
    import torch

    need_onnx()
    try:
        data = to_onnx(module, example, input_name, output_name)
        with torch.inference_mode():
            want = module(torch.from_numpy(check)).numpy()
        got = session(data).run(None, {input_name: check})[0]
    except Exception as e:  # noqa: BLE001 - any exporter/runtime failure means: use PyTorch instead
        raise _failed(e) from e
    err = float(np.abs(got - want).max() / max(1e-6, float(np.abs(want).max())))
    if not err <= EMBED_RTOL:
        raise ExportError(f"ONNX Runtime differs from PyTorch by {err:.2g} of the output's scale (> {EMBED_RTOL:g})")
    return data


def _failed(e: Exception) -> ExportError:
    return ExportError(f"export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


# --------------------------------------------------------------------------- the cached feature graph

_REFUSED: dict[str, str] = {}  # graph key → why its export was refused: tried, and said, once per process


def _libraries() -> list[str]:
    from importlib.metadata import version

    return [__version__] + [version(p) for p in ("torch", "timm", "onnx", "onnxruntime")]


def _graph_key(lb: LoadedBackbone, output: str) -> str:
    return cache.key("feature-graph", lb.spec.timm_name, lb.spec.kwargs, lb.digest, lb.data_config, output, OPSET)


def has_feature_graph(lb: LoadedBackbone, cache_dir: str | os.PathLike | None = None, output: str = "embedding") -> bool:
    """True when this backbone's graph is cached: it was exported from these weights built as this architecture,
    and it checked out against PyTorch then."""
    return cache.store("onnx", cache_dir).path(_graph_key(lb, output), ".onnx").is_file()


def refused(lb: LoadedBackbone, cache_dir: str | os.PathLike | None = None, output: str = "embedding") -> bool:
    """True when this backbone's export was refused in this process, or by an earlier run with the same libraries
    (``<cache>/onnx/<key>.refused.json``): a cached re-run goes straight to PyTorch instead of trying again."""
    name = _graph_key(lb, output)
    if name in _REFUSED:
        return True
    known = cache.store("onnx", cache_dir).read(name, ".refused.json", lambda p: json.loads(p.read_text()))
    if isinstance(known, dict) and known.get("libraries") == _libraries():
        _REFUSED[name] = str(known.get("why"))
        log.warning("ONNX Runtime cannot run %s (%s; found by an earlier run, delete %s to try again); using PyTorch",
                    lb.spec.name, known.get("why"), cache.store("onnx", cache_dir).path(name, ".refused.json"))
        return True
    return False


def feature_session(lb: LoadedBackbone, cache_dir: str | os.PathLike | None = None, output: str = "embedding", threads: int = 0):
    """An ONNX Runtime session computing this backbone's ``output`` from uint8 NHWC pixels, or None when the
    backbone does not export faithfully (the reason is logged once and remembered in the cache).

    The graph is exported and checked once per weights digest and preprocessing, then read back from
    ``<cache>/onnx/``; a damaged file there is exported again.
    """
    if refused(lb, cache_dir, output):
        return None
    store, name = cache.store("onnx", cache_dir), _graph_key(lb, output)

    def export() -> bytes | None:
        try:
            return feature_graph(lb, output)
        except ExportError as e:
            _REFUSED[name] = str(e)
            log.warning("ONNX Runtime cannot run %s (%s); using PyTorch", lb.spec.name, e)
            store.write_bytes(name, ".refused.json", json.dumps({"why": str(e), "libraries": _libraries()}).encode())
            return None

    return _cached_session(store, name, ".onnx", export, threads, damaged="the exported backbone %s cannot be read (%s); exporting it again")


# ------------------------------------------------------------------- fine-tuning's frozen bottom

def bottom_session(bottom: nn.Module, input_hw: tuple[int, int], digest: str, cache_dir: str | os.PathLike | None = None):
    """An ONNX Runtime session of the frozen bottom fine-tuning caches activations from (input ``x``: normalised
    float N×3×H×W, output ``activations``), or None when it does not export faithfully (logged; the caller runs
    PyTorch). Measured on Lite0's bottom at 288 px, 2 cores: 11.9 img/s in PyTorch fp32, 48.8 in ONNX Runtime.
    Exported and checked once per (weights ``digest``, architecture, input size, libraries), then read back from
    ``<cache>/onnx/``."""
    store = cache.store("onnx", cache_dir)
    name = cache.key("bottom-graph", digest, repr(bottom), list(input_hw), OPSET, _libraries())
    if name in _REFUSED:
        return None

    def export() -> bytes | None:
        try:
            return bottom_graph(bottom, input_hw)
        except ExportError as e:
            _REFUSED[name] = str(e)
            log.warning("ONNX Runtime cannot run the frozen bottom (%s); computing its activations in PyTorch", e)
            return None

    return _cached_session(store, name, ".onnx", export, damaged="the exported frozen bottom %s cannot be read (%s); exporting it again")


def bottom_graph(bottom: nn.Module, input_hw: tuple[int, int]) -> bytes:
    """``bottom`` (in eval mode) as an ONNX graph, checked against PyTorch fp32 on noise (``faithful_graph``)."""
    import torch

    h, w = input_hw
    check = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0)).numpy()
    return faithful_graph(bottom, torch.zeros(2, 3, h, w), check, "x", "activations")


# ------------------------------------------------------------------------------ the int8 feature graph

# ONNX Runtime static quantization of the feature graph (``precision="int8"``). QDQ keeps the graph a plain ONNX
# file every runtime reads; weights per output channel (depthwise convolutions differ a lot between channels);
# activations uint8, calibrated by min/max on the user's own photos. Measured on Lite0: symmetric int8 activations
# ran several times slower here and agreed less with fp32 (85 % of clothing's validation top-1 against 94 %).
# The global pooling and what follows stay float (only ``ops`` are quantized), so the embedding itself is not
# rounded to 256 levels (+0.5 pt on clothing). The settings are part of the cache key.
INT8 = {"format": "QDQ", "weights": "int8 per channel", "activations": "uint8", "calibration": "minmax",
        "ops": ["Conv", "MatMul", "Gemm", "Add", "Mul", "Clip", "Relu", "Pad", "MaxPool"]}


@dataclass(frozen=True)
class Calibration:
    """The photos an int8 graph is calibrated on: their content digests name the graph (so renaming costs nothing
    and a changed photo means a new graph); ``paths`` may be empty when only a recorded graph is to be read back
    (a saved run predicting on another machine)."""

    digests: tuple[str, ...]
    paths: tuple[Path, ...] = ()


MAP = "feature_map"  # the second output of ``map_session``'s graph


def with_map_output(graph: bytes) -> bytes | None:
    """The feature graph with, as a second output ``feature_map``, the (N, C, h, w) map whose global average pool is
    the embedding; None when the embedding is not exactly that (then Grad-CAM needs PyTorch). Pure graph surgery:
    no export, no torch."""
    import onnx as onnx_lib

    model = onnx_lib.load_from_string(graph)
    made = {o: n for n in model.graph.node for o in n.output}
    flat = made.get(model.graph.output[0].name)
    pool = made.get(flat.input[0]) if flat is not None and flat.op_type == "Flatten" else None
    if pool is None or pool.op_type != "GlobalAveragePool":
        return None
    model.graph.node.append(onnx_lib.helper.make_node("Identity", [pool.input[0]], [MAP]))
    model.graph.output.append(onnx_lib.helper.make_tensor_value_info(MAP, onnx_lib.TensorProto.FLOAT, None))
    return model.SerializeToString()


def map_session(lb: LoadedBackbone, cache_dir: str | os.PathLike | None = None):
    """A session giving the embedding and the map it pools, derived from the cached feature graph (remembered beside
    it), or None when that graph is not cached or does not end in a global average pool."""
    store, name = cache.store("onnx", cache_dir), _graph_key(lb, "embedding")

    def derive() -> bytes | None:
        graph = store.read_bytes(name, ".onnx")
        return with_map_output(graph) if graph is not None else None

    return _cached_session(store, cache.key(name, "with-map"), ".onnx", derive)


def int8_key(lb: LoadedBackbone, calibration: Calibration) -> str:
    from importlib.metadata import version

    return cache.key("int8-graph", _graph_key(lb, "embedding"), sorted(calibration.digests), INT8, version("onnxruntime"))


def int8_graph(lb: LoadedBackbone, calibration: Calibration, cache_dir: str | os.PathLike | None = None) -> bytes | None:
    """The cached int8 graph's bytes (what a saved run keeps beside its weights), or None when it is not cached."""
    return cache.store("onnx", cache_dir).read_bytes(int8_key(lb, calibration), ".int8.onnx")


def keep_int8_graph(lb: LoadedBackbone, calibration: Calibration, source: Path, cache_dir: str | os.PathLike | None = None) -> None:
    """Put a saved run's int8 graph (the file ``source``) into the cache, where ``int8_session`` finds it (a run moved
    to another machine); read only when the cache lacks it, since every prediction with the run passes here."""
    store, name = cache.store("onnx", cache_dir), int8_key(lb, calibration)
    if not store.path(name, ".int8.onnx").is_file():
        store.write_bytes(name, ".int8.onnx", source.read_bytes())


def quantize(graph: bytes, batches: Iterable[np.ndarray]) -> bytes:
    """``graph`` (uint8 NHWC pixels in) statically quantized to int8, calibrated on the pixel ``batches``."""
    need_onnx()
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"pixels": b}

    with tempfile.TemporaryDirectory(prefix="headstart-int8-") as tmp:
        src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(graph)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # folds, fuses BN, infers shapes: cleaner QDQ
        quiet = _Quiet()  # the quantizer logs a line per rescaled weight channel on the root logger
        logging.getLogger().addFilter(quiet)
        try:
            activations = QuantType.QUInt8 if INT8["activations"] == "uint8" else QuantType.QInt8
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=activations, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=INT8.get("ops"),
                            extra_options={"ActivationSymmetric": INT8["activations"] == "int8"})
        finally:
            logging.getLogger().removeFilter(quiet)
        return out.read_bytes()


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "quantization" not in record.pathname


def int8_session(lb: LoadedBackbone, calibration: Calibration, batches: Callable[[], Iterable[np.ndarray]],
                 cache_dir: str | os.PathLike | None = None, threads: int = 0):
    """An ONNX Runtime session of this backbone's int8 feature graph calibrated on ``calibration``, or None when it
    cannot be had (the fp32 export is refused, no calibration photo decodes, or quantization fails: logged; the
    caller runs fp32). Quantized once per (fp32 graph, calibration digests, settings, ONNX Runtime version) and read
    back from ``<cache>/onnx/``; ``batches()`` (the calibration photos' pixels) is only called when quantizing."""
    store, name = cache.store("onnx", cache_dir), int8_key(lb, calibration)

    def quantized() -> bytes | None:
        if name in _REFUSED:  # failed already in this process (logged then)
            return None
        if not calibration.paths:
            log.warning("the int8 graph of %s is not in the cache and its calibration photos are not at hand; using fp32", lb.spec.name)
            return None
        if feature_session(lb, cache_dir) is None:
            return None
        t = time.perf_counter()
        try:
            data = quantize(store.path(_graph_key(lb, "embedding"), ".onnx").read_bytes(), _counted(batches()))
        except Exception as e:  # noqa: BLE001 - no photo decodes, or any quantizer failure: fp32 still works
            _REFUSED[name] = why = str(e) if isinstance(e, (EmptyCalibration, OSError)) else f"{type(e).__name__}: {str(e)[:200]}"
            log.warning("cannot quantize %s to int8 (%s); using fp32", lb.spec.name, why)
            return None
        log.info("int8: %s quantized on %d photos in %.1f s", lb.spec.name, len(calibration.digests), time.perf_counter() - t)
        return data

    return _cached_session(store, name, ".int8.onnx", quantized, threads, damaged="the int8 backbone %s cannot be read (%s); quantizing it again")


class EmptyCalibration(ValueError):
    """No calibration photo decoded."""


def _counted(batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    n = 0
    for b in batches:
        n += len(b)
        yield b
    if n == 0:
        raise EmptyCalibration("none of the calibration photos decodes")
