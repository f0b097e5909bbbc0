"""`python benchmarks/serve_bench.py [RUN]`: `headstart serve`'s prediction API under load on the ants/bees run.

200 sequential and then 200 more from 8 concurrent clients, each one a val photo's bytes POSTed to /api/predict
(cycling through the 153 val photos); every answer is checked against `headstart predict`'s for the same photo
(``Classifier.predict`` on that one file, what `headstart predict RUN PHOTO --json` prints). Latency is measured by
the client (the whole HTTP round trip) and reported by the server (decode + forward pass). Without RUN, the run is
trained first (cached features make that quick after the first time).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import machine, shared, write_section

SEQUENTIAL, CONCURRENT, CLIENTS = 200, 200, 8
KEYS = ("label", "probability", "top")


def post(url: str, data: bytes) -> tuple[float, dict]:
    t = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url + "api/predict", data=data, method="POST"), timeout=60) as r:
        answer = json.loads(r.read())
    return (time.perf_counter() - t) * 1000, answer


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20)[-1]


def parts(clf, photos: list[Path]) -> str:
    """Where a prediction's time goes, in-process on the same photos: decoding, resizing, the forward pass."""
    from headstart import onnx, transforms
    from headstart.data import open_rgb

    dc = clf.backbone.data_config
    session, to_pixels, size = onnx.feature_session(clf.backbone), transforms.pixel_transform(dc), transforms.decode_size(dc)
    times: dict[str, list[float]] = {"decode": [], "resize + crop": [], "forward (ONNX Runtime)": [], "whole predict": []}
    for p in photos[:60]:
        t0 = time.perf_counter()
        img = open_rgb(p, size)
        t1 = time.perf_counter()
        px = to_pixels(img)[None]
        t2 = time.perf_counter()
        session.run(None, {"pixels": px})
        t3 = time.perf_counter()
        clf.predict([p])
        t4 = time.perf_counter()
        for k, (a, b) in zip(times, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
            times[k].append((b - a) * 1000)
    return ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in times.items())


def main() -> None:
    import headstart
    from headstart.serve import make_server, url_of, warm

    run = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "ants"
    if not (run / "config.json").is_file():
        headstart.train(shared() / "datasets" / "hymenoptera", out=run, progress=False)
    with open(run / "predictions.csv", newline="") as f:
        photos = [Path(r["path"]) for r in csv.DictReader(f)]
    clf = headstart.load(run)
    expected = {p: {k: clf.predict([p])[0].to_dict()[k] for k in KEYS} for p in photos}
    data = {p: p.read_bytes() for p in photos}

    server = make_server(run, "127.0.0.1", 0)
    warm(server.app)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = url_of(server)
    results: dict[str, list[tuple[float, dict, Path]]] = {}

    def one(i: int) -> tuple[float, dict, Path]:
        p = photos[i % len(photos)]
        ms, answer = post(url, data[p])
        return ms, answer, p

    t = time.perf_counter()
    results["sequential"] = [one(i) for i in range(SEQUENTIAL)]
    seq_s = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results[f"{CLIENTS} concurrent"] = list(pool.map(one, range(CONCURRENT)))
    conc_s = time.perf_counter() - t
    server.shutdown()

    lines = ["| requests | answers equal to `headstart predict` | client median ms | client p95 ms | server median ms | server p95 ms | requests/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (name, rows), seconds in zip(results.items(), (seq_s, conc_s)):
        same = sum({k: a[k] for k in KEYS} == expected[p] for _, a, p in rows)
        client, srv = [ms for ms, _, _ in rows], [a["latency_ms"] for _, a, _ in rows]
        lines.append(f"| {len(rows)} {name} | {same} / {len(rows)} | {statistics.median(client):.1f} | {p95(client):.1f} | "
                     f"{statistics.median(srv):.1f} | {p95(srv):.1f} | {len(rows) / seconds:.0f} |")
        assert same == len(rows), f"{len(rows) - same} {name} answers differ from headstart predict's"
    split = parts(clf, photos)
    load1 = os.getloadavg()[0]
    body = f"""## `headstart serve`: the prediction API under load

`python benchmarks/serve_bench.py` — the ants/bees run (default backbone `efficientnet_lite0`, ONNX Runtime fp32),
its {len(photos)} val photos POSTed as bytes to `/api/predict` over loopback, cycling; {machine()}. Client: the whole
HTTP round trip (urllib, a new connection each time); server: the `latency_ms` it reports (decode, resize, forward
pass, head; predictions run one at a time, and this is the time of one, not of its wait). 1-minute load average
at the end: {load1:.1f} (the cores are shared with other jobs, so the absolute numbers are noisy).

{chr(10).join(lines)}

The goal is a median of at most 20 ms for the default backbone. No request failed. Where the time of one prediction goes (medians, in-process, same photos): {split}.
Concurrent clients queue for the cores: ONNX Runtime already spreads one forward pass over all of them, so the
server runs one prediction at a time and 8 clients each wait for about 7 others.
"""
    print(body)
    write_section("serve", body)


if __name__ == "__main__":
    main()
