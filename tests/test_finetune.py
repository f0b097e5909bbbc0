"""Fine-tuning, augmentation, checkpoints/resume and the from-scratch baseline, on real photos."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import headstart
from conftest import HYMENOPTERA, ants_bees
from headstart import backbones, report
from headstart.transforms import seed, train_transform
from headstart.features import resolve_precision
from headstart.finetune import CHECKPOINT, freeze_batchnorm, unfreeze_top


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return ants_bees(tmp_path_factory.mktemp("small"), {"train": 24, "val": 12})


def test_unfreeze_top_blocks_or_last_layers():
    model = backbones.load("efficientnet_lite0").model
    model.reset_classifier(0)
    names = unfreeze_top(model, blocks=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("blocks.6", "blocks.5", "conv_head", "bn2")) for n in trainable)
    assert not any(p.requires_grad for p in model.conv_stem.parameters())
    assert names
    unfreeze_top(model, layers=2)  # the Keras way: conv_head and bn2
    assert sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}) == ["bn2", "conv_head"]


@pytest.mark.slow
def test_frozen_batchnorm_statistics_do_not_move(small, tmp_path):
    from safetensors import safe_open

    from headstart.config import TrainConfig
    from headstart.data import scan, train_val_split
    from headstart.finetune import Net, fit
    from headstart import heads

    lb = backbones.load("efficientnet_lite0")
    lb.model.reset_classifier(0)
    before = {k: v.clone() for k, v in lb.model.state_dict().items()}
    tr, va, _ = train_val_split(scan(small))
    net = Net(lb.model, heads.to_torch({"kind": "linear", "dim": lb.num_features}, 2))  # an untrained head: strong gradients
    fit(net, tr, va, lb.data_config, TrainConfig(ft_epochs=1, unfreeze=3), checkpoint_dir=tmp_path, progress=False)
    with safe_open(str(tmp_path / CHECKPOINT), framework="pt") as f:  # the weights as the epoch left them
        after = {k[len("net.backbone."):]: f.get_tensor(k) for k in f.keys() if k.startswith("net.backbone.")}
    stats = [k for k in before if "running_" in k]
    assert stats and all(torch.equal(after[k], before[k]) for k in stats)
    assert not torch.equal(after["conv_head.weight"], before["conv_head.weight"])  # the unfrozen top did learn
    assert torch.equal(after["conv_stem.weight"], before["conv_stem.weight"])  # the frozen bottom did not


def test_freeze_batchnorm_puts_bn_in_eval():
    model = backbones.load("efficientnet_lite0").model.train()
    freeze_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)


def _run(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "headstart", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_fine_tuning_resumes_to_the_same_result(small, tmp_path):
    env = dict(os.environ)
    common = [str(small), "--finetune", "--no-cache-bottom", "--epochs", "3", "--quiet", "--seed", "7",  # the loop that checkpoints
              "--input-size", "224"]  # the size search has tests of its own; three processes need not repeat it
    killed = tmp_path / "killed"
    proc = _run([*common, "--out", str(killed)], env)
    ckpt = killed / "checkpoint" / CHECKPOINT
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first checkpoint could be interrupted:\n" + proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "config.json").exists()  # no bundle from a killed run
    resumed = _run([str(small), "--resume", str(killed), "--quiet"], env)
    assert resumed.wait() == 0, resumed.stdout.read()
    clean = tmp_path / "clean"
    straight = _run([*common, "--out", str(clean)], env)
    assert straight.wait() == 0, straight.stdout.read()
    a = json.loads((killed / "config.json").read_text())
    b = json.loads((clean / "config.json").read_text())
    assert a["metrics"] == b["metrics"]
    # Every epoch, before and after the interruption, to the last bit: same seed and same thread counts in every
    # process (only the killed one fitted the head; the others read it from the cache) give the same numbers.
    got, want = ([{k: v for k, v in r.items() if k != "seconds"} for r in h["history"]] for h in (a, b))
    assert [r["epoch"] for r in want if r["stage"] == "finetune"] == [0, 1, 2, 3]
    # the head starts from its standardisation: a channel none of the 38 photos activated once made epoch 1's loss 12
    assert all(r["train_loss"] < 1.0 for r in want if r["stage"] == "finetune" and r["epoch"] > 0), want
    assert got == want, f"precision {a['train_config']['precision']} (auto: {resolve_precision('auto')} here), {torch.get_num_threads()} threads"
    assert not ckpt.exists()  # a finished run keeps the bundle, not the checkpoint


@pytest.mark.slow
def test_fine_tuning_keeps_or_beats_feature_extraction(tmp_path, caplog):
    with caplog.at_level("INFO", logger="headstart"):
        clf = headstart.train(HYMENOPTERA, out=tmp_path / "ft", finetune=True, progress=False)
    frozen = clf.info["stages"]["feature_extraction"]["val"]["accuracy"]
    tuned = clf.info["stages"]["finetune"]["val"]["accuracy"]
    kept_start = clf.info["stages"]["finetune"]["best_epoch"] == 0  # then the user is told what that means
    assert ("so the saved model is the frozen backbone with its head" in caplog.text) == kept_start
    assert round((frozen - tuned) * 153) <= 1  # never more than one photo worse (the bar)
    assert clf.info["metrics"]["val"]["accuracy"] == tuned >= 0.96  # the bar; seed 0 measured 97.4 % (288 px)
    chosen = [r["input_size"] for r in clf.info["input_selection"] if r.get("chosen")]  # --finetune searches the size
    assert [r["input_size"] for r in clf.info["input_selection"]] == [224, 256, 288] and len(chosen) == 1
    assert clf.backbone.data_config["input_size"][-1] == chosen[0]
    hist = (tmp_path / "ft" / "history.csv").read_text().splitlines()
    assert hist[0].startswith("stage,epoch") and any(line.startswith("finetune,") for line in hist)
    assert (tmp_path / "ft" / "history.png").stat().st_size > 1000
    reloaded = headstart.load(tmp_path / "ft")  # the fine-tuned backbone travels in the bundle
    assert reloaded.evaluate(HYMENOPTERA / "val")["accuracy"] == pytest.approx(tuned)


@pytest.mark.slow
def test_scratch_baseline_trains_and_shows_the_gap(ants_run, tmp_path, capsys):
    """The baseline scores below transfer; `headstart train`'s summary says what was done (not '153 embeddings
    computed … head: linear', which describes a transfer run), and the log counts parameters readably."""
    from headstart.cli import _print_summary

    said: list[str] = []
    handler, logger = logging.Handler(), logging.getLogger("headstart")
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # as `headstart train` sets it
    try:
        clf = headstart.train(HYMENOPTERA, out=tmp_path / "scratch", backbone="scratch", scratch_epochs=4, progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    acc = clf.info["metrics"]["val"]["accuracy"]
    assert 0.3 <= acc < ants_run[0].info["metrics"]["val"]["accuracy"]
    stage = clf.info["stages"]["scratch"]
    assert stage["epochs_run"] == 4
    assert headstart.load(tmp_path / "scratch").predict([next((HYMENOPTERA / "val" / "ants").glob("*.jpg"))])[0].top
    _print_summary(clf, tmp_path / "scratch")
    out = capsys.readouterr().out
    assert f"trained from scratch for 4 epochs (best epoch {stage['best_epoch']})" in out
    assert "embeddings computed" not in out and "head:" not in out
    assert any(re.fullmatch(r"scratch: \d{1,3}(,\d{3})+ trainable parameters .*", m) for m in said), said


@pytest.mark.slow
def test_scratch_is_reproducible_with_the_same_seed(small):
    """Same seed, same machine, same metrics: the scratch net's new head must start from the seed as well
    (it once drew from whatever state the global RNG was in)."""
    runs = [headstart.train(small, backbone="scratch", scratch_epochs=2, progress=False) for _ in range(2)]
    first, second = ([{k: v for k, v in row.items() if k != "seconds"} for row in r.info["history"]] for r in runs)
    assert first == second
    assert runs[0].info["metrics"] == runs[1].info["metrics"]


@pytest.mark.parametrize("policy", ["none", "classic", "rrc", "randaugment", "randaugment+erasing"])
def test_augmentation_policies_give_model_sized_tensors(policy):
    from PIL import Image

    cfg = backbones.load("efficientnet_lite0").data_config
    img = Image.open(next((HYMENOPTERA / "train" / "bees").glob("*.jpg"))).convert("RGB")
    tf = train_transform(cfg, policy)
    seed(0)
    a = tf(img)
    seed(0)
    assert torch.equal(a, tf(img))  # seeded: reproducible
    assert a.shape == (3, 224, 224)
    if policy != "none":
        assert not torch.equal(a, tf(img))  # and random from call to call


@pytest.mark.slow
def test_augmented_views_are_cached_for_the_head(small):
    first = headstart.train(small, aug_views=2, progress=False)
    assert first.info["timing"]["embeddings_computed"] >= 2 * 48
    again = headstart.train(small, aug_views=2, progress=False)
    assert again.info["timing"]["embeddings_computed"] == 0
    assert again.info["metrics"] == first.info["metrics"]
    assert np.isfinite(again.info["metrics"]["val"]["log_loss"])


# ------------------------------------------------------------------------------------ lr-find, cached bottom


@pytest.fixture(scope="module")
def top_on_ants(small):
    """The unfrozen top of Lite0 (3 blocks) with the real ants/bees head fitted on its frozen features, and the
    bottom activations of the small training set."""
    from headstart import finetune, heads, pipeline
    from headstart.config import TrainConfig

    cfg = TrainConfig(finetune=True, seed=0)
    d = pipeline.split(small, cfg)
    lb = pipeline.load_backbone(cfg)
    net = finetune.Net(lb.model, heads.to_torch(heads.spec("linear", lb.num_features, cfg), 2))
    finetune.unfreeze_top(net.backbone, blocks=3)
    bottom, seq = finetune.split_frozen(net.backbone)
    acts = finetune.activations(bottom, d.train, lb.data_config, None, 0, 16, 0)
    y = np.asarray(d.train.labels)
    with torch.inference_mode():  # the head fitted as the head stage fits it, on the network's own pooled features
        x = net.backbone.forward_head(seq.eval()(acts), pre_logits=True).numpy()
    fitted = heads.fit_linear(heads.FitData(x, y, 2), cfg, {"C": 0.1})
    net.head = heads.to_torch(heads.spec("linear", lb.num_features, cfg), 2, fitted.state)
    for p in net.head.parameters():
        p.requires_grad_(True)
    return finetune.Top(net, seq), bottom, acts, torch.from_numpy(y), cfg


def test_the_top_on_cached_bottom_activations_is_the_whole_backbone(top_on_ants):
    top, bottom, acts, _, _ = top_on_ants
    assert len(bottom) > 10 and len(top.top) == 5  # cut where the trainable blocks begin
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    top.eval()
    with torch.inference_mode():
        assert torch.allclose(top(bottom(x)), top.net(x), atol=1e-4)
    assert acts.shape[0] == 48 and all(not p.requires_grad for p in bottom.parameters())


def test_lr_find_restores_the_exact_model_state(top_on_ants):
    """Parameters, BatchNorm buffers (here allowed to move: train_bn) and module modes are as before the sweep."""
    import dataclasses

    from headstart.finetune import lr_find

    top, _, acts, y, cfg = top_on_ants
    before = {k: v.clone() for k, v in top.state_dict().items()}
    modes = [m.training for m in top.modules()]
    found = lr_find(top, acts, y, dataclasses.replace(cfg, train_bn=True), 1e-3, steps=30, batch_size=8)
    after = top.state_dict()
    assert any("running_var" in k for k in after) and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in top.modules()] == modes
    assert found.lrs and len(found.lrs) == len(found.losses)


