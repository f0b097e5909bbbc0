"""``headstart serve``: a local web page to try a trained model on a photo, browse its mistakes and its audit.

The server is the standard library's ``ThreadingHTTPServer``: the page makes a handful of requests, each one a
forward pass of at most a few milliseconds, so an async framework would buy nothing here and would add a dozen
dependencies. The page (``templates/serve.html`` + ``serve.js`` + ``serve.css``) is package data and talks to the
same JSON API a person can call with curl; nothing it loads comes from another machine.

Safe by default: it binds to loopback; an upload (capped at ``MAX_UPLOAD`` bytes) goes only to a private temporary
file, deleted once answered, and is decoded by ``data.open_rgb`` like any training photo, so a non-image or a decompression bomb is a 4xx with the reason; the only
files it serves are its own page and the photos the run itself lists (its predictions and its data set's audit),
looked up by exact path, so ``../`` leads nowhere. Class and file names reach the page as JSON and are set as text.
"""

from __future__ import annotations

import csv
import functools
import io
import ipaddress
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import weakref
import webbrowser
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

import jinja2
from PIL import Image

from .config import HeadstartError
from .data import open_rgb
from .pipeline import gradcam_overlay
from .predict import CONFIG_FILE, ENSEMBLE_FILE, Classifier, load
from .report import cell, columns

log = logging.getLogger("headstart")

MAX_UPLOAD = 20 * 1024 * 1024  # bytes: a phone photo is 2–8 MB; anything far larger is a mistake or an attack
THUMB = 240  # px, longest side of a gallery picture
GRADCAM_SIZE = 320  # px, longest side of the Grad-CAM overlay beside a tried photo
STATIC = {"serve.js": "text/javascript; charset=utf-8", "serve.css": "text/css; charset=utf-8"}
# The page may load its own files and pictures made in the browser (the dropped photo, the Grad-CAM blob): a
# mistake that reached for another host would be blocked by the browser itself.
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'"


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and a message a person can act on."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --------------------------------------------------------------------------------------------- the served folder


@dataclass
class App:
    """What one ``headstart serve`` serves: a run, or the runs of a comparison, loaded when first asked for."""

    folder: Path
    runs: dict[str, Path]  # name shown → run folder; one entry for a run folder
    leaderboard: list[dict[str, Any]] | None = None
    photos: dict[str, Path] = field(default_factory=dict)  # URL path under /photo/ → the file it may serve
    models: dict[str, Any] = field(default_factory=dict)
    subjects: dict[str, Any] = field(default_factory=dict)
    overlays: dict[str, Any] = field(default_factory=dict)  # run → its photo → Grad-CAM function (cached on disk)
    lock: threading.Lock = field(default_factory=threading.Lock)  # loading a model: once, whoever asks first
    # One prediction at a time: ONNX Runtime already spreads one forward pass over every core, and several at once
    # only make each other wait (measured in BENCHMARKS.md, 8 concurrent clients).
    forward_lock: threading.Lock = field(default_factory=threading.Lock)
    cam_lock: threading.Lock = field(default_factory=threading.Lock)  # Grad-CAM hooks a layer of the shared network
    scratch: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="headstart-serve-")))

    def __post_init__(self) -> None:
        weakref.finalize(self, shutil.rmtree, self.scratch, True)  # the scratch folder goes with the App, however it ends

    @property
    def default(self) -> str:
        return next(iter(self.runs))


def open_app(folder: str | os.PathLike) -> App:
    """A run folder (config.json), an ensemble (ensemble.json) or a comparison folder (leaderboard.json); refused
    with a clear error otherwise, before the server starts. The photos it may serve are listed here, once."""
    folder = Path(folder).resolve()
    runs, rows = _runs_of(folder)
    app = App(folder, runs, rows)
    for run in app.runs.values():
        for row in _predictions(run):
            _allow(app, Path(row["path"]))
    audit = audit_of(app)
    for finding in (audit or {}).get("findings", []):
        for p in finding.get("paths", []):
            _allow(app, _under(_audit_root(app, audit), p))
    return app


