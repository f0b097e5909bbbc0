"""The head table: one definition per head type, from which the torch module and the numpy forward both follow;
and the one cache store every cache uses."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from headstart import cache, heads
from headstart.config import TrainConfig, choices

from conftest import HYMENOPTERA


def test_the_config_offers_exactly_the_head_table():
    assert set(choices("head")) == {"auto", *heads.HEADS}
    assert [k for k, _ in heads.candidates("auto")] == ["mlp", "linear", "linear"]  # every candidate of every row


@pytest.mark.parametrize("kind", sorted(heads.HEADS))
def test_numpy_forward_equals_the_torch_module(kind):
    """Evaluation from cached features (numpy) and fine-tuning/Grad-CAM/export (torch) compute the same head."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 24)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    fit, table = heads.fit(x, y, 3, TrainConfig(head=kind, max_epochs=20, cache_dir=None))
    assert fit.kind == kind and len(table) == len(heads.HEADS[kind].candidates)
    spec = heads.spec(kind, 24, TrainConfig())
    module = heads.to_torch(spec, 3, fit.state)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(heads.logits(spec, fit.state, x), want, rtol=1e-4, atol=1e-4)
    assert heads.to_arrays(module).keys() == fit.state.keys()
    assert (heads.proba(spec, fit.state, x).argmax(1) == y).mean() > 0.8  # it learned the rule


def test_a_damaged_entry_reads_as_absent_and_an_unwritable_store_says_so_once(tmp_path, caplog):
    store = cache.Store(tmp_path / "kind")
    assert store.write_json("a", {"x": 1}) and store.read_json("a") == {"x": 1}
    store.path("a", ".json").write_text("{not json")
    assert store.read_json("a") is None  # damaged: computed again by the caller, never a crash
    ro = tmp_path / "ro"
    ro.write_text("a file where the store's folder should be")
    blocked = cache.Store(ro / "sub")
    with caplog.at_level(logging.WARNING, logger="headstart"):
        assert blocked.write_json("b", {}) is False and blocked.write_json("c", {}) is False
    assert caplog.text.count("cannot write the cache folder") == 1
    assert cache.key("x", arrays=(np.zeros(3),)) != cache.key("x", arrays=(np.ones(3),)) == cache.key("x", arrays=(np.ones(3),))


def test_scikit_learns_warnings_are_retold_once_in_headstarts_words(monkeypatch, caplog, recwarn):
    """A logistic regression stopped by its iteration limit warns from inside scikit-learn on every fit of the
    search; the user gets one line that says what it means and what to do."""
    import sklearn.linear_model

    real = sklearn.linear_model.LogisticRegression

    def capped(**kw):
        return real(**{**kw, "max_iter": 1})

    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", capped)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    with caplog.at_level(logging.WARNING, logger="headstart"):
        heads.fit(x, y, 2, TrainConfig(head="linear", cache_dir=None))
    retold = [r.getMessage() for r in caplog.records if "iteration limit" in r.getMessage()]
    assert len(retold) == 1 and "--head mlp" in retold[0]
    assert not [w for w in recwarn if "sklearn" in w.filename], [str(w.message) for w in recwarn]


@pytest.fixture(scope="module")
def ants_train(ants_run) -> tuple[np.ndarray, np.ndarray]:
    """The ants/bees training embeddings, read back from the session's cache (the ants run computed them)."""
    from headstart import features
    from headstart.data import scan

    split = scan(HYMENOPTERA).splits["train"]
    f = features.extract(split.paths, ants_run[0].backbone, progress=False)
    assert f.ok.all()
    return f.x, np.asarray(split.labels)


