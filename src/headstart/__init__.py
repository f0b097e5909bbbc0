"""headstart: transfer learning on images — a folder of labelled photos in, an accurate classifier out.

    import headstart
    clf = headstart.train("photos/", out="runs/photos")   # cached features + a head chosen by CV
    clf.evaluate()                                        # metrics recorded at training time
    clf.predict(["new.jpg"])                              # top-k classes with probabilities
    clf = headstart.load("runs/photos")                  # a run, or an ensemble of runs
    headstart.ensemble.build(["runs/a", "runs/b"], out="runs/ab")  # members' probabilities averaged
    headstart.export_onnx("runs/photos")                 # model.onnx, checked against PyTorch
    headstart.compare("photos/", ["efficientnet_lite0", "efficientnet_lite1"], out="runs/cmp")  # leaderboard
    headstart.audit("photos/", out="runs/photos-audit")  # duplicates, leaks, mislabels, junk: audit.html, exclude.txt
"""

from . import ensemble
from .audit import audit
from .backbones import REGISTRY, lookup
from .backbones import load as load_backbone
from .compare import compare
from .config import HeadstartError, TrainConfig, __version__
from .data import scan
from .pipeline import train
from .predict import Classifier, Prediction, load, predict_imagenet

__all__ = [
    "REGISTRY",
    "Classifier",
    "HeadstartError",
    "Prediction",
    "TrainConfig",
    "__version__",
    "audit",
    "compare",
    "ensemble",
    "load",
    "export_onnx",
    "load_backbone",
    "lookup",
    "predict_imagenet",
    "scan",
    "train",
]


def __getattr__(name: str):
    """``export_onnx`` on first use: the export module imports torch, which a cached re-run never needs."""
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'headstart' has no attribute {name!r}")