def test_lr_find_suggests_a_rate_inside_the_sweep(top_on_ants):
    from headstart.finetune import lr_find

    top, _, acts, y, cfg = top_on_ants
    found = lr_find(top, acts, y, cfg, 1e-3, steps=60, batch_size=8)
    assert set(found.suggestions) == {"valley", "steep", "minimum/10"}
    assert found.lrs[0] <= found.lr <= found.lrs[-1] and found.lr == found.suggestions["valley"]
    assert found.losses[-1] > min(found.losses)  # the sweep went far enough to see the loss climb


def test_a_flat_curve_keeps_the_default_rate_and_says_so(top_on_ants):
    from headstart.finetune import lr_find

    top, _, acts, y, cfg = top_on_ants
    same, label = acts[:1].repeat(48, 1, 1, 1), y[:1].repeat(48)  # one photo in every batch: only the rate moves the loss
    found = lr_find(top, same, label, cfg, 1e-3, start=1e-12, end=1e-11, steps=20, batch_size=8)
    assert found.lr == 1e-3 and found.suggestions == {}
    assert "flat" in found.message and "keeping the default rate 0.001" in found.message
    short = lr_find(top, acts, y, cfg, 1e-3, steps=6, batch_size=8)
    assert short.lr == 1e-3 and "too short" in short.message


