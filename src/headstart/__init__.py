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

from typing import Any

from .audit import audit
from .compare import compare
from .config import HeadstartError, TrainConfig, __version__

# Where each public name lives. They load on first use, so `import headstart` (and every CLI command) starts in
# half a second instead of importing scikit-learn, matplotlib and torch up front. `audit` and `compare` are imported
# above instead: each names both a module and the function, and a submodule's first import binds the module to its name.
_PUBLIC = {
    "REGISTRY": ("backbones", "REGISTRY"),
    "lookup": ("backbones", "lookup"),
    "load_backbone": ("backbones", "load"),
    "ensemble": ("ensemble", None),
    "export_onnx": ("export", "export_onnx"),
    "scan": ("data", "scan"),
    "train": ("pipeline", "train"),
    "Classifier": ("predict", "Classifier"),
    "Prediction": ("predict", "Prediction"),
    "load": ("predict", "load"),
    "predict_imagenet": ("predict", "predict_imagenet"),
}

__all__ = ["HeadstartError", "TrainConfig", "__version__", "audit", "compare", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'headstart' has no attribute {name!r}")
    import importlib

    module, attr = _PUBLIC[name]
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value  # once found, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