def test_the_search_runs_its_fits_on_every_core_and_finds_the_same_table(ants_train, monkeypatch):
    x, y = ants_train
    cfg = TrainConfig(cache_dir=None)
    threads = []
    real = heads._fold_scores

    def spy(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    cores = min(2, heads.distributed.cores())
    monkeypatch.setattr(heads, "_fold_scores", spy)
    with heads.single_thread():
        parallel = heads.select(x, y, 2, cfg)
        monkeypatch.setattr(heads.distributed, "cores", lambda: 1)
        serial = heads.select(x, y, 2, cfg)
    # one job per head type and fold (the linear head's two C values share theirs): 2 types x 5 folds, twice
    assert len(threads) == 2 * 2 * 5 and len({t for t in threads[:10] if t.startswith("head-cv")}) == (cores if cores > 1 else 0)
    assert set(threads[10:]) == {threading.main_thread().name}
    assert parallel[:4] == serial[:4]  # each fit seeds its own generator: the thread count changes nothing
    for a, b in zip(parallel[4] or [], serial[4] or []):  # the folds' solutions the final fit starts from, too
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_early_stopping_ends_a_fit_once_the_loss_has_clearly_risen_and_keeps_the_same_best_epoch(ants_train):
    """Prechelt's GL criterion beside patience: on ants/bees the held-out loss of a fold bottoms out within a few
    epochs and then climbs; waiting the full patience for it to come back only cost time."""
    from sklearn.model_selection import StratifiedKFold

    x, y = ants_train
    tr, te = next(StratifiedKFold(5, shuffle=True, random_state=0).split(x, y))
    data = heads.FitData(x[tr], y[tr], 2, None, x[te], y[te])
    patient = heads.fit_mlp(data, TrainConfig(patience=15, overfit_stop=1e9), {})
    quick = heads.fit_mlp(data, TrainConfig(patience=15), {})
    assert quick.epochs == patient.epochs and len(quick.history) < len(patient.history)
    assert quick.history[-1]["val_loss"] > 1.1 * min(h["val_loss"] for h in quick.history)
    for k in quick.state:
        np.testing.assert_array_equal(quick.state[k], patient.state[k])


def test_the_warm_started_c_path_finds_each_cold_fits_answer(ants_train):
    """The linear head's candidates share one solver run per fold (each C starts from the stronger one's solution):
    a speed-up only, so every C must predict what a fit from zero predicts."""
    x, y = ants_train
    data = heads.FitData(x, y, 2)
    grid = [{"C": 0.5}, {"C": 0.05}]  # any order in, the same order out
    path = heads.fit_linear_path(data, TrainConfig(), grid)
    for params, warm in zip(grid, path):
        cold = heads.fit_linear(data, TrainConfig(), params)
        assert warm.params == params
        p_warm, p_cold = (heads.proba(heads.spec("linear", x.shape[1], TrainConfig()), f.state, x) for f in (warm, cold))
        assert (p_warm.argmax(1) == p_cold.argmax(1)).all()
        assert np.abs(p_warm - p_cold).max() < 1e-3


def test_the_search_runs_three_folds_from_two_thousand_training_photos_unless_told(ants_train):
    """cv_folds="auto": every photo is held out once either way, and past 2 000 photos a fit on two thirds of them is
    as telling as one on four fifths, at about half the search's cost. A number given is kept as given."""
    from headstart.config import cv_folds_for

    assert [cv_folds_for("auto", n) for n in (10, 1999, 2000, 10**6)] == [5, 5, 3, 3]
    assert cv_folds_for(7, 10**6) == 7 and cv_folds_for(3, 10) == 3
    x, y = ants_train
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(x), 2000)  # the real embeddings, tiled with noise to the size where the rule starts
    big = x[idx] + rng.normal(0, 0.3, (len(idx), x.shape[1])).astype(np.float32) * x.std(0)
    for cv_folds, folds in (("auto", 3), (5, 5)):
        cfg = TrainConfig(head="linear", cv_folds=cv_folds, cache_dir=None)
        kind, _, _, table, start = heads.select(big, y[idx], 2, cfg)
        assert len(start) == folds and {r["folds"] for r in table} == {folds}
    *_, table, start = heads.select(x, y, 2, TrainConfig(head="linear", cache_dir=None))
    assert len(start) == 5 and {r["folds"] for r in table} == {5}


