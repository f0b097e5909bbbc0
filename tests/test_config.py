"""TrainConfig judges every value when it is made, and the command line asks it before any work: a bad value is
refused with the field, the value and what is allowed, and leaves no run folder; a setting the run would not use
is said as a warning."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import HYMENOPTERA
from headstart import config
from headstart.cli import main
from headstart.config import CHOICES, ConfigError, TrainConfig
from headstart.data import HeadstartError


def test_config_imports_nothing_from_headstart():
    """The bottom layer: anything may import it, so it may import nothing of ours."""
    for node in ast.walk(ast.parse(Path(config.__file__).read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("headstart"), ast.unparse(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("headstart") for a in node.names), ast.unparse(node)


def test_every_field_is_checked():
    """A field added without a rule would let anything through: each one refuses a value of the wrong kind."""
    for f in dataclasses.fields(TrainConfig):
        with pytest.raises(ConfigError) as e:
            TrainConfig(**{f.name: object()})
        assert e.value.field == f.name and str(e.value).startswith(f"{f.name}=<object object"), str(e.value)
        assert isinstance(e.value, HeadstartError)


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_choice_fields_refuse_a_bad_value_listing_the_allowed_ones(name):
    assert name in {"head", "class_weights", "precision", "runtime"} and len(CHOICES) == 4
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{name: "bogus"})
    assert str(e.value) == f"{name}='bogus' is not a choice: give one of {', '.join(CHOICES[name])}"
    for value in CHOICES[name]:
        assert getattr(TrainConfig(**{name: value}), name) == value


@pytest.mark.parametrize("name, value, message", [
    ("val_fraction", 1.5, "val_fraction=1.5 is out of range: give a number between 0 and 1 (exclusive)"),
    ("val_fraction", 0.0, "val_fraction=0.0 is out of range: give a number between 0 and 1 (exclusive)"),
    ("cv_folds", 1, "cv_folds=1 is out of range: give a whole number of at least 2"),
    ("hidden", 0, "hidden=0 is out of range: give a whole number of at least 1"),
    ("hidden", 2.5, "hidden=2.5 is not a whole number: give a whole number of at least 1"),
    ("dropout", 1.0, "dropout=1.0 is out of range: give a number from 0 up to, not including, 1"),
    ("dropout", -0.1, "dropout=-0.1 is out of range"),
    ("lr", 0.0, "lr=0.0 is out of range: give a number above 0"),
    ("lr", math.nan, "lr=nan is out of range: give a number above 0"),
    ("ft_lr", -1e-3, "ft_lr=-0.001 is out of range: give a number above 0"),
    ("backbone_lr_ratio", 0, "backbone_lr_ratio=0 is out of range: give a number above 0"),
    ("weight_decay", -1e-4, "weight_decay=-0.0001 is out of range: give a number of at least 0"),
    ("ft_weight_decay", "0.1", "ft_weight_decay='0.1' is not a number: give a number of at least 0"),
    ("label_smoothing", 1.0, "label_smoothing=1.0 is out of range: give a number from 0 up to, not including, 1"),
    ("max_epochs", 0, "max_epochs=0 is out of range: give a whole number of at least 1"),
    ("patience", 0, "patience=0 is out of range"),
    ("ft_epochs", 0, "ft_epochs=0 is out of range"),
    ("ft_patience", 0, "ft_patience=0 is out of range"),
    ("scratch_epochs", 0, "scratch_epochs=0 is out of range"),
    ("scratch_patience", 0, "scratch_patience=0 is out of range"),
    ("batch_size", 0, "batch_size=0 is out of range"),
    ("head_batch_size", 0, "head_batch_size=0 is out of range"),
    ("ft_batch_size", -4, "ft_batch_size=-4 is out of range"),
    ("top_k", 0, "top_k=0 is out of range: give a whole number of at least 1"),
    ("cv_folds", "many", "cv_folds='many' is not a whole number: give a whole number of at least 2, or auto"),
    ("unfreeze", -1, "unfreeze=-1 is out of range: give a whole number of at least 0"),
    ("unfreeze_layers", -1, "unfreeze_layers=-1 is out of range: give a whole number of at least 0"),
    ("aug_views", -1, "aug_views=-1 is out of range: give a whole number of at least 0"),
    ("workers", -2, "workers=-2 is out of range: give a whole number of at least -1"),
    ("seed", -1, "seed=-1 is out of range: give a whole number from 0 to 4294967295"),
    ("seed", 1.5, "seed=1.5 is not a whole number"),
    ("seed", True, "seed=True is not a whole number"),
    ("input_size", 16, "input_size=16 is out of range: give a whole number from 32 to 1024"),
    ("input_size", 2048, "input_size=2048 is out of range: give a whole number from 32 to 1024"),
    ("crop_pct", 2, "crop_pct=2 is out of range: give a number from 0.3 to 1.0 (1.0 = the whole frame), or auto"),
    ("crop_pct", 0.1, "crop_pct=0.1 is out of range: give a number from 0.3 to 1.0"),
    ("crop_pct", "whole", "crop_pct='whole' is not a share of the frame: give a number from 0.3 to 1.0 (1.0 = the whole frame), or auto"),
    ("augment", "foo+classic", "augment='foo+classic' has an unknown policy 'foo': give one of none, classic, rrc, randaugment, "
                               "erasing, or several joined with + (e.g. randaugment+erasing)"),
    ("augment", "", "augment='' has an unknown policy ''"),
    ("finetune", "yes", "finetune='yes' is not a yes/no value: give True or False"),
    ("channels_last", 1, "channels_last=1 is not a yes/no value: give True or False"),
    ("train_bn", None, "train_bn=None is not a yes/no value"),
    ("backbone", " ", "backbone=' ' is not a backbone name"),
    ("weights", 3, "weights=3 is not a path: give a weight file, 'random' or None"),
])
def test_bad_values_are_refused_naming_field_value_and_what_is_allowed(name, value, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{name: value})
    assert str(e.value).startswith(message) and e.value.field == name


def test_edges_of_each_range_are_accepted_and_stored_plainly(tmp_path):
    cfg = TrainConfig(val_fraction=0.01, cv_folds=2, dropout=0, label_smoothing=0, crop_pct=0.3, input_size=32, workers=-1,
                      aug_views=0, unfreeze=0, seed=np.int64(2**32 - 1), augment="none", cache_dir=tmp_path, weights="random")
    assert cfg.seed == 2**32 - 1 and type(cfg.seed) is int  # saved as JSON into the run folder
    assert type(cfg.dropout) is float and cfg.cache_dir == str(tmp_path)
    assert TrainConfig(crop_pct=1, input_size=1024).crop_pct == 1.0
    assert TrainConfig(crop_pct="auto").crop_pct == "auto" and TrainConfig(crop_pct=None, input_size=None).crop_pct is None
    assert TrainConfig(augment="randaugment+erasing").augment == "randaugment+erasing"
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_replace_and_from_dict_check_too():
    with pytest.raises(ConfigError, match=r"^val_fraction=1\.5 is out of range"):
        dataclasses.replace(TrainConfig(), val_fraction=1.5)
    with pytest.raises(ConfigError, match=r"^head='cnn' is not a choice: give one of auto, mlp, linear$"):
        TrainConfig.from_dict({"head": "cnn", "not_a_field": 1})


def test_onnxruntime_with_bf16_is_refused_at_entry():
    """ONNX Runtime extracts in fp32 only: the pair would otherwise fail at extraction, after the backbone loaded."""
    with pytest.raises(ConfigError, match="precision='bf16' cannot go with runtime='onnxruntime'") as e:
        TrainConfig(precision="bf16", runtime="onnxruntime")
    assert e.value.field == "precision"
    TrainConfig(precision="bf16", runtime="pytorch")


# ---------------------------------------------------------------------------------- settings a run would not use


def test_defaults_ignore_nothing():
    for cfg in (TrainConfig(), TrainConfig(finetune=True), TrainConfig(backbone="scratch"), TrainConfig(head="linear")):
        assert cfg.ignored() == []


def test_augmentation_is_ignored_only_where_nothing_is_augmented():
    [line] = TrainConfig(augment="randaugment").ignored()
    assert line.startswith("augment='randaugment' is ignored: augmentation applies only when fine-tuning"), line
    assert TrainConfig(augment="randaugment", finetune=True).ignored() == []
    assert TrainConfig(augment="randaugment", aug_views=2).ignored() == []  # cached augmented views for the head
    assert TrainConfig(augment="randaugment", backbone="scratch", scratch_epochs=2).ignored() == []  # the scratch loop


def test_fine_tuning_settings_without_finetune_are_ignored():
    lines = TrainConfig(ft_epochs=2, unfreeze=4, train_bn=True, label_smoothing=0.0).ignored()
    assert [line.split(" is ignored")[0] for line in lines] == ["unfreeze=4", "ft_epochs=2", "label_smoothing=0.0", "train_bn=True"]
    assert all("applies only when fine-tuning" in line for line in lines)
    assert TrainConfig(ft_epochs=2, unfreeze=4, train_bn=True, label_smoothing=0.0, finetune=True).ignored() == []


def test_unfreeze_layers_overrides_unfreeze():
    assert TrainConfig(finetune=True, unfreeze=4, unfreeze_layers=10).ignored() == [
        "unfreeze=4 is ignored: unfreeze_layers=10 chooses what is unfrozen instead"]


def test_scratch_ignores_fine_tuning_weights_and_the_head_stage():
    lines = TrainConfig(backbone="Scratch", finetune=True, head="mlp", weights="w.safetensors", crop_pct="auto",
                        scratch_epochs=3, lr=3e-3).ignored()
    named = {line.split("=")[0] for line in lines}
    assert named == {"finetune", "head", "weights", "crop_pct"}, lines  # scratch_epochs and lr drive the scratch loop
    assert all("backbone 'scratch'" in line for line in lines)
    assert TrainConfig(scratch_epochs=3).ignored() == ["scratch_epochs=3 is ignored: it applies to backbone 'scratch' only"]


def test_mlp_settings_with_a_linear_head_and_top_k_are_ignored():
    assert {line.split("=")[0] for line in TrainConfig(head="linear", hidden=512, dropout=0.2, top_k=3).ignored()} == {
        "hidden", "dropout", "top_k"}
    assert TrainConfig(head="mlp", hidden=512).ignored() == []


# ---------------------------------------------------------------------------------------- through the command line


def test_cli_refuses_val_fraction_out_of_range_and_makes_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no --out: not even the default runs/<data> appears
    r = CliRunner().invoke(main, ["train", str(HYMENOPTERA), "--val-fraction", "1.5"])
    assert r.exit_code == 2, r.output
    assert "headstart: error: val_fraction=1.5 is out of range: give a number between 0 and 1 (exclusive)" in r.output
    assert "Traceback" not in r.output and list(tmp_path.iterdir()) == []
    r = CliRunner().invoke(main, ["train", str(HYMENOPTERA), "--val-fraction", "1.5", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and not (tmp_path / "run").exists()


def test_cli_refuses_an_unknown_augmentation_before_any_work(tmp_path):
    r = CliRunner().invoke(main, ["train", str(HYMENOPTERA), "--augment", "foo+classic", "--finetune", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert "headstart: error: augment='foo+classic' has an unknown policy 'foo': give one of none, classic" in r.output
    assert "data:" not in r.output and "backbone:" not in r.output  # neither the scan nor the backbone ran
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "compare"])
def test_cli_refuses_crop_pct_and_runtime_out_of_bounds(tmp_path, command):
    extra = ["--backbones", "efficientnet_lite0"] if command == "compare" else []
    r = CliRunner().invoke(main, [command, str(HYMENOPTERA), *extra, "--crop-pct", "2", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "headstart: error: crop_pct=2.0 is out of range: give a number from 0.3 to 1.0" in r.output, r.output
    r = CliRunner().invoke(main, [command, str(HYMENOPTERA), *extra, "--runtime", "foo", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "'foo' is not one of 'auto', 'onnxruntime', 'pytorch'" in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_cli_warns_of_an_ignored_option_and_still_trains(tmp_path):
    """--augment without --finetune augments nothing: said on stderr, and the run goes ahead."""
    photos = tmp_path / "photos"
    for cls in ("ants", "bees"):
        (photos / cls).mkdir(parents=True)
        for src in sorted((HYMENOPTERA / "train" / cls).glob("*.jpg"))[:6]:
            shutil.copy(src, photos / cls / src.name)
    args = ["train", str(photos), "--head", "linear", "--runtime", "pytorch", "--quiet", "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(main, [*args, "--augment", "randaugment"])
    assert r.exit_code == 0, r.output
    assert "headstart: warning: augment='randaugment' is ignored: augmentation applies only when fine-tuning" in r.stderr
    assert "warning" not in r.stdout
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["augment"] == "randaugment"  # the checked config ran


def test_compare_warns_per_backbone_before_any_work(tmp_path):
    """compare's settings go to every backbone: what one of them (here the from-scratch net) would not use is said,
    then the run starts (and here stops at the scan, on a folder with one class)."""
    (tmp_path / "photos" / "only").mkdir(parents=True)
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "photos"), "--backbones", "efficientnet_lite0,scratch", "--head", "linear",
                                  "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("headstart: warning: ") == 1
    assert "headstart: warning: head='linear' is ignored: backbone 'scratch' has no head stage on cached features" in r.stderr


def test_an_unknown_backbone_is_refused_before_the_folder_is_listed(tmp_path):
    """The name is checked first: here the folder does not even exist, and the error is about the backbone."""
    import headstart

    with pytest.raises(HeadstartError, match="unknown backbone 'nosuchnet'"):
        headstart.train(tmp_path / "no-such-folder", out=tmp_path / "run", backbone="nosuchnet", progress=False)
    assert not (tmp_path / "run").exists()


def test_ft_lr_takes_a_rate_or_auto_and_auto_needs_the_cached_bottom():
    assert TrainConfig(ft_lr="auto", cache_bottom=True).ft_lr == "auto"
    with pytest.raises(ConfigError, match=r"ft_lr='fast' is not a number: give a number above 0, or auto"):
        TrainConfig(ft_lr="fast")
    assert TrainConfig(ft_lr="auto").ft_lr == "auto"  # fine-tuning runs on cached activations by default
    with pytest.raises(ConfigError, match="give cache_bottom=True"):
        TrainConfig(ft_lr="auto", cache_bottom=False)