def _runs_of(folder: Path) -> tuple[dict[str, Path], list[dict[str, Any]] | None]:
    """The runs a folder offers (name → folder), and a comparison's leaderboard rows."""
    if (folder / "leaderboard.json").is_file():
        rows = _read_json(folder / "leaderboard.json").get("rows", [])
        runs = {r["backbone"]: folder / r["run"] for r in rows
                if r.get("status") == "ok" and r.get("run") and (folder / r["run"] / CONFIG_FILE).is_file()}
        if not runs:
            raise HeadstartError(f"'{folder}' is a comparison without a finished run: nothing to serve")
        return runs, rows
    if (folder / CONFIG_FILE).is_file() or (folder / ENSEMBLE_FILE).is_file():
        return {folder.name: folder}, None
    raise HeadstartError(f"'{folder}' is neither a run folder (config.json), an ensemble (ensemble.json) nor a comparison folder (leaderboard.json)")


def _allow(app: App, photo: Path) -> None:
    """Let the page show this photo; only photos named here, when the server starts, can ever be served."""
    app.photos[photo_url(photo)] = photo


def photo_url(photo: str | Path) -> str:
    """A photo's URL: its absolute path under /photo/, so a thumbnail is cached by the browser per photo."""
    return "/photo/" + quote(Path(photo).as_posix().lstrip("/"))


def _under(root: Path | None, p: str) -> Path:
    return Path(p) if Path(p).is_absolute() or root is None else root / p


def data_root(run: Path) -> Path | None:
    cfg = _read_json(run / CONFIG_FILE) if (run / CONFIG_FILE).is_file() else {}
    root = cfg.get("data", {}).get("root")
    return Path(root) if root else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HeadstartError(f"cannot read '{path}' ({e})") from None


def _predictions(run: Path, split: str | None = None) -> list[dict[str, str]]:
    """Every photo the run was measured on, as recorded by ``evaluate.write`` (val: predictions.csv, test:
    test_predictions.csv): path, true class, predicted class, confidence."""
    out = []
    for name in ([split] if split else ["val", "test"]):
        path = run / ("predictions.csv" if name == "val" else f"{name}_predictions.csv")
        if path.is_file():
            with open(path, newline="") as f:
                out += [{**row, "split": name} for row in csv.DictReader(f)]
    return out


# ------------------------------------------------------------------------------------------------- the model


def model(app: App, run: str | None) -> Any:
    """The run's model, loaded once (the first request for a run pays for it, the rest a forward pass)."""
    name = run or app.default
    if name not in app.runs:
        raise RequestError(404, f"no run named {name!r} here; runs: {', '.join(app.runs)}")
    with app.lock:
        if name not in app.models:
            app.models[name] = _warmed(app, load(app.runs[name]))
        return app.models[name]


def _warmed(app: App, clf: Any) -> Any:
    """The model after one grey picture went through it: opening its runtime costs a second or more, once, and a
    person's first photo (or the first after switching runs) should not pay for it."""
    grey = app.scratch / "warm.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(grey)
    clf.predict([grey])
    grey.unlink()
    return clf


def predict_bytes(app: App, run: str | None, body: bytes, top_k: int = 5) -> dict[str, Any]:
    """``headstart predict --json``'s answer for one uploaded photo (the same function computes it, on a private
    temporary copy outside the run and data folders), plus the run's name and the latency in milliseconds."""
    clf = model(app, run)
    fd, tmp = tempfile.mkstemp(dir=app.scratch, suffix=".upload")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        with app.forward_lock:
            start = time.perf_counter()
            (pred,) = clf.predict([tmp], top_k=top_k)
            seconds = time.perf_counter() - start
    finally:
        os.unlink(tmp)
    if pred.error:
        raise RequestError(413 if "decompression-bomb" in pred.error else 415, f"cannot read the upload: {pred.error}")
    answer = {k: v for k, v in pred.to_dict().items() if k != "path"}
    return {**answer, "run": run or app.default, "latency_ms": round(seconds * 1000, 2)}


def photo_gradcam_png(app: App, run: str | None, url: str) -> bytes:
    """The Grad-CAM overlay of one of the run's listed photos (a gallery's), drawn as the report draws its worst
    errors and kept in the same cache, so a photo already in report.html costs no forward pass."""
    clf = _single(model(app, run))
    photo = app.photos.get(quote(unquote(url)))
    if photo is None or not photo.is_file():
        raise RequestError(404, "no such photo here: only the run's own photos are served")
    name = run or app.default
    with app.cam_lock:
        draw = app.overlays.get(name) or app.overlays.setdefault(name, gradcam_overlay(clf, GRADCAM_SIZE))
        picture = draw(photo)
    return _png(picture)