def test_the_search_and_the_audits_held_out_probabilities_fold_the_same_way(ants_train):
    """A class of the label set with no training row (relabelled here) neither stops the search's cross-validation
    nor the audit's; a class with a single row stops both, since that row could never be held out."""
    x, y = ants_train
    relabelled = np.where(y == 1, 2, 0)  # classes 0 and 2 of 3
    cfg = TrainConfig(head="linear", cache_dir=None)
    *_, table, start = heads.select(x, relabelled, 3, cfg)
    assert len(start) == 5 and {r["folds"] for r in table} == {5}
    p = heads.out_of_fold(x, relabelled, 3, cfg)
    assert (p.argmax(1) == relabelled).mean() > 0.85 and float(p[:, 1].max()) < 0.5
    lone = relabelled.copy()
    lone[0] = 1
    assert heads.select(x, lone, 3, cfg)[3] == [] and np.allclose(heads.out_of_fold(x, lone, 3, cfg), 1 / 3)


def test_the_search_leaves_the_mlp_out_below_three_photos_a_class_unless_asked(ants_train, caplog):
    """At 2 photos a class each fold would fit the MLP on one photo a class and judge it on one (on the training
    photos not drawn it scored 7-14 pt below the linear head): auto keeps to the linear head, and says so; from 3 it
    is a candidate again; --head mlp is obeyed at any size."""
    x, y = ants_train
    rng = np.random.default_rng(0)
    cfg = TrainConfig(cache_dir=None)
    for n, kinds in ((1, set()), (2, {"linear"}), (3, {"mlp", "linear"})):
        idx = np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c in (0, 1)])
        with caplog.at_level(logging.INFO, logger="headstart"):
            caplog.clear()
            kind, _, _, table, _ = heads.select(x[idx], y[idx], 2, cfg)
        assert {r["kind"] for r in table} == kinds and (kind == "linear" or n >= 3)
        assert ("too few to choose an MLP" in caplog.text) == (n == 2)  # at 1, "no cross-validation" says it all
        if n == 2:
            assert heads.select(x[idx], y[idx], 2, TrainConfig(head="mlp", cache_dir=None))[0] == "mlp"
    assert [k for k, _ in heads.candidates("auto", 2)] == ["linear", "linear"] and heads.candidates("mlp", 2)[0][0] == "mlp"


