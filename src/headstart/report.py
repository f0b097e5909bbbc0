"""Pictures of a run — confusion matrix, training curves, accuracy against latency — and ``report.html``,
the one page a person reads: data, training, metrics, the worst errors with thumbnails, and for a comparison
the leaderboard. The page is self-contained (inline CSS, images as data URIs) so it opens offline and can be
mailed as one file."""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import logging
from html import escape
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .data import HeadstartError, open_rgb, to_rgb
from .files import atomic_path, atomic_write_bytes, atomic_write_text, sha256_file
from .plots import plot_confusion, plot_history, plot_leaderboard

log = logging.getLogger("headstart")


# ------------------------------------------------------------------------------------------ the leaderboard table

TABLE = [  # (heading, key, format)
    ("#", "rank", "{}"),
    ("backbone", "backbone", "{}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("balanced", "balanced_accuracy", "{:.1%}"),
    ("macro-F1", "macro_f1", "{:.3f}"),
    ("test acc.", "test_accuracy", "{:.1%}"),
    ("params", "params", "{:,.0f}"),
    ("input", "input_size", "{} px"),
    ("extract img/s", "extract_img_s", "{:.1f}"),
    ("predict ms", "predict_ms", "{:.0f}"),
    ("train s", "train_s", "{:.1f}"),
]


def columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The table's columns, less test accuracy when no run had a test split."""
    return [c for c in TABLE if c[1] != "test_accuracy" or any(r.get("test_accuracy") is not None for r in rows)]


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """One formatted value; a missing one (a skipped backbone has no accuracy) is an empty cell."""
    v = row.get(key)
    return "" if v is None else fmt.format(v)


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The leaderboard as aligned text for a terminal, or as a Markdown table; skipped rows say why."""
    cols = columns(rows)
    head = [h for h, _, _ in cols] + ["status"]
    body = [[cell(r, k, f) for _, k, f in cols] + [r["status"]] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h not in ("backbone", "status") else "---" for h in head) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body]
        skipped = [r for r in rows if r["status"] != "ok"]
        lines += [""] + [f"- **{r['backbone']}** {r['status']}: {r.get('reason', '')}" for r in skipped] if skipped else []
        return "\n".join(lines) + "\n"
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    left = {1, len(head) - 1}  # backbone and status read better left-aligned
    return "\n".join("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
                     for cells in [head, *body]) + "\n"


# --------------------------------------------------------------------------------------------- the HTML report

ErrorOverlay = Callable[[Path], Image.Image]
THUMB = 200  # px, longest side of a gallery thumbnail


def cached_overlay(overlay: ErrorOverlay, model_key: str, cache_dir: Path) -> ErrorOverlay:
    """``overlay``, remembered as PNG in ``cache_dir/overlays/`` by ``model_key`` and the photo's content: a re-run
    with the same model draws its report without running the network (for Grad-CAM: without importing torch)."""

    def cached(photo: Path) -> Image.Image:
        key = hashlib.sha256(f"{model_key}\0{sha256_file(photo)}".encode()).hexdigest()[:32]
        path = cache_dir / "overlays" / f"{key}.png"
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError):
            pass
        img = to_rgb(overlay(photo))
        try:
            with atomic_path(path) as tmp:
                img.save(tmp, format="PNG")
        except OSError:  # a read-only cache only costs drawing it again
            pass
        return img

    return cached


def build_report(folder: str | Path, *, error_overlay: ErrorOverlay | None = None) -> Path:
    """Write ``folder/report.html``: one self-contained page (inline CSS, images as data URIs, no links out).

    ``folder`` is a run folder (from ``train``) or a comparison folder (from ``compare``, with
    ``leaderboard.json``); everything comes from the files there, so the page can be rebuilt any time.
    ``error_overlay(photo) -> PIL image`` adds an extra picture to each worst error (e.g. a Grad-CAM heat map).
    """
    folder = Path(folder)
    if (folder / "leaderboard.json").is_file():
        title, body = _compare_sections(folder, error_overlay)
    elif (folder / "config.json").is_file() or (folder / "ensemble.json").is_file():
        cfg = _read_json(folder / ("config.json" if (folder / "config.json").is_file() else "ensemble.json"))
        title = f"{Path(cfg.get('data', {}).get('root', folder.name)).name} — {cfg.get('backbone', {}).get('name', '?')}"
        body = _run_sections(folder, cfg, error_overlay)
    else:
        raise HeadstartError(f"'{folder}' is neither a run folder (config.json), an ensemble (ensemble.json) nor a comparison folder (leaderboard.json)")
    page = _PAGE.format(title=escape(title), css=_CSS, body="\n".join(body),
                        when=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))
    atomic_write_text(folder / "report.html", page)
    return folder / "report.html"


def _compare_sections(folder: Path, overlay: ErrorOverlay | None) -> tuple[str, list[str]]:
    rows = _read_json(folder / "leaderboard.json")["rows"]
    done = [r for r in rows if r.get("status") == "ok"]
    best = done[0] if done else None
    root = "?"
    if best and (folder / best["run"] / "config.json").is_file():
        root = Path(_read_json(folder / best["run"] / "config.json")["data"]["root"]).name
    cols = columns(rows)
    head = "".join(f"<th>{escape(h)}</th>" for h, _, _ in cols) + "<th>status</th>"
    body_rows = []
    for r in rows:
        cells = []
        for _, k, f in cols:
            v = escape(cell(r, k, f))
            if k == "backbone" and r.get("run") and (folder / r["run"] / "report.html").is_file():
                v = f'<a href="{escape(r["run"])}/report.html">{v}</a>'
            cells.append(f"<td>{v}</td>")
        status = escape(r["status"]) + (f'<div class="why">{escape(r["reason"])}</div>' if r.get("reason") else "")
        cls = ' class="skipped"' if r["status"] != "ok" else (' class="best"' if r is best else "")
        body_rows.append(f"<tr{cls}>{''.join(cells)}<td>{status}</td></tr>")
    out = [
        f"<h1>Backbone comparison <span class=sub>{escape(root)}</span></h1>",
        f"<p class=lede>{len(done)} of {len(rows)} backbones trained on the same split; ranked by validation accuracy."
        + (f" Best: <b>{escape(best['backbone'])}</b> at {best['accuracy']:.1%}." if best else "") + "</p>",
        "<h2>Leaderboard</h2>",
        f'<table class="board"><thead><tr>{head}</tr></thead><tbody>{"".join(body_rows)}</tbody></table>',
        "<p class=note>Extraction images/s: measured when the backbone computed the embeddings (a run that reads them "
        "from the cache does no extraction); see <code>extract_note</code> in leaderboard.csv. Predict latency: the "
        "median of repeated single-photo predictions (decode, preprocess, backbone and head). Train time includes "
        "extraction, so it is short when the features were cached.</p>",
    ]
    plot = folder / "accuracy_vs_latency.png"
    if not plot.is_file():  # an older folder, or the chart was deleted: it is drawn from leaderboard.json alone
        plot_leaderboard(rows, plot)
    out += ["<h2>Accuracy against latency</h2>", _img(plot.read_bytes(), "accuracy against latency", "plot")]
    if best and (folder / best["run"] / "config.json").is_file():
        run = folder / best["run"]
        out.append(f"<h2 class=part>The best backbone in detail: {escape(best['backbone'])}</h2>")
        out += _run_sections(run, _read_json(run / "config.json"), overlay, level=3)
    return f"compare — {root}", out


def _run_sections(run: Path, cfg: dict[str, Any], overlay: ErrorOverlay | None, level: int = 2) -> list[str]:
    h = f"h{level}"
    b, data, timing = cfg.get("backbone", {}), cfg.get("data", {}), cfg.get("timing", {})
    head = cfg.get("head", {})
    out = []
    if level == 2:
        out.append(f"<h1>{escape(Path(data.get('root', run.name)).name)} <span class=sub>{escape(b.get('name', ''))}</span></h1>")
    out.append(
        f"<p class=lede>Backbone <b>{escape(b.get('name', '?'))}</b> (timm <code>{escape(b.get('timm_name', '?'))}</code>, "
        f"weights from {escape(b.get('weights_source', '?'))}), head <b>{escape(head.get('kind', '?'))}</b>, "
        f"data <code>{escape(data.get('root', '?'))}</code>.</p>")
    splits = [(n, _read_json(_split_file(run, n, "metrics.json"))) for n in ("val", "test") if _split_file(run, n, "metrics.json").is_file()]
    splits = [(n, m) for n, m in splits if m.get("n")]
    cards = []
    for n, m in splits:
        for label, value in (("accuracy", f"{m['accuracy']:.1%}"), ("balanced accuracy", f"{m['balanced_accuracy']:.1%}"),
                             ("macro-F1", f"{m['macro_f1']:.3f}"), ("images", str(m["n"]))):
            cards.append(f"<div class=card><div class=num>{value}</div><div class=lab>{n} {label}</div></div>")
    out += [f"<{h}>Metrics</{h}>", f"<div class=cards>{''.join(cards) or '<p>no evaluated split</p>'}</div>"]
    out += [f"<{h}>Data</{h}>", _counts_table(data)]
    skipped = data.get("skipped", [])
    if skipped:
        items = "".join(f"<li><code>{escape(s['path'])}</code>: {escape(s['reason'])}</li>" for s in skipped)
        out.append(f"<p>Skipped {len(skipped)} file(s):</p><ul class=skiplist>{items}</ul>")
    else:
        out.append("<p>No file was skipped.</p>")
    if "member_metrics" in cfg:  # an ensemble: its members instead of a training story
        out += [f"<{h}>Members</{h}>", _members(run, cfg["member_metrics"])]
    else:
        out += [f"<{h}>Training</{h}>", _training(run, cfg, timing)]
    for n, m in splits:
        out += [f"<{h}>Per class ({n})</{h}>", _per_class(m)]
        png = _split_file(run, n, "confusion_matrix.png")
        if not png.is_file():
            plot_confusion(np.asarray(m["confusion_matrix"]), m["classes"], png)
        out += [f"<{h}>Confusion matrix ({n})</{h}>", _img(png.read_bytes(), f"confusion matrix ({n})", "plot cm")]
        out += [f"<{h}>Worst errors ({n})</{h}>", _gallery(run, m.get("worst_errors", []), overlay)]
    return out


def _split_file(run: Path, split: str, name: str) -> Path:
    """evaluate.write's naming: validation files unprefixed, the others prefixed by their split."""
    return run / (name if split == "val" else f"{split}_{name}")


def _counts_table(data: dict[str, Any]) -> str:
    counts, classes = data.get("counts", {}), data.get("classes", [])
    if not counts:
        return "<p>No counts recorded.</p>"
    names = list(counts)
    rows = "".join(f"<tr><td>{escape(c)}</td>" + "".join(f"<td>{counts[n].get(c, 0)}</td>" for n in names) + "</tr>" for c in classes)
    total = "".join(f"<td>{sum(counts[n].values())}</td>" for n in names)
    head = "".join(f"<th>{escape(n)}</th>" for n in names)
    return (f"<table><thead><tr><th>class</th>{head}</tr></thead><tbody>{rows}"
            f"<tr class=total><td>total</td>{total}</tr></tbody></table>")


def _training(run: Path, cfg: dict[str, Any], timing: dict[str, Any]) -> str:
    parts = []
    table = cfg.get("head_selection", [])
    if table:
        chosen = cfg.get("head", {}).get("kind")
        rows = "".join(
            f"<tr><td>{escape(' '.join([r['kind'], *(f'{k}={v}' for k, v in r.get('params', {}).items())]))}</td>"
            f"<td>{r['cv_accuracy']:.1%}</td><td>{r['cv_log_loss']:.3f}</td></tr>" for r in table)
        parts.append(f"<p>Head chosen by {len(table)}-candidate cross-validation on the training split (chosen: <b>{escape(str(chosen))}</b>).</p>"
                     f"<table><thead><tr><th>candidate</th><th>CV accuracy</th><th>CV log-loss</th></tr></thead><tbody>{rows}</tbody></table>")
    crops = cfg.get("crop_selection", [])
    if crops:  # --crop-pct auto
        rows = "".join(f"<tr><td>{r['crop_pct']:g}{' (chosen)' if r.get('chosen') else ''}</td><td>{r['cv_accuracy']:.1%}</td>"
                       f"<td>{r['cv_log_loss']:.3f}</td></tr>" for r in crops)
        parts.append("<p>Centre crop chosen by the same cross-validation (1 = the whole frame):</p>"
                     f"<table><thead><tr><th>crop_pct</th><th>CV accuracy</th><th>CV log-loss</th></tr></thead><tbody>{rows}</tbody></table>")
    png = plot_history(cfg.get("history") or [], run / "training_curves.png")
    if png is not None:
        parts.append(_img(png.read_bytes(), "training curves", "plot"))
    else:
        parts.append("<p>No per-epoch curve: the chosen head is fitted in one solve (logistic regression).</p>")
    if timing:
        t = [f"{timing['embeddings_computed']} embeddings computed" if "embeddings_computed" in timing else ""]
        t += [f"{label} {timing[k]:.1f} s" for label, k in (("extraction", "extract_s"), ("head", "head_s"), ("total", "total_s")) if k in timing]
        parts.append(f"<p class=note>Timing: {escape(', '.join(x for x in t if x))} (extraction is short when the features were cached).</p>")
    return "\n".join(parts)


def _members(run: Path, members: list[dict[str, Any]]) -> str:
    def acc(m: dict[str, Any], split: str) -> str:
        return f"{m[split]['accuracy']:.1%}" if split in m else ""

    rows = "".join(f"<tr><td>{escape(m['backbone'])}</td><td>{acc(m, 'val')}</td><td>{acc(m, 'test')}</td><td><code>{escape(m['run'])}</code></td></tr>"
                   for m in members)
    return ("<p>The ensemble's probabilities are the mean of its members'; each member's bundle is in "
            f"<code>{escape(str(run / 'members'))}</code>.</p><table><thead><tr><th>member</th><th>val accuracy</th><th>test accuracy</th>"
            f"<th>trained as</th></tr></thead><tbody>{rows}</tbody></table>")


def _per_class(m: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{escape(c)}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td><td>{r['f1-score']:.3f}</td><td>{int(r['support'])}</td></tr>"
        for c, r in m.get("per_class", {}).items())
    return f"<table><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>images</th></tr></thead><tbody>{rows}</tbody></table>"


def _gallery(run: Path, errors: list[dict[str, Any]], overlay: ErrorOverlay | None) -> str:
    if not errors:
        return "<p>No errors.</p>"
    tiles = []
    for e in errors:
        photo = Path(e["path"])
        thumb = thumbnail(run, photo)
        pics = _img(thumb, escape(photo.name), "thumb", "image/jpeg") if thumb else f"<div class=missing>{escape(photo.name)} not found</div>"
        if overlay is not None and photo.is_file():
            try:
                pics += _img(_jpeg(overlay(photo)), f"{escape(photo.name)} overlay", "thumb", "image/jpeg")
            except Exception as err:  # noqa: BLE001 - an optional picture must not cost the whole report
                log.warning("report: no overlay for %s (%s)", photo, err)
        tiles.append(
            f'<figure class=err><div class=pics>{pics}</div><figcaption><b>{escape(e["predicted"])}</b> '
            f'{e["confidence"]:.0%}<br>true: {escape(e["true"])} ({e.get("p_true", 0):.0%})'
            f'<br><span class=path title="{escape(str(photo))}">{escape(photo.name)}</span></figcaption></figure>')
    return f"<p class=note>Most confident mistakes first: predicted class and its probability, the true class and its probability.</p><div class=gallery>{''.join(tiles)}</div>"


def thumbnail(run: Path, photo: Path) -> bytes | None:
    """A small JPEG of ``photo``, kept in ``run/thumbnails/`` so the report can be rebuilt after the photos moved."""
    kept = run / "thumbnails" / f"{hashlib.sha1(str(photo).encode()).hexdigest()[:16]}.jpg"
    try:
        img = open_rgb(photo, THUMB)
    except ValueError:
        return kept.read_bytes() if kept.is_file() else None
    img.thumbnail((THUMB, THUMB))
    data = _jpeg(img)
    atomic_write_bytes(kept, data)
    return data


def _jpeg(img: Image.Image) -> bytes:
    img = to_rgb(img)
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _img(data: bytes, alt: str, cls: str, mime: str = "image/png") -> str:
    return f'<img class="{cls}" alt="{alt}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HeadstartError(f"cannot read '{path}' ({e}): the run folder is incomplete; train again to rebuild it") from None


_CSS = """
:root{--ink:#1d2330;--muted:#5b6475;--line:#e3e6ec;--accent:#2456c9;--bg:#fbfbfd;--bad:#b3261e}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:16px/1.55 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1080px;margin:0 auto;padding:32px 28px 64px}
h1{font-size:30px;margin:0 0 6px;letter-spacing:-.01em}
h1 .sub{font-weight:400;color:var(--muted);font-size:20px;margin-left:8px}
h2{font-size:21px;margin:40px 0 12px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h2.part{margin-top:56px;font-size:24px;border-bottom:2px solid var(--ink)}
h3{font-size:18px;margin:30px 0 10px}
p.lede{color:var(--muted);margin:0 0 8px}
p.note,.why{color:var(--muted);font-size:13.5px}
code{font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#eef0f4;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;margin:8px 0 12px;font-variant-numeric:tabular-nums;font-size:14.5px}
th,td{padding:6px 12px;border-bottom:1px solid var(--line);text-align:right}
th:first-child,td:first-child{text-align:left}
th{font-weight:600;color:var(--muted);font-size:13px;text-transform:uppercase;letter-spacing:.03em}
tbody tr:nth-child(even){background:#f3f4f8}
tr.total td{font-weight:600}
table.board td:nth-child(2),table.board th:nth-child(2),table.board td:last-child,table.board th:last-child{text-align:left}
tr.best td{background:#e8f0ff}
tr.skipped td{color:var(--muted)}
a{color:var(--accent);text-decoration:none}
a:hover{text-decoration:underline}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 16px;min-width:140px}
.card .num{font-size:24px;font-weight:600}
.card .lab{color:var(--muted);font-size:13px}
img.plot{max-width:100%;height:auto;border:1px solid var(--line);border-radius:6px;background:#fff}
img.cm{max-width:620px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:14px}
figure.err{margin:0;background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px}
figure.err .pics{display:flex;gap:4px;justify-content:center}
img.thumb{max-width:100%;max-height:200px;border-radius:4px}
figcaption{font-size:13.5px;margin-top:6px}
figcaption b{color:var(--bad)}
.path{color:var(--muted);font-size:12px;word-break:break-all}
.missing{color:var(--muted);font-size:12px;padding:40px 8px;text-align:center}
ul.skiplist{font-size:14px}
footer{margin-top:48px;color:var(--muted);font-size:12.5px}
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>headstart · {title}</title>
<style>{css}</style></head>
<body><main>
{body}
<footer>Written by headstart on {when}. Self-contained: every picture is embedded; nothing is fetched when it opens.</footer>
</main></body></html>
"""