def _single(clf: Any) -> Classifier:
    if not isinstance(clf, Classifier):
        raise RequestError(404, "Grad-CAM explains one network; this is an ensemble (serve one of its members)")
    return clf


def _png(picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    picture.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_upload(body: bytes) -> Image.Image:
    """The upload as an RGB picture, by the decoder training uses; its refusal is the client's error."""
    try:
        return open_rgb(body)
    except ValueError as e:
        raise RequestError(413 if "decompression-bomb" in str(e) else 415, f"cannot read the upload: {e}") from None


def gradcam_png(app: App, run: str | None, body: bytes) -> bytes:
    """Where the network looked: the Grad-CAM overlay of the uploaded photo for its predicted class, as a PNG."""
    clf = _single(model(app, run))
    img = decode_upload(body)
    from . import explain  # torch and the network: only when a picture is asked for

    with app.cam_lock:  # one picture at a time: the hook on the shared network's layer is per call
        subject = app.subjects.get(run or app.default) or app.subjects.setdefault(run or app.default, explain.as_subject(clf))
        picture = explain.gradcam_thumbnail(subject, img, size=GRADCAM_SIZE)
    return _png(picture)


# --------------------------------------------------------------------------------------- galleries and audit


def mistakes(app: App, run: str | None) -> dict[str, Any]:
    """Per evaluated split: the classes, the confusion matrix, and every photo with its true and predicted class
    (the page shows the errors and, on a click, a cell's photos)."""
    name = run or app.default
    if name not in app.runs:
        raise RequestError(404, f"no run named {name!r} here; runs: {', '.join(app.runs)}")
    folder = app.runs[name]
    classes = _classes(folder)
    splits = []
    for split in ("val", "test"):
        rows = _predictions(folder, split)
        if rows:
            splits.append(_split(app, split, rows, classes))
    return {"run": name, "classes": classes, "splits": splits}


def _classes(folder: Path) -> list[str]:
    cfg = _read_json(folder / (CONFIG_FILE if (folder / CONFIG_FILE).is_file() else ENSEMBLE_FILE))
    return list(cfg.get("classes", []))


def _split(app: App, split: str, rows: list[dict[str, str]], classes: list[str]) -> dict[str, Any]:
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    photos = []
    for r in rows:
        if r["true"] in index and r["predicted"] in index:
            matrix[index[r["true"]]][index[r["predicted"]]] += 1
        photos.append({"photo": photo_url(r["path"]), "name": Path(r["path"]).name, "true": r["true"],
                       "predicted": r["predicted"], "confidence": float(r["confidence"])})
    return {"name": split, "matrix": matrix, "photos": photos}


def audit_of(app: App) -> dict[str, Any] | None:
    """The ``audit.json`` that ``headstart audit`` wrote, when there is one: in the served folder (its default
    place), in the default run's folder, or in the data folder. Optional: without it the page has no audit panel."""
    for place in [app.folder, app.runs[app.default], data_root(app.runs[app.default])]:
        if place is not None and (place / "audit.json").is_file():
            try:
                return json.loads((place / "audit.json").read_text())
            except (OSError, ValueError) as e:
                log.warning("serve: cannot read %s (%s); no audit panel", place / "audit.json", e)
    return None


def audit_view(app: App) -> dict[str, Any]:
    """The audit's findings as the page shows them: kind, rule, labels, and a servable picture per photo."""
    audit = audit_of(app)
    if audit is None:
        return {"audit": None}
    root = _audit_root(app, audit)
    findings = []
    for f in audit.get("findings", []):
        urls = [photo_url(_under(root, p)) for p in f.get("paths", [])]
        pics = [{"photo": url if url in app.photos else None, "name": Path(p).name} for p, url in zip(f.get("paths", []), urls)]
        findings.append({"kind": str(f.get("kind", "")), "rule": str(f.get("rule", "")), "labels": [str(x) for x in f.get("labels", [])],
                         "suggested": str(f.get("info", {}).get("suggested", "")), "photos": pics})
    return {"audit": {"summary": audit.get("summary", {}), "findings": findings}}


def _audit_root(app: App, audit: dict[str, Any]) -> Path | None:
    """The folder an audit's photo paths are relative to: the one it names (``data``), else the run's data folder."""
    return Path(audit["data"]) if audit.get("data") else data_root(app.runs[app.default])


@functools.lru_cache(maxsize=512)
def _thumbnail(path: str, mtime: float) -> bytes:
    img = open_rgb(path, THUMB)
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def photo_bytes(app: App, url_path: str) -> bytes:
    """A listed photo's thumbnail; any other path, ``../`` included, is simply not found."""
    photo = app.photos.get(quote(unquote(url_path)))
    if photo is None or not photo.is_file():
        raise RequestError(404, "no such photo here: only the run's own photos are served")
    try:
        return _thumbnail(str(photo), photo.stat().st_mtime)
    except ValueError as e:
        raise RequestError(404, f"cannot read that photo: {e}") from None


# --------------------------------------------------------------------------------------------------- the page


def page(app: App) -> bytes:
    """The one HTML page, rendered with autoescape; the data it starts from travels as JSON (``tojson``)."""
    boot = {"runs": list(app.runs), "default": app.default, "title": app.folder.name, "max_upload": MAX_UPLOAD,
            "leaderboard": _leaderboard(app), "classes": {n: _classes(p) for n, p in app.runs.items()}}
    return _templates().get_template("serve.html").render(title=app.folder.name, boot=boot).encode()


@functools.lru_cache(maxsize=1)
def _templates() -> jinja2.Environment:
    """The page's template, shipped inside the package, autoescaped like report.html's."""
    return jinja2.Environment(loader=jinja2.PackageLoader("headstart", "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True)


def _leaderboard(app: App) -> dict[str, Any] | None:
    """The comparison's leaderboard as the report formats it; a row names its run when the page can try it."""
    if app.leaderboard is None:
        return None
    cols = columns(app.leaderboard)
    return {"headings": [h for h, _, _ in cols] + ["status"],
            "rows": [{"run": r["backbone"] if r["backbone"] in app.runs else None, "cells": [cell(r, k, f) for _, k, f in cols] + [r["status"]]}
                     for r in app.leaderboard]}


def static(name: str) -> tuple[bytes, str]:
    if name not in STATIC:
        raise RequestError(404, "no such file")
    return resources.files("headstart").joinpath("templates", name).read_bytes(), STATIC[name]


# ------------------------------------------------------------------------------------------------- HTTP


Route = Callable[["Handler", dict[str, str]], None]


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the functions above; every refusal is JSON ``{"error": ...}`` with a 4xx status, and an
    unexpected failure a 500 whose body names the error type, never a traceback."""

    app: App
    server_version = "headstart"
    protocol_version = "HTTP/1.1"
    timeout = 60  # s: an idle or stalled connection is closed, so it cannot hold a thread for ever

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self._dispatch(GET_ROUTES)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(POST_ROUTES)

    def _dispatch(self, routes: dict[str, Route]) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            self._check_host()
            route = routes.get(url.path) or (routes.get("/photo/") if url.path.startswith("/photo/") else None)
            route = route or (routes.get("/static/") if url.path.startswith("/static/") else None)
            if route is None:
                raise RequestError(404, f"no such page: {url.path}")
            route(self, {**query, "_path": url.path})
        except RequestError as e:
            self.send_json({"error": e.message}, e.status)
        except HeadstartError as e:
            self.send_json({"error": str(e)}, 422)
        except Exception as e:  # noqa: BLE001 - the server keeps serving; the log has the details
            log.exception("serve: %s %s failed", self.command, self.path)
            self.send_json({"error": f"internal error ({type(e).__name__}); see the server's log"}, 500)

    def _check_host(self) -> None:
        """On loopback, only requests addressed to loopback: a web page elsewhere cannot reach this server through
        a DNS name it controls (DNS rebinding)."""
        if not is_loopback(self.server.server_address[0]):
            return
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if host not in ("localhost", "127.0.0.1", "::1") and not host.startswith("127."):
            raise RequestError(403, f"this server answers requests for localhost, not {host!r}")

    def body(self) -> bytes:
        """The request body, refused before reading when it is larger than ``MAX_UPLOAD`` or of unknown length."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "send the photo as the request body with a Content-Length (curl --data-binary @photo.jpg …)")
        if int(length) > MAX_UPLOAD:
            _drain(self.rfile, int(length))
            raise RequestError(413, f"the upload is {int(length) / 1e6:.1f} MB; the limit is {MAX_UPLOAD / 1e6:.0f} MB")
        if int(length) == 0:
            raise RequestError(400, "empty body: send the photo's bytes (curl --data-binary @photo.jpg …)")
        return self.rfile.read(int(length))

    def send(self, data: bytes, content_type: str, status: int = 200, cache: bool = False) -> None:
        if status >= 400 and self.command == "POST":
            self.close_connection = True  # a refused upload's body may be unread: this connection ends here
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "max-age=300" if cache else "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, value: Any, status: int = 200) -> None:
        self.send(json.dumps(value).encode(), "application/json", status)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("serve: " + format, *args)


def _drain(stream: Any, length: int) -> None:
    """Read and drop an oversized body (up to four times the limit), so the client is reading when the 413 comes,
    not still writing into a closed socket; anything larger is cut off unread."""
    left = length if length <= 4 * MAX_UPLOAD else 0
    while left > 0:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            break
        left -= len(chunk)


def _top_k(q: dict[str, str]) -> int:
    k = q.get("top_k", "5")
    if not k.isdigit() or not 1 <= int(k) <= 100:
        raise RequestError(400, "top_k must be a whole number from 1 to 100")
    return int(k)


GET_ROUTES: dict[str, Route] = {
    "/": lambda h, q: h.send(page(h.app), "text/html; charset=utf-8"),
    "/api/runs": lambda h, q: h.send_json({"runs": list(h.app.runs), "default": h.app.default, "leaderboard": _leaderboard(h.app)}),
    "/api/mistakes": lambda h, q: h.send_json(mistakes(h.app, q.get("run"))),
    "/api/audit": lambda h, q: h.send_json(audit_view(h.app)),
    "/api/gradcam": lambda h, q: h.send(photo_gradcam_png(h.app, q.get("run"), q.get("photo", "")), "image/png", cache=True),
    "/photo/": lambda h, q: h.send(photo_bytes(h.app, q["_path"]), "image/jpeg", cache=True),
    "/static/": lambda h, q: h.send(*static(q["_path"][len("/static/"):]), cache=False),
}
POST_ROUTES: dict[str, Route] = {
    "/api/predict": lambda h, q: h.send_json(predict_bytes(h.app, q.get("run"), h.body(), _top_k(q))),
    "/api/gradcam": lambda h, q: h.send(gradcam_png(h.app, q.get("run"), h.body()), "image/png"),
}


# ------------------------------------------------------------------------------------------------ starting


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_warning(host: str, port: int) -> str | None:
    """What to say before listening beyond this machine (nothing for loopback)."""
    if is_loopback(host):
        return None
    return (f"warning: listening on {host}: anyone who can reach this machine on port {port} can use the model and see "
            "the run's photos; --host 127.0.0.1 keeps it to this machine")


class _Server(ThreadingHTTPServer):
    """A client that hangs up or stalls (a closed tab, an upload cut off at the size cap, the idle timeout) is not
    an error of the server: one line instead of socketserver's traceback on the console."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)):
            log.info("serve: %s:%s went away (%s)", *client_address[:2], type(err).__name__)
            return
        super().handle_error(request, client_address)


def make_server(folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """The server, bound and ready (``port=0``: any free port, as tests use), not yet serving."""
    app = open_app(folder)
    handler = type("BoundHandler", (Handler,), {"app": app})
    kind = _Server if ":" not in host else type("Server6", (_Server,), {"address_family": socket.AF_INET6})
    server = kind((host, port), handler)
    server.daemon_threads = True  # Ctrl-C does not wait for a browser's idle keep-alive connection
    server.app = app  # type: ignore[attr-defined]
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in str(host) else host)
    return f"http://{shown}:{port}/"


def serve(folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, open_browser: bool = False,
          say: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C: the URL is said first, the model loaded before the first request arrives."""
    warning = bind_warning(host, port)
    if warning:
        say(warning)
    server = make_server(folder, host, port)
    app: App = server.app  # type: ignore[attr-defined]
    say(f"serving {app.folder} at {url_of(server)} (Ctrl-C stops)")
    warm(app)
    if open_browser:
        webbrowser.open(url_of(server))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("stopped")
    finally:
        server.server_close()


def warm(app: App) -> None:
    """Load (and warm) the default run before the first request arrives."""
    model(app, None)