@pytest.mark.slow
def test_the_epoch_loop_is_judged_by_held_out_training_photos_and_only_watches_validation(small, tmp_path):
    """The per-epoch loop (checkpoints, --resume, torchrun) chooses its epoch on a fifth of train held out from it, the
    head it starts from refitted without those photos; the validation split, which the run reports, is scored each
    epoch for the record and chooses nothing. When epoch 0 wins, the head fitted on every training photo stays."""
    clf = headstart.train(small, out=tmp_path / "run", finetune=True, cache_bottom=False, ft_epochs=2, progress=False)
    stage = clf.info["stages"]["finetune"]
    sel = stage["selection"]
    assert sel["held_out_photos"] == 10 and sel["fit_photos"] == 38 and sel["loop"] == "per-epoch"
    rows = [r for r in clf.info["history"] if r["stage"] == "finetune"]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all("held_out_loss" in r and "val_loss" in r for r in rows)
    best = 0
    for r in rows[1:]:
        if r["held_out_loss"] < rows[best]["held_out_loss"] - 1e-4:
            best = r["epoch"]
    assert stage["best_epoch"] == best and [r["epoch"] for r in rows if r.get("checkpoint")] == [best]
    if best == 0:
        assert clf.info["metrics"] == clf.info["stages"]["feature_extraction"]
    said = report._finetune_choice(sel)
    assert "judged on 10 training photos held out from a run on the other 38" in said and "The validation split chose nothing" in said


