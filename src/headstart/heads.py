"""The new head on pooled backbone features: one table of head types, each defined once.

A head type is a list of layers (``layers``). The torch module (``to_torch``: for fine-tuning, Grad-CAM, export)
is an ``nn.Sequential`` of those layers, and the numpy forward pass (``logits``: evaluation and prediction from
cached features, which never import torch) walks the same list, reading the module's own state-dict keys.
Fitting lives in the table too: ``HEADS[kind].fit``. ``head="auto"`` cross-validates every candidate of the
table on the training split only (``select``); the validation split is never looked at until the final
evaluation. Fitting is numpy and scikit-learn only (the MLP's Adam included), so choosing a head never imports
torch. Adding a head type is one ``HeadType`` entry.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from . import cache, distributed
from .config import HeadstartError, TrainConfig, cv_folds_for

if TYPE_CHECKING:  # torch is imported where a head trains or runs as a module
    from torch import nn

log = logging.getLogger("headstart")

HeadState = dict[str, np.ndarray]  # the head's tensors, keyed like its torch module's state dict
Layer = tuple[str, dict[str, Any]]  # ("standardize" | "linear" | "relu" | "dropout", arguments)


@dataclass
class HeadFit:
    """A fitted head: its kind and parameters, its tensors, and how the fit went."""

    state: HeadState
    kind: str
    params: dict[str, float]
    epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------------------- the definition


def _mlp_layers(dim: int, n_classes: int, hidden: int, dropout: float) -> list[Layer]:
    """The classic Dense(hidden, ReLU) → dropout → softmax, on standardised features."""
    return [("standardize", {"dim": dim}), ("linear", {"in": dim, "out": hidden}), ("relu", {}), ("dropout", {"p": dropout}),
            ("linear", {"in": hidden, "out": n_classes})]


def _linear_layers(dim: int, n_classes: int, hidden: int, dropout: float) -> list[Layer]:
    """Logistic regression on standardised features."""
    return [("standardize", {"dim": dim}), ("linear", {"in": dim, "out": n_classes})]


def spec_layers(spec: dict[str, Any], n_classes: int) -> list[Layer]:
    """The layers of a head recorded as ``spec`` (a bundle's ``head`` entry: kind, dim, hidden, dropout)."""
    kind = HEADS.get(spec["kind"])
    if kind is None:
        raise HeadstartError(f"unknown head '{spec['kind']}': use {' or '.join(HEADS)}")
    return kind.layers(spec["dim"], n_classes, spec.get("hidden", TrainConfig.hidden), spec.get("dropout", TrainConfig.dropout))


def logits(spec: dict[str, Any], state: HeadState, x: np.ndarray) -> np.ndarray:
    """The head applied to pooled features with numpy, layer by layer as ``to_torch`` builds it (dropout is off
    at inference)."""
    z = np.asarray(x, np.float32)
    for i, (op, _) in enumerate(spec_layers(spec, _n_out(state))):
        z = _layer(op, i, state, z)
    return z


def _layer(op: str, i: int, state: HeadState, z: np.ndarray) -> np.ndarray:
    """Layer ``i`` of a head at inference (dropout is the identity)."""
    if op == "standardize":
        return (z - state[f"{i}.mean"]) / state[f"{i}.std"]
    if op == "linear":
        return z @ state[f"{i}.weight"].T + state[f"{i}.bias"]
    if op == "relu":
        return np.maximum(z, 0)
    return z


def input_gradient(spec: dict[str, Any], state: HeadState, x: np.ndarray, c: int) -> np.ndarray:
    """∂ (logit_c - mean logit) / ∂ x for one row of pooled features: backwards over the same layer list as ``logits``. What a
    Grad-CAM of the last feature map needs (the pooling spreads it evenly), without torch."""
    acts, z = [], np.asarray(x, np.float32)[None]
    layers = spec_layers(spec, _n_out(state))
    for i, (op, _) in enumerate(layers):
        acts.append(z)
        z = _layer(op, i, state, z)
    g = np.full_like(z, -1 / z.shape[1])  # the class score less the mean score, as explain.gradcam scores it
    g[0, c] += 1
    for i in reversed(range(len(layers))):
        op = layers[i][0]
        if op == "standardize":
            g = g / state[f"{i}.std"]
        elif op == "linear":
            g = g @ state[f"{i}.weight"]
        elif op == "relu":
            g = g * (acts[i] > 0)
    return g[0]


def shapes(spec: dict[str, Any], n_classes: int) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, keyed like the state: what a bundle's head must hold, known without torch."""
    out: dict[str, tuple[int, ...]] = {}
    for i, (op, a) in enumerate(spec_layers(spec, n_classes)):
        if op == "standardize":
            out |= {f"{i}.mean": (a["dim"],), f"{i}.std": (a["dim"],)}
        elif op == "linear":
            out |= {f"{i}.weight": (a["out"], a["in"]), f"{i}.bias": (a["out"],)}
    return out


def _n_out(state: HeadState) -> int:
    """The number of classes: the rows of the last linear layer."""
    last = max((k for k in state if k.endswith(".weight")), key=lambda k: int(k.split(".")[0]))
    return int(state[last].shape[0])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def proba(spec: dict[str, Any], state: HeadState, x: np.ndarray) -> np.ndarray:
    return softmax(logits(spec, state, x))


def to_torch(spec: dict[str, Any], n_classes: int, state: HeadState | None = None) -> nn.Sequential:
    """The head as a torch module (in eval mode when ``state`` is given, else freshly initialised)."""
    import torch
    from torch import nn

    class Standardize(nn.Module):
        """Per-feature (x - mean) / std, stored in the head so a bundle needs nothing else."""

        def __init__(self, dim: int):
            super().__init__()
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("std", torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - self.mean) / self.std

    build: dict[str, Callable[..., nn.Module]] = {
        "standardize": lambda a: Standardize(a["dim"]), "linear": lambda a: nn.Linear(a["in"], a["out"]),
        "relu": lambda a: nn.ReLU(), "dropout": lambda a: nn.Dropout(a["p"]),
    }
    head = nn.Sequential(*(build[op](args) for op, args in spec_layers(spec, n_classes)))
    if state is not None:
        head.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)
        head.eval()
    return head


