"""headstart serve as a client sees it: the server started in-process on a free port, every route called over HTTP
on real photos, and every refusal (a non-image, a bomb, an oversized upload, a path out of the run) a 4xx with a
message, never a traceback."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import tempfile
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from conftest import HYMENOPTERA
from headstart.compare import compare
from headstart.predict import load
from headstart.serve import MAX_UPLOAD, bind_warning, is_loopback, make_server, url_of, warm

SCRIPT = "<script>alert(1)"  # a folder name: no slash, so no closing tag
EVIL_FILE = "<img src=x onerror=alert(2)> #?%.jpg"  # a file name that is markup, and breaks a URL unless quoted


def start(folder: Path) -> Iterator[str]:
    server = make_server(folder, "127.0.0.1", 0)
    warm(server.app)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield url_of(server)
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def url(ants_run) -> Iterator[str]:
    yield from start(ants_run[1])


def call(url: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of one request; a 4xx/5xx is returned like a 200, not raised."""
    req = urllib.request.Request(url.rstrip("/") + path, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def raw_get(url: str, path: str) -> int:
    """A GET with the path sent exactly as written (no client normalises its ``..``)."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    return status


def val_photo(cls: str, k: int = 0) -> Path:
    return sorted((HYMENOPTERA / "val" / cls).glob("*.jpg"))[k]


@pytest.mark.parametrize("cls", ["ants", "bees"])
def test_predict_a_real_photo_answers_as_headstart_predict(url, ants_run, cls):
    photo = val_photo(cls, 1)
    status, kind, body = call(url, "/api/predict", photo.read_bytes())
    assert status == 200 and kind == "application/json"
    answer = json.loads(body)
    assert answer["label"] == cls
    expected = load(ants_run[1]).predict([photo])[0].to_dict()  # what `headstart predict --json` prints
    assert {k: answer[k] for k in ("label", "probability", "top")} == {k: expected[k] for k in ("label", "probability", "top")}
    assert answer["latency_ms"] > 0 and answer["run"] == ants_run[1].name


def test_top_k_is_a_query_parameter(url):
    status, _, body = call(url, "/api/predict?top_k=1", val_photo("ants").read_bytes())
    assert status == 200 and len(json.loads(body)["top"]) == 1
    status, _, body = call(url, "/api/predict?top_k=zero", val_photo("ants").read_bytes())
    assert status == 400 and "top_k" in json.loads(body)["error"]


@pytest.mark.parametrize("data, words", [
    (b"just some text, not a photo", "not an image"),
    (b"", "empty body"),
    (val_photo("ants").read_bytes()[:3000], "truncated"),
])
def test_a_corrupt_upload_is_a_4xx_with_its_reason(url, data, words):
    status, kind, body = call(url, "/api/predict", data)
    assert 400 <= status < 500 and kind == "application/json"
    assert words in json.loads(body)["error"]


def test_a_decompression_bomb_is_refused(url):
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")  # 100 M pixels in a few kB
    status, _, body = call(url, "/api/predict", buf.getvalue())
    assert status == 413 and "decompression-bomb" in json.loads(body)["error"]


def test_an_oversized_upload_is_413(url):
    status, _, body = call(url, "/api/predict", b"\0" * (MAX_UPLOAD + 1))
    assert status == 413 and "limit is 21 MB" in json.loads(body)["error"]
    assert call(url, "/api/predict", val_photo("bees").read_bytes())[0] == 200  # and the server still answers


def test_gradcam_is_a_png_of_the_photo(url):
    status, kind, body = call(url, "/api/gradcam", val_photo("bees").read_bytes())
    assert status == 200 and kind == "image/png"
    img = Image.open(io.BytesIO(body))
    assert img.format == "PNG" and 100 < max(img.size) <= 320
    assert call(url, "/api/gradcam", b"GIF89a broken")[0] == 415


def test_mistakes_list_every_val_photo_and_serve_their_thumbnails(url, ants_run):
    status, _, body = call(url, "/api/mistakes")
    m = json.loads(body)
    assert status == 200 and m["classes"] == ["ants", "bees"]
    (val,) = m["splits"]
    metrics = json.loads((ants_run[1] / "metrics.json").read_text())
    assert val["name"] == "val" and val["matrix"] == metrics["confusion_matrix"]
    errors = [p for p in val["photos"] if p["true"] != p["predicted"]]
    assert len(errors) == sum(metrics["confusion_matrix"][0][1:]) + metrics["confusion_matrix"][1][0]
    status, kind, body = call(url, errors[0]["photo"])
    assert status == 200 and kind == "image/jpeg" and max(Image.open(io.BytesIO(body)).size) <= 240
    status, kind, body = call(url, "/api/gradcam?photo=" + urllib.parse.quote(errors[0]["photo"]))
    assert status == 200 and kind == "image/png" and Image.open(io.BytesIO(body)).format == "PNG"
    assert call(url, "/api/gradcam?photo=/photo/etc/passwd")[0] == 404
    assert call(url, "/api/gradcam?photo=/photo/" + urllib.parse.quote(str(val_photo("ants")).lstrip("/") + "/../../../../etc/passwd"))[0] == 404


@pytest.mark.parametrize("path", [
    "/photo/../../../etc/passwd",
    "/photo/%2e%2e/%2e%2e/etc/passwd",
    "/photo/etc/passwd",
    "/photo/" + str(HYMENOPTERA / "train" / "ants").lstrip("/") + "/../../val/ants/" + val_photo("ants").name,
    "/static/../serve.py",
    "/static/serve.html",
    "/../../../../etc/passwd",
])
def test_paths_outside_the_run_are_not_served(url, path):
    assert raw_get(url, path) in (403, 404)


def test_a_train_photo_is_not_served(url):
    """Only the photos the run lists (its evaluated splits and the audit) are servable, not the whole disk."""
    train = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))[0]
    assert call(url, "/photo/" + str(train).lstrip("/"))[0] == 404


def test_the_page_and_its_files(url):
    status, kind, body = call(url, "/")
    assert status == 200 and kind.startswith("text/html")
    html = body.decode()
    assert 'src="/static/serve.js"' in html and "http://" not in html and "https://" not in html
    for name, kind_ in (("serve.js", "text/javascript"), ("serve.css", "text/css")):
        status, kind, body = call(url, f"/static/{name}")
        assert status == 200 and kind.startswith(kind_) and b"http" not in body  # nothing fetched from elsewhere
    assert json.loads(call(url, "/api/runs")[2])["runs"] == ["ants"]
    assert json.loads(call(url, "/api/audit")[2]) == {"audit": None}
    status, _, body = call(url, "/api/nothing")
    assert status == 404 and "no such page" in json.loads(body)["error"]


def test_requests_for_another_host_name_are_refused(url):
    """DNS rebinding: a page on evil.example that resolves its name to 127.0.0.1 must not reach the API."""
    status, _, body = call(url, "/api/runs", headers={"Host": "evil.example"})
    assert status == 403 and "localhost" in json.loads(body)["error"]


def test_loopback_is_told_apart():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


# ------------------------------------------------------------------ a comparison with a class named <script>


@pytest.fixture(scope="module")
def script_compare(ants_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-backbone comparison on a few real photos whose ant class is named ``<script>…``, with an audit.json
    (as ``headstart audit`` writes) in the data folder."""
    root = tmp_path_factory.mktemp("data") / "ants_bees"
    for split, n in (("train", 10), ("val", 6)):
        for cls, name in (("ants", SCRIPT), ("bees", "bees")):
            (root / split / name).mkdir(parents=True)
            for p in sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:n]:
                (root / split / name / p.name).symlink_to(p)
    evil = root / "train" / "bees" / EVIL_FILE
    evil.symlink_to(sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))[-1])
    pair = [sorted((root / "train" / SCRIPT).glob("*.jpg"))[0], evil]
    audit = {"data": str(root), "summary": {"duplicate": 1}, "findings": [
        {"kind": "duplicate", "rule": "same picture <b>twice</b>", "paths": [str(p.relative_to(root)) for p in pair],
         "labels": [SCRIPT, "bees"], "info": {"suggested": SCRIPT}}]}
    (root / "audit.json").write_text(json.dumps(audit))
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    compare(root, ["efficientnet_lite0"], out, progress=False, head="linear")
    return out