def test_fine_tuning_on_cached_activations_is_chosen_by_held_out_training_photos(small, tmp_path):
    """The held-out fifth of train decides; the validation split is only watched; the history has the learning
    rate of every step and marks the kept epoch; lr-find's curve lands in the run folder."""
    clf = headstart.train(small, out=tmp_path / "run", finetune=True, cache_bottom=True, ft_epochs=2, ft_views=1,
                          ft_lr="auto", input_size=224, progress=False)  # the size search has tests of its own
    stage = clf.info["stages"]["finetune"]
    sel = stage["selection"]
    assert sel["held_out_photos"] == 10 and sel["fit_photos"] == 38 and sel["lr_source"] in ("lr-find (valley)", "default")
    assert stage["best_epoch"] == (2 if sel["loss_after"] < sel["loss_before"] else 0)
    shares = {float(a): v for a, v in sel["blends"].items()}  # the held-out photos' calibrated loss for each blend
    assert set(shares) == {0.0, 0.25, 0.5, 0.75, 1.0} and sel["blend"] == min(shares, key=lambda a: (shares[a], a))
    assert sel["loss_after"] == shares[sel["blend"]] and (sel["blend"] > 0) == (stage["best_epoch"] == 2)
    if stage["best_epoch"] == 0:  # the frozen head stays, exactly
        assert clf.info["metrics"] == {k: v for k, v in clf.info["stages"]["feature_extraction"].items()}
    history = clf.info["history"]
    steps = [r for r in history if r["stage"] == "finetune-check" and "lr" in r]
    assert len(steps) == 2 * 2 and max(r["lr"] for r in steps) <= sel["lr"] * (1 + 1e-6)  # 38 photos: 2 steps an epoch
    assert [r["epoch"] for r in history if r.get("checkpoint")] == [stage["best_epoch"]]
    assert (tmp_path / "run" / "history.png").stat().st_size > 1000
    assert (tmp_path / "run" / "lr_find.csv").read_text().startswith("lr,smoothed_loss")


def test_a_blend_is_the_weighted_average_of_the_start_and_the_fine_tuned_weights():
    """WiSE-FT's interpolation: 0 gives the start back, 1 the end, a share between them the weighted mean of every
    floating-point tensor (BatchNorm's running statistics too); integer counters come from the end."""
    from headstart.finetune import blend

    torch.manual_seed(0)
    start, end = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)), torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    end[1].running_mean += 2.0
    end[1].num_batches_tracked += 5
    s, e = start.state_dict(), end.state_dict()
    assert all(torch.equal(blend(s, e, 0.0)[k], s[k]) for k in s if s[k].is_floating_point())
    assert all(torch.equal(blend(s, e, 1.0)[k], e[k]) for k in s)
    mid = blend(s, e, 0.25)
    assert torch.allclose(mid["0.weight"], 0.75 * s["0.weight"] + 0.25 * e["0.weight"])
    assert torch.allclose(mid["1.running_mean"], s["1.running_mean"] + 0.5) and int(mid["1.num_batches_tracked"]) == 5


def test_the_calibrated_loss_forgives_a_confidence_level_but_not_a_wrong_ranking():
    """Temperature scaling is why a fine-tuned network trained with label smoothing can win the held-out check:
    the same scores at any confidence give the same calibrated loss; scores that rank the wrong class first lose."""
    from headstart.finetune import calibrated_loss

    torch.manual_seed(0)
    y = torch.randint(0, 5, (200,))
    logits = torch.randn(200, 5) + 3 * torch.nn.functional.one_hot(y, 5)
    scores = torch.nn.Identity()  # the "network" is its input: the logits themselves
    timid = logits / 4  # the same ranking, a quarter of the confidence (what label smoothing pushes toward)
    assert calibrated_loss(scores, timid, y) == pytest.approx(calibrated_loss(scores, logits, y), rel=0.05)
    raw = torch.nn.functional.cross_entropy
    assert raw(timid, y) > 1.5 * raw(logits, y)  # what the raw loss would have said
    worse = logits.clone()
    worse[:40] = torch.randn(40, 5)  # a fifth of the photos no longer ranked right
    assert calibrated_loss(scores, worse, y) > calibrated_loss(scores, logits, y) + 0.05