def to_arrays(head: nn.Module) -> HeadState:
    return {k: v.detach().cpu().float().contiguous().numpy().copy() for k, v in head.state_dict().items()}


def spec(kind: str, dim: int, cfg: TrainConfig) -> dict[str, Any]:
    """What a bundle records of a head (``config.json``'s ``head`` entry, less the fit's own parameters)."""
    return {"kind": kind, "dim": dim, "hidden": cfg.hidden, "dropout": cfg.dropout}


# ------------------------------------------------------------------------------------------------ fitting


def class_weights(y: np.ndarray, n_classes: int, mode: str = "auto") -> np.ndarray | None:
    """Balanced weights when asked, or (auto) when the largest class is over 1.5× the smallest."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    if mode == "none" or (mode == "auto" and counts.max() <= 1.5 * max(counts[counts > 0].min(), 1)):
        return None
    return len(y) / (n_classes * np.maximum(counts, 1))


def _standardizer(x: np.ndarray) -> HeadState:
    """Each feature's mean and spread over the training rows. A feature they all share (a channel none of the photos
    activates: about 25 of Lite0's 1 280 with 5 photos a class) keeps scale 1, as scikit-learn's StandardScaler does:
    divided by its spread (0, plus 1e-6), another photo that activates it became an input 10^4-10^6 times too large,
    which swung the MLP head's answers (ants/bees validation, 5 photos a class: 57 % against 77 %) and blew up the
    first epoch of fine-tuning."""
    std = x.std(0)
    return {"0.mean": x.mean(0).astype(np.float32), "0.std": np.where(std < 1e-6, 1.0, std + 1e-6).astype(np.float32)}


def _standardized(x: np.ndarray, state: HeadState) -> np.ndarray:
    """(x - mean) / std in float32, in one new array: written as one expression it made two temporaries the size of
    the fold's rows, the largest arrays of the search (its peak memory was 5x the embeddings')."""
    out = np.subtract(x, state["0.mean"], dtype=np.float32)
    out /= state["0.std"]
    return out


@dataclass
class FitData:
    """What a head is fitted on: training features and labels, optionally validation data for early stopping."""

    x: np.ndarray
    y: np.ndarray
    n_classes: int
    weights: np.ndarray | None = None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    start: list[HeadState] | None = None  # the same setting's solutions on the cross-validation folds (``select``)


def fit_linear(d: FitData, cfg: TrainConfig, params: dict[str, float], epochs: int | None = None) -> HeadFit:
    """scikit-learn's logistic regression on standardised features, stored as the linear head's arrays."""
    return fit_linear_path(d, cfg, [params])[0]


def fit_linear_path(d: FitData, cfg: TrainConfig, grid: list[dict[str, float]]) -> list[HeadFit]:
    """One logistic regression per setting of ``grid`` on the same rows, each started from the solution of the next
    stronger regularisation (a warm-started path, as scikit-learn's own ``LogisticRegressionCV`` runs it): at 3 000
    photos the second C needed 6 L-BFGS iterations instead of 21. Same optimum, to the solver's tolerance."""
    from sklearn.linear_model import LogisticRegression

    state = _standardizer(d.x)
    xs = _standardized(d.x, state)
    cw = {i: float(w) for i, w in enumerate(d.weights)} if d.weights is not None else None
    lr = LogisticRegression(max_iter=3000, class_weight=cw, random_state=cfg.seed, warm_start=True)
    if d.start:
        lr.coef_, lr.intercept_ = _folds_mean(d.start, state, np.unique(d.y))
    fits: dict[int, HeadFit] = {}
    for i in sorted(range(len(grid)), key=lambda i: grid[i]["C"]):
        lr.set_params(C=grid[i]["C"]).fit(xs, d.y)
        fits[i] = HeadFit(state | _linear_arrays(lr, d.n_classes, d.x.shape[1]), "linear", dict(grid[i]))
    return [fits[i] for i in range(len(grid))]


def _folds_mean(states: list[HeadState], std: HeadState, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the final fit starts: the folds' solutions, each moved from its fold's standardisation into these rows'
    (the same logits for every photo), averaged, in scikit-learn's layout (one row per class present; binary: one).
    The problem is convex, so the optimum is the same as from zero: at 3 000 photos, 12 L-BFGS iterations instead of
    45, a third of the final fit, which runs alone on one core after the search."""
    w = np.mean([s["1.weight"] * (std["0.std"] / s["0.std"]) for s in states], 0)
    b = np.mean([s["1.bias"] + s["1.weight"] @ ((std["0.mean"] - s["0.mean"]) / s["0.std"]) for s in states], 0)
    if len(classes) == 2:  # sklearn's one logit is the difference of the two classes' (_linear_arrays)
        return (w[classes[1]] - w[classes[0]])[None], b[classes[1:]] - b[classes[:1]]
    return w[classes], b[classes]


def _linear_arrays(lr: Any, n_classes: int, dim: int) -> HeadState:
    """A fitted LogisticRegression as the linear layer's weight and bias, one row per class of the whole problem."""
    w = np.zeros((n_classes, dim), np.float32)
    b = np.zeros(n_classes, np.float32)
    if len(lr.classes_) == 2:  # binary: sklearn keeps one logit; softmax([0, z]) == sigmoid(z)
        w[lr.classes_[1]], b[lr.classes_[1]] = lr.coef_[0], lr.intercept_[0]
    else:
        w[lr.classes_], b[lr.classes_] = lr.coef_, lr.intercept_
        missing = np.setdiff1d(np.arange(n_classes), lr.classes_)
        b[missing] = -1e4  # a class absent from this fold's training data is never predicted
    return {"1.weight": w, "1.bias": b}


def fit_mlp(d: FitData, cfg: TrainConfig, params: dict[str, float], epochs: int | None = None) -> HeadFit:
    """The classic head, trained with Adam in numpy (torch's rules: L2 weight decay added to the gradient, inverted
    dropout, class-weighted mean cross-entropy, nn.Linear's initialisation), since importing torch for a two-layer
    network costs more than fitting it. With validation data, early stopping on its loss keeps the best epoch (and
    ends the fit after ``patience`` epochs without progress, or as soon as the loss is ``overfit_stop`` above its best:
    once it has risen that far it did not come back in any fold of the shared sets, and the wait cost a third of the search),
    otherwise it trains for exactly ``epochs``."""
    rng = np.random.default_rng(cfg.seed)
    std = _standardizer(d.x)
    xv = _standardized(d.x_val, std) if d.x_val is not None else None  # each batch is standardised as it is drawn: a
    # standardised copy of every row beside the rows themselves doubled the search's memory, for 2 % of its time
    params_ = _mlp_init(d.x.shape[1], cfg.hidden, d.n_classes, rng)
    adam = _Adam(params_, cfg.lr, cfg.weight_decay)
    w = np.asarray(d.weights if d.weights is not None else np.ones(d.n_classes), np.float32)
    keep = 1.0 - cfg.dropout
    best, best_loss, best_epoch, history = None, math.inf, 0, []
    for epoch in range(1, (epochs or cfg.max_epochs) + 1):
        total = 0.0
        for idx in np.array_split(rng.permutation(len(d.x)), max(1, -(-len(d.x) // cfg.head_batch_size))):
            mask = (rng.random((len(idx), cfg.hidden), dtype=np.float32) < keep) / np.float32(keep) if keep < 1 else None
            loss, grads = _mlp_step(params_, _standardized(d.x[idx], std), d.y[idx], w, mask)
            adam.step(grads)
            total += loss * len(idx)
        row = {"epoch": epoch, "train_loss": total / len(d.x)}
        if xv is not None:
            z = _mlp_logits(params_, xv)
            row |= {"val_loss": _nll(z, d.y_val), "val_accuracy": float((z.argmax(1) == d.y_val).mean())}
            if row["val_loss"] < best_loss - 1e-4:
                best, best_loss, best_epoch = [a.copy() for a in params_], row["val_loss"], epoch
            elif epoch - best_epoch >= cfg.patience or row["val_loss"] > best_loss * (1 + cfg.overfit_stop):
                history.append(row)
                break
        history.append(row)
    w1, b1, w2, b2 = best if best is not None else params_
    state = std | {"1.weight": w1.T.copy(), "1.bias": b1, "4.weight": w2.T.copy(), "4.bias": b2}
    return HeadFit(state, "mlp", {"dropout": cfg.dropout, "hidden": cfg.hidden}, best_epoch or len(history), history)


def _mlp_init(dim: int, hidden: int, n_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """nn.Linear's default: weights and biases uniform in ±1/√fan_in (weights stored input-major for x @ W)."""
    def uniform(fan_in: int, *shape: int) -> np.ndarray:
        bound = 1 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return [uniform(dim, dim, hidden), uniform(dim, hidden), uniform(hidden, hidden, n_classes), uniform(hidden, n_classes)]


def _mlp_logits(p: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ p[0] + p[1], 0) @ p[2] + p[3]


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    z = z - z.max(1, keepdims=True)
    return float((np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]).mean())


def _mlp_step(p: list[np.ndarray], x: np.ndarray, y: np.ndarray, w: np.ndarray, mask: np.ndarray | None) -> tuple[float, list[np.ndarray]]:
    """One batch: the class-weighted mean cross-entropy and its gradients (backpropagation by hand: two layers)."""
    pre = x @ p[0] + p[1]
    h = np.maximum(pre, 0)
    if mask is not None:
        h *= mask
    z = h @ p[2] + p[3]
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    prob = e / e.sum(1, keepdims=True)
    rows = np.arange(len(y))
    wy = w[y]
    loss = float((wy * -np.log(np.maximum(prob[rows, y], 1e-30))).sum() / wy.sum())
    dz = prob
    dz[rows, y] -= 1
    dz *= (wy / wy.sum())[:, None]
    dh = dz @ p[2].T
    if mask is not None:
        dh *= mask
    dh *= pre > 0
    return loss, [x.T @ dh, dh.sum(0), h.T @ dz, dz.sum(0)]


class _Adam:
    """torch.optim.Adam's update (weight decay as L2 on the gradient, bias-corrected moments), in place and without
    temporaries: numpy's one-operation-at-a-time arrays made a naive version cost twice the batch's own matmuls. The
    moments are kept unscaled (M = m / (1 - b1), V = v / (1 - b2)), so each is updated in two passes, and the constants
    fold into the denominator: 12 passes over the weights per step instead of 15, each a numpy call on the whole array."""

    def __init__(self, params: list[np.ndarray], lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.wd, self.betas, self.eps, self.t = params, lr, weight_decay, betas, eps, 0
        self.m = [np.zeros_like(a) for a in params]
        self.v = [np.zeros_like(a) for a in params]
        self.tmp = [np.empty_like(a) for a in params]

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        b1, b2 = self.betas
        step = self.lr * (1 - b1) / (1 - b1 ** self.t)  # lr · m / (1 - b1^t) = step · M
        root = math.sqrt((1 - b2) / (1 - b2 ** self.t))  # sqrt(v / (1 - b2^t)) = root · sqrt(V)
        for a, g, m, v, tmp in zip(self.params, grads, self.m, self.v, self.tmp):
            if self.wd:
                np.multiply(a, self.wd, out=tmp)
                g += tmp  # the gradient arrays are the step's own: changed in place
            m *= b1
            m += g
            np.multiply(g, g, out=tmp)
            v *= b2
            v += tmp
            np.sqrt(v, out=tmp)  # a -= step · M / (root · sqrt(V) + eps), with step moved into the denominator
            tmp *= root / step
            tmp += self.eps / step
            np.divide(m, tmp, out=tmp)
            a -= tmp


@dataclass(frozen=True)
class HeadType:
    """One row of the head table."""

    layers: Callable[[int, int, int, float], list[Layer]]  # (dim, n_classes, hidden, dropout) → layers
    fit: Callable[[FitData, TrainConfig, dict[str, float], int | None], HeadFit]
    candidates: tuple[dict[str, float], ...]  # parameter settings cross-validated when head="auto"
    iterative: bool  # trained by epochs with early stopping (the final fit reuses the CV's mean epoch count)
    fit_grid: Callable[[FitData, TrainConfig, list[dict[str, float]]], list[HeadFit]] | None = None  # all candidates
    # on one fold at once, when that is cheaper than one by one (the linear head's warm-started path)
    warm_final: bool = False  # the final fit starts from the folds' solutions (FitData.start): for a convex fit only
    min_photos: int = 1  # head="auto" tries it only when every class has this many training photos


HEADS: dict[str, HeadType] = {
    # the MLP from 3 photos a class: at 2, each fold fits its 330 000 weights on one photo a class and is judged on one,
    # and on the training photos not drawn it scored 7-14 pt below the linear head (BENCHMARKS.md, "Few photos")
    "mlp": HeadType(_mlp_layers, fit_mlp, ({},), iterative=True, min_photos=3),
    "linear": HeadType(_linear_layers, fit_linear, ({"C": 0.05}, {"C": 0.5}), iterative=False, fit_grid=fit_linear_path,
                       warm_final=True),
}


def candidates(head: str, smallest: int | None = None) -> list[tuple[str, dict[str, float]]]:
    """(kind, parameters) tried by cross-validation: one kind's, or for ``auto`` every table entry's whose
    ``min_photos`` the smallest class's count of training photos reaches (all when not given)."""
    return [(kind, p) for kind, t in HEADS.items()
            if kind == head or (head == "auto" and (smallest is None or smallest >= t.min_photos)) for p in t.candidates]


# -------------------------------------------------------------------------------------- cross-validation


def with_views(x: np.ndarray, y: np.ndarray, idx: np.ndarray, views: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Training rows ``idx`` plus their cached augmented views (views never cross a CV fold)."""
    if not views:
        return x[idx], y[idx]
    return np.concatenate([x[idx]] + [v[idx] for v in views]), np.tile(y[idx], 1 + len(views))


def cv_rank(row: dict[str, Any]) -> tuple[float, float]:
    """How cross-validation results are ranked: accuracy (to 4 places), then lower log loss."""
    return round(row["cv_accuracy"], 4), -row["cv_log_loss"]


def _fold_scores(kind: str, grid: list[dict[str, float]], x: np.ndarray, y: np.ndarray, n_classes: int, cfg: TrainConfig,
                 views: list[np.ndarray], fold: tuple[np.ndarray, np.ndarray]) -> tuple[list[tuple[float, float, int]], list[HeadState]]:
    """The candidates ``grid`` of one head type fitted on one fold's training rows: for each, accuracy and log loss on
    the held-out rows, and the best epoch (0 for a head fitted in one shot); and, for a type whose final fit starts
    from the folds' (``warm_final``), each candidate's fitted arrays."""
    tr, te = fold
    xt, yt = with_views(x, y, tr, views)
    data = FitData(xt, yt, n_classes, class_weights(y, n_classes, cfg.class_weights), x[te], y[te])
    t = HEADS[kind]
    fits = t.fit_grid(data, cfg, grid) if t.fit_grid else [t.fit(data, cfg, params, None) for params in grid]
    scores = []
    for fit in fits:
        p = proba(spec(kind, x.shape[1], cfg), fit.state, x[te])
        scores.append((float((p.argmax(1) == y[te]).mean()), float(-np.log(np.clip(p[np.arange(len(te)), y[te]], 1e-7, 1)).mean()),
                       fit.epochs if t.iterative else 0))
    return scores, [fit.state for fit in fits] if t.warm_final else []


def _summary(kind: str, params: dict[str, float], scores: list[tuple[float, float, int]], photos: int) -> dict[str, Any]:
    """One candidate's row of the table: mean accuracy and log loss over the folds, the accuracy's standard error,
    the number of folds, and (for an iterative head) its mean best epoch."""
    acc, nll, epochs = (list(v) for v in zip(*scores))
    mean = float(np.mean(acc))
    return {"kind": kind, "params": params, "cv_accuracy": mean, "cv_log_loss": float(np.mean(nll)),
            "cv_se": standard_error(acc, mean, photos), "folds": len(acc),
            "epochs": int(round(np.mean(epochs))) if HEADS[kind].iterative else 0}


def standard_error(fold_accuracies: list[float], accuracy: float, photos: int) -> float:
    """The cross-validated accuracy's standard error: the spread of the fold accuracies, or, when larger, the
    binomial error of an accuracy measured on ``photos`` held-out photos (Laplace-smoothed, so 100 % is not
    certain). With few photos the folds alone are no gauge: 2 folds of 4 photos that both score 75 % have a spread
    of 0, and the one-standard-error rule then took a lead of one photo for a real one (2 photos a class of ants/bees,
    5 draws: the MLP chosen in 2, 59.0 % on validation against 66.7 % for the linear head; now in 1, 63.1 %)."""
    folds = float(np.std(fold_accuracies, ddof=1) / math.sqrt(len(fold_accuracies))) if len(fold_accuracies) > 1 else 0.0
    p = (accuracy * photos + 1) / (photos + 2)
    return max(folds, math.sqrt(p * (1 - p) / max(photos, 1)))


def _on_cores(fn: Callable[[Any], Any], jobs: list[Any]) -> list[Any]:
    """``[fn(j) for j in jobs]`` with one thread per core this process may use: each fit is single-threaded and
    numpy's BLAS releases the GIL, so independent fits share the cores without the hand-offs that made a
    multi-threaded BLAS slow on busy ones (see ``single_thread``). Results come back in the jobs' order, and each
    fit seeds its own generator, so the outcome does not depend on the thread count."""
    from concurrent.futures import ThreadPoolExecutor

    threads = min(len(jobs), distributed.cores())
    if threads <= 1:
        return [fn(j) for j in jobs]
    with ThreadPoolExecutor(threads, thread_name_prefix="head-cv") as pool:
        return list(pool.map(fn, jobs))


def chosen(table: list[dict[str, Any]]) -> dict[str, Any]:
    """The row the search picks: the best by ``cv_rank``, unless a head fitted in one shot (not by epochs) scores
    within one standard error of the best's accuracy (``standard_error``) — the one-standard-error rule (Breiman et
    al.): a lead smaller than the estimate's own noise is noise, and the simpler head generalises at least as well. Measured on
    clothing, whole frame: the MLP led Lite1's search by under one standard error and scored 86.2 % on validation,
    the linear head 88.0 % (their ensemble with Lite0: 85.8 % against 88.9 %)."""
    best = max(table, key=cv_rank)
    close = [r for r in table if not HEADS[r["kind"]].iterative and r["cv_accuracy"] >= best["cv_accuracy"] - best.get("cv_se", 0.0)]
    return max(close, key=cv_rank) if HEADS[best["kind"]].iterative and close else best


def _stratified_folds(y: np.ndarray, cfg: TrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The seeded stratified folds ``select`` and ``out_of_fold`` share: ``cfg.cv_folds`` of them, fewer when the
    smallest class present has fewer rows, none when it has a single one (nothing to hold out)."""
    from sklearn.model_selection import StratifiedKFold

    n_folds = min(cv_folds_for(cfg.cv_folds, len(y)), int(np.unique(y, return_counts=True)[1].min()))
    return list(StratifiedKFold(n_folds, shuffle=True, random_state=cfg.seed).split(y, y)) if n_folds >= 2 else []


def select(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: TrainConfig,
           views: list[np.ndarray] | None = None) -> tuple[str, dict[str, float], int, list[dict[str, Any]], list[HeadState] | None]:
    """Cross-validate the candidate heads on the training split; returns the winner, the table and, when the winner's
    final fit can start from them (``warm_final``), its solutions on the folds."""
    smallest = int(np.unique(y, return_counts=True)[1].min())
    tried = candidates(cfg.head, smallest)
    folds = _stratified_folds(y, cfg)
    if not folds:
        kind, params = tried[0]
        log.info("a class has a single training image: no cross-validation, using the %s head", kind)
        return kind, params, 0, [], None
    if len(tried) < len(candidates(cfg.head)):
        log.info("head: a class has only %d training photos: too few to choose an MLP by cross-validation; trying the %s head",
                 smallest, " and ".join(dict.fromkeys(k for k, _ in tried)))
    kinds = list(dict.fromkeys(kind for kind, _ in tried))  # the table's order: the MLP's long fits start first
    grids = {kind: [p for k, p in tried if k == kind] for kind in kinds}
    jobs = [(kind, f) for kind in kinds for f in range(len(folds))]  # one job fits a head type's whole grid on a fold
    done = dict(zip(jobs, _on_cores(lambda job: _fold_scores(job[0], grids[job[0]], x, y, n_classes, cfg, views or [], folds[job[1]]), jobs)))
    # kind by kind, each grid in order: ``tried``'s order (``candidates`` lists each type's settings together)
    table = [_summary(kind, params, [done[(kind, f)][0][i] for f in range(len(folds))], len(y)) for kind in kinds for i, params in enumerate(grids[kind])]
    best = chosen(table)
    i = grids[best["kind"]].index(best["params"])
    start = [done[(best["kind"], f)][1][i] for f in range(len(folds))] if HEADS[best["kind"]].warm_final else None
    return best["kind"], best["params"], best["epochs"], table, start


# Everything the head's selection and fit depend on, besides the features and labels themselves.
_SELECTION_FIELDS = ("head", "hidden", "dropout", "lr", "weight_decay", "max_epochs", "patience", "overfit_stop", "head_batch_size", "cv_folds",
                     "class_weights", "seed")


def _fit_key(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: TrainConfig, views: list[np.ndarray]) -> str:
    """Inputs, settings, the candidates and the library versions that compute a fit."""
    from importlib.metadata import version

    libs = [version(p) for p in ("scikit-learn", "numpy")]
    return cache.key("head-fit", "numpy-mlp", "one-se", "warm-final", "constant-unscaled", "binomial-se", n_classes, candidates(cfg.head),
                     {k: t.min_photos for k, t in HEADS.items()}, {k: getattr(cfg, k) for k in _SELECTION_FIELDS}, libs,
                     arrays=(x, y, *views))


def fit(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: TrainConfig, views: list[np.ndarray] | None = None) -> tuple[HeadFit, list[dict[str, Any]]]:
    """Choose a head by cross-validation, then fit it on the whole training split (and its augmented views).

    Both are deterministic in the features, labels and settings, so the outcome is remembered in the cache
    (``<cache>/heads/``): a re-run on cached features reads it back instead of repeating the cross-validation.
    """
    from safetensors.numpy import load_file, save_file

    views = views or []
    store, name = cache.store("heads", cfg.cache_dir), _fit_key(x, y, n_classes, cfg, views)
    record, state = store.read_json(name), store.read(name, ".safetensors", lambda p: load_file(str(p)))
    if isinstance(record, dict) and state is not None:
        log.info("head: cross-validation and fit read back from %s", store.path(name, ".json"))
        return HeadFit(state, record["kind"], record["params"], record["epochs"], record["history"]), record["table"]
    with single_thread(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kind, params, epochs, table, start = select(x, y, n_classes, cfg, views)
        xa, ya = with_views(x, y, np.arange(len(y)), views) if views else (x, y)  # no copy of every row without views
        data = FitData(xa, ya, n_classes, class_weights(y, n_classes, cfg.class_weights), start=start)
        result = HEADS[kind].fit(data, cfg, params, (max(epochs, 1) if table else 30) if HEADS[kind].iterative else None)
    _retell(caught)
    record = {"kind": result.kind, "params": result.params, "epochs": result.epochs, "history": result.history, "table": table}
    store.write_json(name, record, before={".safetensors": lambda p: save_file(result.state, str(p))})
    return result, table


def _retell(caught: list[warnings.WarningMessage]) -> None:
    """scikit-learn's warnings from the head's search, once each and in terms of what the user controls, instead of
    its own words (with a source line from inside scikit-learn) on stderr."""
    said = set()
    for w in caught:
        if "sklearn" not in w.filename:  # not scikit-learn's: as it would have been shown
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        text = str(w.message)
        if "converge" in text.lower() or type(w.message).__name__ == "ConvergenceWarning":
            line = ("head: a logistic regression reached its iteration limit before converging (some C tried in the "
                    "search); its answer is close but not exact. Usually harmless; --head mlp avoids it")
        elif "least populated class" in text:
            line = f"head: a class has too few training photos for every cross-validation fold ({text.split('. ')[0]})"
        else:
            line = f"head: scikit-learn warned: {text.splitlines()[0][:200]}"
        if line not in said:
            said.add(line)
            log.warning("%s", line)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Head-sized matrices gain nothing from threads, and on a busy CPU thread hand-offs cost 10x or more
    (measured on 2 busy shared cores: the clothing head's cross-validation took 280 s with 2 threads). Every BLAS and
    OpenMP pool is put back as it was afterwards (torch's too, when loaded: fine-tuning in the same process must run
    as it would have in a fresh one)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


# ------------------------------------------------------------------------------------- out-of-fold probabilities

OOF_PARAMS = {"C": 0.05}  # the linear head's stronger candidate: fast to fit and less over-confident on its own errors


def out_of_fold(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: TrainConfig) -> np.ndarray:
    """Each row's class probabilities from a linear head fitted on the other folds only (stratified, seeded like
    ``select``): what confident learning needs, since a head never scores a photo it was fitted on. Remembered in
    ``<cache>/heads/`` by features, labels and settings, so a repeated audit reads them back."""
    store = cache.store("heads", cfg.cache_dir)
    name = cache.key("out-of-fold", n_classes, OOF_PARAMS, cfg.cv_folds, cfg.seed, cfg.class_weights, arrays=(x, y))
    known = store.read(name, ".npy", lambda p: np.load(p, allow_pickle=False))
    if known is not None and known.shape == (len(y), n_classes):
        return known
    p = np.full((len(y), n_classes), 1.0 / n_classes, np.float32)  # a class too small to fold: no opinion
    folds = _stratified_folds(y, cfg)
    if folds:
        weights = class_weights(y, n_classes, cfg.class_weights)

        def held_proba(fold: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            tr, te = fold
            return proba(spec("linear", x.shape[1], cfg), fit_linear(FitData(x[tr], y[tr], n_classes, weights), cfg, OOF_PARAMS).state, x[te])

        with single_thread():  # the folds side by side, as the head's search runs them
            for (_, te), q in zip(folds, _on_cores(held_proba, folds)):
                p[te] = q
    store.write(name, {".npy": lambda path: path.write_bytes(_npy(p))})
    return p


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()