def test_the_numpy_adam_takes_torchs_steps():
    """The MLP head trains with a hand-fused Adam (numpy, no torch import): it must move the weights exactly as
    torch.optim.Adam with the same L2 weight decay does."""
    import torch

    rng = np.random.default_rng(0)
    ours = [rng.normal(size=(50, 20)).astype(np.float32), rng.normal(size=20).astype(np.float32)]
    theirs = [torch.tensor(a.copy(), requires_grad=True) for a in ours]
    opt, adam = torch.optim.Adam(theirs, lr=1e-3, weight_decay=1e-4), heads._Adam(ours, 1e-3, 1e-4)
    for _ in range(50):
        grads = [rng.normal(size=a.shape).astype(np.float32) for a in ours]
        for t, g in zip(theirs, grads):
            t.grad = torch.tensor(g.copy())
        opt.step()
        adam.step([g.copy() for g in grads])
    for a, t in zip(ours, theirs):
        np.testing.assert_allclose(a, t.detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("classes", [2, 4])
def test_the_final_linear_fit_started_from_the_folds_finds_the_answer_from_zero(ants_train, classes):
    """The final fit starts from the folds' solutions moved into its own standardisation and averaged: a speed-up
    only (a convex problem has one optimum), so it must predict what a fit from zero predicts, for two classes
    (scikit-learn's one-logit layout) and for several with one absent from the training photos."""
    x, y = ants_train
    if classes == 4:  # three classes present (ants split by a feature), class 3 absent: its row stays unpredicted
        y = np.where((y == 0) & (x[:, 0] > np.median(x[:, 0])), 2, y)
    cfg = TrainConfig(head="linear", cache_dir=None)
    kind, params, _, table, start = heads.select(x, y, classes, cfg)
    assert kind == "linear" and len(start) == 5 and table
    warm = heads.fit_linear(heads.FitData(x, y, classes, start=start), cfg, params)
    cold = heads.fit_linear(heads.FitData(x, y, classes), cfg, params)
    p_warm, p_cold = (heads.proba(heads.spec("linear", x.shape[1], cfg), f.state, x) for f in (warm, cold))
    assert (p_warm.argmax(1) == p_cold.argmax(1)).all()
    assert np.abs(p_warm - p_cold).max() < 5e-3  # both stop within the solver's tolerance (1e-4) of one optimum
    assert (p_warm[:, classes - 1] < 1e-6).all() if classes == 4 else True


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_a_channel_no_training_photo_activates_does_not_sway_other_photos(ants_train, kind):
    """With 5 photos a class, about 25 of Lite0's 1 280 channels are 0 on every one of them. Dividing by their spread
    (0, plus 1e-6) made any other photo that activates such a channel an input 10^4-10^6 times too large: measured,
    the MLP head's validation accuracy on ants/bees was 57 % against 77 % (10 a class: 80 % against 89 %, 10 draws).
    Such a channel is left unscaled, so it weighs what the head learnt of it: nothing."""
    x, y = ants_train
    rng = np.random.default_rng(0)
    fit_i = np.concatenate([rng.choice(np.flatnonzero(y == c), 5, replace=False) for c in (0, 1)])
    rest = np.setdiff1d(np.arange(len(y)), fit_i)
    dead = x[fit_i].max(0) == 0
    assert dead.sum() >= 5 and (x[rest][:, dead] > 0).any(1).mean() > 0.3  # the case itself, on real photos
    cfg = TrainConfig(head=kind)
    fit = heads.HEADS[kind].fit(heads.FitData(x[fit_i], y[fit_i], 2), cfg, dict(heads.HEADS[kind].candidates[0]), 20)
    assert np.all(fit.state["0.std"][dead] == 1)
    spec = heads.spec(kind, x.shape[1], cfg)
    as_seen = x[rest].copy()
    as_seen[:, dead] = 0  # the same photos as the training photos showed those channels
    p, p_seen = heads.proba(spec, fit.state, x[rest]), heads.proba(spec, fit.state, as_seen)
    assert np.abs(p - p_seen).max() < 0.05
    assert (p.argmax(1) == y[rest]).mean() >= 0.65


def test_a_lead_of_one_photo_is_noise_even_when_the_folds_agree():
    """Two folds of 4 photos: the MLP right on 3 of each, the linear head on 5 of the 8. The MLP's folds agree, so
    the fold-only standard error was 0 and took a one-photo lead for a real one; the binomial error of 8 photos
    does not."""
    mlp = heads._summary("mlp", {}, [(0.75, 0.5, 5), (0.75, 0.5, 5)], photos=8)
    linear = heads._summary("linear", {"C": 0.05}, [(0.75, 0.5, 0), (0.5, 0.7, 0)], photos=8)
    assert mlp["cv_se"] > 0.15 and heads.chosen([mlp, linear])["kind"] == "linear"
    # with 1 000 photos the same kind of lead is real, and a wide spread of the folds still counts
    mlp, linear = (heads._summary(k, p, [(a, 0.3, 5), (a, 0.3, 5)], photos=1000) for k, p, a in (("mlp", {}, 0.9), ("linear", {"C": 0.05}, 0.85)))
    assert mlp["cv_se"] < 0.01 and heads.chosen([mlp, linear])["kind"] == "mlp"
    assert heads.standard_error([0.6, 1.0], 0.8, 1000) == pytest.approx(0.2)