@pytest.fixture(scope="module")
def script_url(script_compare) -> Iterator[str]:
    yield from start(script_compare)


def test_a_class_named_script_is_escaped(script_url):
    html = call(script_url, "/")[2].decode()
    assert "<script>alert" not in html and "\\u003cscript\\u003ealert(1)" in html  # JSON for the page, set as text
    status, _, body = call(script_url, "/api/predict", val_photo("ants").read_bytes())
    assert status == 200 and {t["label"] for t in json.loads(body)["top"]} == {SCRIPT, "bees"}


def test_a_comparison_serves_its_leaderboard_and_runs(script_url):
    runs = json.loads(call(script_url, "/api/runs")[2])
    assert runs["runs"] == ["efficientnet_lite0"] and runs["leaderboard"]["rows"][0]["run"] == "efficientnet_lite0"
    status, _, body = call(script_url, "/api/predict?run=efficientnet_lite0", val_photo("bees").read_bytes())
    assert status == 200 and json.loads(body)["run"] == "efficientnet_lite0"
    status, _, body = call(script_url, "/api/predict?run=nope", val_photo("bees").read_bytes())
    assert status == 404 and "no run named" in json.loads(body)["error"]
    assert json.loads(call(script_url, "/api/mistakes?run=efficientnet_lite0")[2])["classes"] == [SCRIPT, "bees"]


