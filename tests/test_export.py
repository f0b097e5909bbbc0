"""ONNX export: checked against PyTorch at export time, ONNX Runtime predicting what PyTorch predicts on the
real ants/bees val photos for every backbone with real weights, and a standalone example that needs only
onnxruntime, numpy and Pillow."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import headstart
from conftest import HYMENOPTERA, WEIGHTS
from headstart import export, features
from headstart.cli import main
from headstart.data import HeadstartError, scan

VAL = scan(HYMENOPTERA).splits["val"].paths  # 153 photos, 70 ants + 83 bees
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "predict_onnx.py"


def pytorch_fp32(clf: headstart.Classifier, paths) -> np.ndarray:
    """The reference: backbone and head in fp32 (the run itself may use bf16 on CPUs that have it)."""
    f = features.extract(paths, clf.backbone, precision="fp32", progress=False)
    assert f.ok.all()
    return clf.proba_from_features(f.x)


def assert_same_predictions(run: Path) -> None:
    """ONNX Runtime, through `--engine onnxruntime`, on every val photo: same top-1 as PyTorch fp32."""
    clf = headstart.load(run)
    want = pytorch_fp32(clf, VAL)
    got, f = clf.proba(VAL, engine="onnxruntime")
    assert f.ok.all() and got.shape == want.shape == (153, 2)
    assert (got.argmax(1) == want.argmax(1)).all(), [str(p) for p, a, b in zip(VAL, got.argmax(1), want.argmax(1)) if a != b]
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.slow
def test_default_backbone_exports_and_matches_pytorch_on_every_val_photo(ants_run):
    clf, run = ants_run
    r = CliRunner().invoke(main, ["export", str(run), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["images"] >= 2 and 0 <= report["max_abs_diff"] <= 1e-4
    meta = json.loads((run / export.META_FILE).read_text())
    assert meta["classes"] == ["ants", "bees"] and meta["parity"]["max_abs_diff"] == report["max_abs_diff"]
    assert meta["preprocess"]["resize_shorter_side"] == 256 and meta["preprocess"]["interpolation"] == "bicubic"

    model = onnx.load(str(run / export.ONNX_FILE))
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert props["classes"] == ["ants", "bees"] and props["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert model.opset_import[0].version == export.OPSET
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    # TF "same" padding became constants: no shape arithmetic left in the graph
    assert not {"Shape", "Ceil"} & {n.op_type for n in model.graph.node}

    assert_same_predictions(run)

    # the CLI and evaluate give the same answers with either engine
    photos = [str(VAL[0]), str(VAL[-1])]
    rows = {}
    for engine in ("pytorch", "onnxruntime"):
        r = CliRunner().invoke(main, ["predict", str(run), *photos, "--engine", engine, "--json"])
        assert r.exit_code == 0, r.output
        rows[engine] = [row["label"] for row in json.loads(r.output)]
    assert rows["onnxruntime"] == rows["pytorch"] == ["ants", "bees"]
    m = headstart.load(run).evaluate(HYMENOPTERA, split="val", engine="onnxruntime")
    assert m["n"] == 153 and m["data"]["engine"] == "onnxruntime" and m["accuracy"] >= 0.93


def _subset(tmp: Path, per_class: int = 30) -> Path:
    """A small training split (symlinks, nothing copied) with the full val split: quick to train, full check."""
    root = tmp / "hym"
    for cls in ("ants", "bees"):
        (root / "train" / cls).mkdir(parents=True)
        for p in sorted((HYMENOPTERA / "train" / cls).glob("*.jpg"))[:per_class]:
            (root / "train" / cls / p.name).symlink_to(p)
    (root / "val").symlink_to(HYMENOPTERA / "val")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("backbone, file", [
    ("mobilenet", "mobilenetv1_100.safetensors"),
    ("mobilenetv2", "mobilenetv2_100.safetensors"),
    ("mobilenetv3_small", "tf_mobilenetv3_small_100.safetensors"),
    ("regnetx_002", "regnetx_002.safetensors"),
])
def test_every_shared_backbone_exports_and_matches_pytorch(backbone, file, tmp_path):
    run = tmp_path / "run"
    # fp32 run: the PyTorch reference below then reads the val embeddings from the cache
    headstart.train(_subset(tmp_path), out=run, backbone=backbone, weights=str(WEIGHTS / file), head="linear", precision="fp32", progress=False)
    r = headstart.export_onnx(run)
    assert r.max_diff <= 1e-4 and r.top1_agree and r.images == 8
    assert_same_predictions(run)


@pytest.mark.slow
def test_a_graph_that_disagrees_is_refused_and_nothing_is_written(ants_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / export.ONNX_FILE).write_bytes(b"previous export")
    real = export.to_onnx

    def mistranslated(module, input_size):  # an exporter bug: the graph computes something else
        wrong = copy.deepcopy(module)
        wrong.head[-1].bias.data[0] += 3.0  # (a shift of all logits alike would not change softmax)
        return real(wrong, input_size)

    monkeypatch.setattr(export, "to_onnx", mistranslated)
    with pytest.raises(HeadstartError, match="disagrees with PyTorch.*not written"):
        headstart.export_onnx(ants_run[1], out=out)
    assert (out / export.ONNX_FILE).read_bytes() == b"previous export"
    assert sorted(p.name for p in out.iterdir()) == [export.ONNX_FILE]  # no meta, no temporary files


@pytest.mark.slow
def test_onnxruntime_engine_refuses_missing_changed_or_stale_exports(ants_run, tmp_path):
    copy_ = tmp_path / "run"
    shutil.copytree(ants_run[1], copy_, ignore=shutil.ignore_patterns("model.onnx", "onnx_meta.json"))
    photo = [VAL[0]]
    with pytest.raises(HeadstartError, match="headstart export"):
        headstart.load(copy_).predict(photo, engine="onnxruntime")
    headstart.export_onnx(copy_, check_images=[HYMENOPTERA / "val" / "bees"])
    assert headstart.load(copy_).predict(photo, engine="onnxruntime")[0].top[0][0] == "ants"

    meta = json.loads((copy_ / export.META_FILE).read_text())
    (copy_ / export.META_FILE).write_text(json.dumps(meta | {"bundle_sha256": "0" * 64}))
    with pytest.raises(HeadstartError, match="another version"):
        headstart.load(copy_).predict(photo, engine="onnxruntime")
    with open(copy_ / export.ONNX_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(HeadstartError, match="changed or damaged"):
        headstart.load(copy_).predict(photo, engine="onnxruntime")
    with pytest.raises(HeadstartError, match="unknown engine"):
        headstart.load(copy_).predict(photo, engine="tensorflow")


# ------------------------------------------------------------------------------------- standalone example

EXAMPLE_REQUIREMENTS = ["onnxruntime>=1.17,<2", "numpy>=1.26,<3", "pillow>=10,<14"]


def _example_venv() -> Path:
    """A venv with only the example's three packages, cached under the system temp dir (keyed by the
    requirements): created once (about half a minute, needs PyPI), then reused by later test runs."""
    key = hashlib.sha256(json.dumps([sys.version, EXAMPLE_REQUIREMENTS]).encode()).hexdigest()[:12]
    venv = Path(tempfile.gettempdir()) / f"headstart-example-venv-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".ready").is_file():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", *EXAMPLE_REQUIREMENTS], capture_output=True, text=True)
        if pip.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            pytest.skip(f"cannot install {EXAMPLE_REQUIREMENTS} from the package index: {pip.stderr[-300:]}")
        (venv / ".ready").touch()
    return python


@pytest.mark.slow
def test_standalone_example_needs_only_onnxruntime_numpy_pillow(ants_run, tmp_path):
    run = ants_run[1]
    deploy = tmp_path / "deploy"  # what a user ships: only the exported folder
    headstart.export_onnx(run, out=deploy)
    assert sorted(p.name for p in deploy.iterdir()) == [export.ONNX_FILE, export.META_FILE]
    python = _example_venv()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    isolated = subprocess.run([str(python), "-c", "import torch"], capture_output=True, env=env)
    assert isolated.returncode != 0  # neither torch nor headstart is importable there

    ants, bees = HYMENOPTERA / "val" / "ants", HYMENOPTERA / "val" / "bees"
    biggest = max(ants.glob("*.jpg"), key=lambda p: p.stat().st_size)  # 2+ MB: decoded at reduced scale
    photos = [biggest, VAL[5], bees / sorted(os.listdir(bees))[0], VAL[-3]]
    r = subprocess.run([str(python), str(EXAMPLE), str(deploy), *map(str, photos), "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)

    clf = headstart.load(run)
    want, _ = clf.proba(photos, engine="onnxruntime")
    assert [row["label"] for row in rows] == [clf.classes[i] for i in want.argmax(1)]
    assert [row["label"] for row in rows] == [clf.classes[i] for i in pytorch_fp32(clf, photos).argmax(1)]
    # its own few lines of preprocessing reproduce timm's transform: the same probabilities, not just labels
    assert np.abs(np.array([row["probabilities"] for row in rows]) - want).max() <= 1e-4