def test_too_few_training_photos_to_hold_any_out_keep_the_frozen_head_instead_of_crashing(tmp_path):
    """Four training photos of two classes: a fifth held out cannot stand for both classes (scikit-learn refused, and
    --finetune crashed with its traceback). Nothing can judge fine-tuning, so the frozen head stays, and the run says so."""
    from headstart.finetune import TOO_FEW, held_out

    assert held_out([0, 0, 1, 1], 0.2, 0) == ([0, 1, 2, 3], [])
    fit_i, held_i = held_out([0] * 10 + [1] * 10, 0.2, 0)
    assert len(held_i) == 4 and sorted(fit_i + held_i) == list(range(20))
    for split, n in (("train", 2), ("val", 1)):
        for cls in ("ants", "bees"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for p in sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:n]:
                (tmp_path / "data" / split / cls / p.name).write_bytes(p.read_bytes())
    clf = headstart.train(tmp_path / "data", out=tmp_path / "run", finetune=True, ft_epochs=1, input_size=224,
                          progress=False)
    stage = clf.info["stages"]["finetune"]
    assert stage["best_epoch"] == 0 and stage["selection"]["skipped"] == TOO_FEW
    assert clf.info["metrics"] == clf.info["stages"]["feature_extraction"]
    assert "Fine-tuning was not run: " + TOO_FEW in (tmp_path / "run" / "report.html").read_text()


def test_the_bottom_activations_come_from_onnx_runtime_with_pytorchs_numbers(top_on_ants, small, tmp_path, monkeypatch, caplog):
    """The frozen bottom runs in ONNX Runtime (4x PyTorch's fp32 speed on Lite0's bottom): its activations must be
    PyTorch's to 1e-3 of their scale; --runtime pytorch keeps PyTorch, and a bottom whose export is refused falls
    back to PyTorch with a warning instead of failing the run."""
    from headstart import finetune, onnx, pipeline

    _, bottom, acts, _, cfg = top_on_ants  # computed with the default runtime
    d, lb = pipeline.split(small, cfg), pipeline.load_backbone(cfg)
    ort = finetune.activations(bottom, d.train, lb.data_config, None, 0, 16, 0, cache_dir=str(tmp_path / "ort"))
    assert list((tmp_path / "ort" / "onnx").glob("*.onnx"))  # the bottom's graph, kept for the next run
    torch_acts = finetune.activations(bottom, d.train, lb.data_config, None, 0, 16, 0, cache_dir=str(tmp_path / "pt"), runtime="pytorch")
    assert not (tmp_path / "pt" / "onnx").exists()
    scale = float(torch_acts.abs().max())
    assert float((ort - torch_acts).abs().max()) <= 1e-3 * scale and torch.equal(ort, acts)

    def fail(*_):
        raise AssertionError("a repeated call built a session or recomputed the activations")

    with monkeypatch.context() as m:  # only for the repeated call
        m.setattr(onnx, "bottom_session", fail)
        m.setattr(finetune, "_Augmented", fail)
        assert torch.equal(finetune.activations(bottom, d.train, lb.data_config, None, 0, 16, 0, cache_dir=str(tmp_path / "ort")), ort)

    def refuse(*_):
        raise onnx.ExportError("export failed: planted")

    monkeypatch.setattr(onnx, "bottom_graph", refuse)
    monkeypatch.setattr(onnx, "_REFUSED", {})  # the refusal is remembered for the process: only for this test's
    with caplog.at_level("WARNING", logger="headstart"):
        fallback = finetune.activations(bottom, d.train, lb.data_config, None, 0, 16, 0, cache_dir=str(tmp_path / "refused"))
    assert "computing its activations in PyTorch" in caplog.text and torch.equal(fallback, torch_acts)
    monkeypatch.setattr(finetune, "_Augmented", fail)  # refused again (remembered): PyTorch's entry is read back
    assert torch.equal(finetune.activations(bottom, d.train, lb.data_config, None, 0, 16, 0, cache_dir=str(tmp_path / "refused")), torch_acts)