def test_the_audit_findings_and_their_photos(script_url):
    audit: dict[str, Any] = json.loads(call(script_url, "/api/audit")[2])["audit"]
    (finding,) = audit["findings"]
    assert finding["kind"] == "duplicate" and finding["labels"] == [SCRIPT, "bees"] and finding["suggested"] == SCRIPT
    assert [p["name"] for p in finding["photos"]][1] == EVIL_FILE
    for p in finding["photos"]:
        status, kind, _ = call(script_url, p["photo"])
        assert status == 200 and kind == "image/jpeg"


def test_binding_beyond_loopback_is_warned_about():
    assert bind_warning("127.0.0.1", 8000) is None
    assert "anyone who can reach this machine on port 8000" in bind_warning("0.0.0.0", 8000)


def test_the_command_prints_its_url_and_stops_on_ctrl_c(ants_run):
    """`headstart serve RUN --port 0`: the URL on stderr, the page answers, SIGINT ends it with status 0."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "headstart", "serve", str(ants_run[1]), "--port", "0"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stderr.readline()
        found = re.search(r"at (http://127\.0\.0\.1:\d+/) \(Ctrl-C stops\)", line)
        assert found, line
        deadline = time.time() + 120
        while True:  # the URL is said before the model is warm; the socket queues requests meanwhile
            try:
                assert call(found.group(1), "/api/runs")[0] == 200
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline
                time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)  # reads stderr meanwhile: a full pipe cannot hold the server up
        except subprocess.TimeoutExpired:  # once in a full suite on a loaded VM: say where every thread of it waits
            proc.send_signal(signal.SIGABRT)  # -X faulthandler prints each thread's stack on SIGABRT
            pytest.fail("SIGINT did not stop the server within 60 s; its threads:\n" + proc.communicate(timeout=30)[1][-6000:])
        assert proc.returncode == 0 and "stopped" in err, err
    finally:
        proc.kill()


def test_uploads_leave_no_file_behind(url, ants_run):
    """Neither the run folder nor the server's private scratch folder keeps anything of an upload."""
    before = sorted(p.relative_to(ants_run[1]) for p in ants_run[1].rglob("*"))
    for route in ("/api/predict", "/api/gradcam"):
        assert call(url, route, val_photo("ants", 2).read_bytes())[0] == 200
    assert call(url, "/api/predict", b"not an image")[0] == 415
    assert sorted(p.relative_to(ants_run[1]) for p in ants_run[1].rglob("*")) == before
    scratch = [p for p in Path(tempfile.gettempdir()).glob("headstart-serve-*/*")]
    assert not [p for p in scratch if p.suffix == ".upload"]


def test_ipv6_loopback(ants_run):
    try:
        server = make_server(ants_run[1], "::1", 0)
    except OSError as e:  # a machine (or container) without IPv6
        pytest.skip(f"no IPv6 loopback here ({e})")
    try:
        assert url_of(server).startswith("http://[::1]:")
    finally:
        server.server_close()


def test_a_client_that_hangs_up_is_one_log_line_not_a_traceback(ants_run, capsys, caplog):
    """A closed tab or an upload cut off mid-body raises inside socketserver's thread; that is the client's doing."""
    import logging

    server = make_server(ants_run[1], "127.0.0.1", 0)
    try:
        with caplog.at_level(logging.INFO, logger="headstart"):
            try:
                raise ConnectionResetError(104, "Connection reset by peer")
            except ConnectionResetError:
                server.handle_error(None, ("127.0.0.1", 51808))
        assert "Traceback" not in capsys.readouterr().err
        assert "127.0.0.1:51808 went away (ConnectionResetError)" in caplog.text
    finally:
        server.server_close()
