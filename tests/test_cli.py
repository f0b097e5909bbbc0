"""The command line as a user types it."""

from __future__ import annotations

import dataclasses
import json

import click
import pytest
from click.testing import CliRunner

from conftest import HYMENOPTERA
from headstart.cli import main
from headstart.config import CHOICES, TrainConfig


def test_predict_json_and_csv(ants_run):
    _, out = ants_run
    folder = HYMENOPTERA / "val" / "ants"
    r = CliRunner().invoke(main, ["predict", str(out), str(folder), "--json", "-k", "2"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert len(rows) == 70 and sum(row["label"] == "ants" for row in rows) >= 63
    r = CliRunner().invoke(main, ["predict", str(out), str(next(folder.glob("*.jpg"))), "--csv"])
    assert r.exit_code == 0 and r.output.splitlines()[0] == "path,label,probability,top_k"


def test_backbones_lists_availability():
    r = CliRunner().invoke(main, ["backbones", "--json"])
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert rows["efficientnet_lite0"]["weights"] == "package" and rows["inception_v3"]["input"] == 299


def test_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "only").mkdir()
    r = CliRunner().invoke(main, ["train", str(tmp_path), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "headstart: error:" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["predict", str(tmp_path)])
    assert r.exit_code == 2 and "give a run folder" in r.output


def test_train_json_summary(tmp_path):
    r = CliRunner().invoke(main, ["train", str(HYMENOPTERA), "--out", str(tmp_path / "r"), "--json", "--head", "linear"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["metrics"]["val"]["accuracy"] >= 0.93 and summary["head"]["kind"] == "linear"
    lo, hi = summary["metrics"]["val"]["accuracy_ci95"]
    assert lo < summary["metrics"]["val"]["accuracy"] < hi < 1


def test_crop_pct_takes_a_share_or_auto(tmp_path):
    for bad in ("2", "0.1", "whole"):
        r = CliRunner().invoke(main, ["train", str(HYMENOPTERA), "--crop-pct", bad, "--out", str(tmp_path / "r")])
        assert r.exit_code == 2 and "from 0.3 to 1.0" in r.output and "or auto" in r.output, r.output
    assert not (tmp_path / "r").exists()


# Options of train/compare that the commands handle themselves; every other option is a TrainConfig field.
COMMAND_OPTIONS = {
    "train": ({"out", "resume_run", "nproc", "quiet", "as_json"}, [str(HYMENOPTERA)]),
    "compare": ({"names", "out", "ensemble", "require_pretrained", "weight_files", "quiet", "as_json"}, [str(HYMENOPTERA), "--backbones", "a,b"]),
}


def test_training_options_are_train_config_fields_with_its_defaults_and_choices():
    """The command line cannot drift from the API: what a command receives for an option not given is the
    dataclass's default, and a choice option offers exactly the field's Literal values."""
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, (own, args) in COMMAND_OPTIONS.items():
        cmd = main.commands[name]
        received = cmd.make_context(name, list(args)).params  # as the command function gets them
        options = [p for p in cmd.params if isinstance(p, click.Option)]
        assert own <= {p.name for p in options}, f"{name}: {own - {p.name for p in options}} no longer exist"
        checked = 0
        for p in options:
            if p.name in own:
                continue
            assert p.name in fields, f"{name} {p.opts[0]} maps to no TrainConfig field ({p.name})"
            assert received[p.name] == fields[p.name], f"{name} {p.opts[0]}: default {received[p.name]!r} != {fields[p.name]!r}"
            if p.name in CHOICES or isinstance(p.type, click.Choice):
                assert tuple(p.type.choices) == CHOICES.get(p.name), f"{name} {p.opts[0]}: choices differ from TrainConfig's"
            checked += 1
        assert checked >= (20 if name == "train" else 9)


def test_every_choice_option_refuses_a_bad_value_listing_the_allowed_ones(tmp_path):
    for name, (_, args) in COMMAND_OPTIONS.items():
        for p in main.commands[name].params:
            if not isinstance(p.type, click.Choice):
                continue
            r = CliRunner().invoke(main, [name, *args, p.opts[0], "bogus", "--out", str(tmp_path / "r")])
            assert r.exit_code == 2 and "'bogus' is not one of" in r.output, r.output
            assert all(f"'{c}'" in r.output for c in p.type.choices), r.output
    assert not (tmp_path / "r").exists()


def test_a_refused_value_names_the_option_typed(tmp_path):
    """--epochs is the short spelling of --ft-epochs (fine-tuning's, beside --ft-lr): the message names the setting."""
    r = CliRunner().invoke(main, ["train", str(HYMENOPTERA), "--epochs", "0", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2, r.output
    assert "headstart: error: ft_epochs=0 is out of range: give a whole number of at least 1" in r.output
    assert not (tmp_path / "r").exists()


def test_a_mistyped_photo_path_says_no_such_file(ants_run, tmp_path):
    r = CliRunner().invoke(main, ["predict", str(ants_run[1]), str(tmp_path / "phtoo.jpg")])
    assert r.exit_code == 1 and "error: no such file (a mistyped path" in r.output, r.output


def test_class_weights_option_and_the_imbalance_is_said(tmp_path):
    """12 ants against 4 bees: the balanced loss is applied and said; --class-weights none is taken and recorded."""
    import shutil

    photos = tmp_path / "photos"
    for cls, n in (("ants", 12), ("bees", 4)):
        (photos / cls).mkdir(parents=True)
        for src in sorted((HYMENOPTERA / "train" / cls).glob("*.jpg"))[:n]:
            shutil.copy(src, photos / cls / src.name)
    r = CliRunner().invoke(main, ["train", str(photos), "--head", "linear", "--out", str(tmp_path / "auto")])
    assert r.exit_code == 0, r.output
    assert "class weights: balanced (auto)" in r.stderr and "'ants' has 10 training photos, 'bees' 3" in r.stderr
    r = CliRunner().invoke(main, ["train", str(photos), "--head", "linear", "--class-weights", "none", "--out", str(tmp_path / "none")])
    assert r.exit_code == 0 and "class weights" not in r.stderr, r.output
    assert json.loads((tmp_path / "none" / "train_config.json").read_text())["class_weights"] == "none"


def _first_stderr_line_on_a_terminal(args: list[str]) -> tuple[str, str]:
    """Run the installed command with stderr on a pseudo-terminal (as in a user's shell) and stdout on a pipe; the
    first line it wrote to the terminal, and its stdout."""
    import os
    import pty
    import select
    import subprocess
    import sys

    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "headstart", *args], stdout=subprocess.PIPE, stderr=child_fd,
                            stdin=subprocess.DEVNULL, text=True)
    os.close(child_fd)
    said = b""
    while b"\n" not in said and select.select([main_fd], [], [], 120)[0]:
        try:
            chunk = os.read(main_fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        said += chunk
    out = proc.communicate(timeout=300)[0]
    os.close(main_fd)
    return said.decode().splitlines()[0] if said else "", out


def test_a_command_says_what_it_is_doing_at_once_on_a_terminal():
    """Loading torch and timm takes seconds: on a terminal the first line comes before the work, on a pipe never."""
    line, out = _first_stderr_line_on_a_terminal(["backbones"])
    assert line.startswith("headstart: reading each backbone's input size"), line
    assert out.startswith("name ")
    import subprocess
    import sys

    piped = subprocess.run([sys.executable, "-m", "headstart", "backbones", "--json"], capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stderr == "" and json.loads(piped.stdout)


def test_backbones_lists_nasnetmobile_and_the_weights_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTART_WEIGHTS", str(tmp_path))
    r = CliRunner().invoke(main, ["backbones"])
    assert r.exit_code == 0, r.output
    nasnet = next(line for line in r.output.splitlines() if line.startswith("nasnetmobile"))
    assert "not in timm" in nasnet and "efficientnet_lite0" in nasnet
    assert f"weights folder {tmp_path} (set $HEADSTART_WEIGHTS)" in r.output.replace("\n", " ")
    r = CliRunner().invoke(main, ["train", str(HYMENOPTERA), "--backbone", "nasnetmobile", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "timm has no NASNet-Mobile" in r.output and not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["train", "compare"])
def test_every_option_says_what_it_does(command):
    """--help is the first documentation a user reads: no option without a description."""
    silent = [p.opts[0] for p in main.commands[command].params if isinstance(p, click.Option) and not p.help]
    assert silent == []


def test_demo_help_says_where_its_photos_come_from():
    r = CliRunner().invoke(main, ["demo", "--help"])
    assert "downloaded once" in r.output and "bundled" not in r.output


def test_the_public_api_names_survive_their_modules_being_imported():
    """`import headstart` loads its names on first use; importing a submodule must not rebind a public function."""
    import subprocess
    import sys

    code = ("import headstart, headstart.cli, headstart.audit, headstart.compare, headstart.pipeline, headstart.predict, headstart.export; "
            "print(all(callable(getattr(headstart, n)) for n in ('audit', 'compare', 'train', 'load', 'export_onnx', 'scan', 'lookup')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


def test_evaluate_on_another_folder_gives_the_accuracy_and_its_interval(ants_run):
    """`headstart evaluate RUN DATA --json`: the numbers of the split, the 95 % interval among them; without --json
    the readable report says it on its first line."""
    clf, out = ants_run
    r = CliRunner().invoke(main, ["evaluate", str(out), str(HYMENOPTERA), "--split", "val", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["n"] == 153 and m["accuracy"] == pytest.approx(clf.info["metrics"]["val"]["accuracy"])
    lo, hi = m["accuracy_ci95"]
    assert lo < m["accuracy"] < hi
    r = CliRunner().invoke(main, ["evaluate", str(out), str(HYMENOPTERA), "--split", "val", "--quiet"])
    assert r.exit_code == 0 and f"(95% CI {100 * lo:.1f}–{100 * hi:.1f}%)" in r.output.splitlines()[0], r.output
