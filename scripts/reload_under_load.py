#!/usr/bin/env python3
"""Changes the bundled EfficientNet while clients send it images, and reports what they saw.

    python3 scripts/reload_under_load.py --binary target/release/ortserve \
        [--mode poll|explicit|versions]

The server runs config/default.yaml's EfficientNet alone on 127.0.0.1, with
`server.model_control` set to the mode (`versions` is `poll` over a versioned folder). Clients
post chelsea.png to /v1/models/efficientnet_lite0:predict back to back. Each round then changes
the model:

- poll: a new file, the same model with another doc_string, is renamed over the model's file.
  The script times from the rename until `ortserve_model_loads_total` counts the reload.
- explicit: the script times `POST /v2/repository/models/efficientnet_lite0/load`.
- versions: the model is `REPO/efficientnet_lite0/VERSION/model.onnx`; each round copies the
  model (another doc_string) into a folder beside and renames it to the next version number.
  The script times from the rename to the first answer that names the new version, and checks
  that each client saw the versions in order.

It prints each round's time, and the clients' status counts and latencies over the whole run.
A benchmark, not a test: it asserts nothing. It only prints.
"""

import argparse
import http.client
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "efficientnet_lite0"


def request(port, method, path, body=b"", headers=None, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def loads_ok(admin):
    _, text = request(admin, "GET", "/metrics")
    for line in text.decode().splitlines():
        if line.startswith("ortserve_model_loads_total{") and 'result="ok"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--mode", choices=["poll", "explicit", "versions"], default="poll")
    ap.add_argument("--port", type=int, default=18231)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    admin = a.port + 1
    work = tempfile.mkdtemp(prefix="ortserve-reload-")
    model = os.path.join(work, "model.onnx")
    versioned = os.path.join(work, "repo", MODEL)
    if a.mode == "versions":
        os.makedirs(os.path.join(versioned, "1"))
        model = os.path.join(versioned, "1", "model.onnx")
    shutil.copy(os.path.join(ROOT, ".ortserve/models/efficientnet_lite0.onnx"), model)
    text = open(os.path.join(ROOT, "config/default.yaml")).read()
    effnet = text[text.index("  - name: efficientnet_lite0"):text.index("  - name: mlp")]
    effnet = effnet.replace("../.ortserve/models/efficientnet_lite0.onnx",
                            versioned if a.mode == "versions" else model)
    effnet = effnet.replace("../.ortserve/", os.path.join(ROOT, ".ortserve") + "/")
    cfg = os.path.join(work, "config.yaml")
    with open(cfg, "w") as f:
        f.write(
            f"server: {{http_addr: '127.0.0.1:{a.port}', admin_addr: '127.0.0.1:{admin}', "
            f"model_control: {'poll' if a.mode == 'versions' else a.mode}, poll_interval: 1s}}"
            f"\nmodels:\n{effnet}"
        )
    log = open(os.path.join(work, "server.log"), "w")
    server = subprocess.Popen([a.binary, "serve", "--config", cfg], stdout=log, stderr=log)
    try:
        started = time.time()
        while True:
            try:
                if request(admin, "GET", "/v2/health/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() - started > 300:
                raise SystemExit(f"not ready; log in {work}/server.log")
            time.sleep(0.2)
        print(f"ready after {time.time() - started:.1f} s (mode {a.mode})")
        image = open(os.path.join(ROOT, ".ortserve/data/chelsea.png"), "rb").read()
        statuses, latencies, stop = Counter(), [], threading.Event()
        # Per client: (when answered, the version that answered), in order.
        answers = [[] for _ in range(a.clients)]

        def client(i):
            while not stop.is_set():
                t = time.perf_counter()
                version = None
                try:
                    s, body = request(a.port, "POST", f"/v1/models/{MODEL}:predict", image,
                                      {"content-type": "image/png"})
                    if s == 200:
                        version = json.loads(body).get("model_version")
                except OSError as e:
                    s = type(e).__name__
                statuses[s] += 1
                done = time.perf_counter()
                latencies.append(done - t)
                answers[i].append((done, version))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        time.sleep(3)
        for r in range(1, a.rounds + 1):
            before = loads_ok(admin)
            t0 = time.perf_counter()
            if a.mode == "poll":
                staged = os.path.join(work, ".model.onnx.new")
                shutil.copy(model, staged)
                with open(staged, "ab") as f:
                    # ModelProto field 6 (doc_string), appended: protobuf keeps the last one.
                    note = f"reload {r} at {time.time()}".encode()
                    f.write(bytes([0x32, len(note)]) + note)
                os.rename(staged, model)
                while loads_ok(admin) <= before:
                    if time.perf_counter() - t0 > 300:
                        raise SystemExit("no reload within 300 s")
                    time.sleep(0.05)
                what = "file renamed → reload counted"
            elif a.mode == "versions":
                new = str(r + 1)
                staged = os.path.join(versioned, ".staging")
                os.makedirs(staged)
                shutil.copy(os.path.join(versioned, str(r), "model.onnx"), staged)
                with open(os.path.join(staged, "model.onnx"), "ab") as f:
                    note = f"version {new} at {time.time()}".encode()
                    f.write(bytes([0x32, len(note)]) + note)
                os.rename(staged, os.path.join(versioned, new))
                while True:
                    first = [t for c in answers for (t, v) in list(c) if v == new]
                    if first:
                        break
                    if time.perf_counter() - t0 > 300:
                        raise SystemExit("no answer from the new version within 300 s")
                    time.sleep(0.01)
                print(f"round {r}: version {new} renamed into place → its first answer in "
                      f"{min(first) - t0:.2f} s")
                time.sleep(3)
                continue
            else:
                s, body = request(a.port, "POST", f"/v2/repository/models/{MODEL}/load",
                                  timeout=600)
                what = f"load call answered {s}"
            print(f"round {r}: {what} in {time.perf_counter() - t0:.2f} s")
            time.sleep(3)
        stop.set()
        for t in threads:
            t.join()
        if a.mode == "versions":
            order = [int(v) for c in answers for (_, v) in c if v is not None]
            out_of_order = sum(
                1 for c in answers
                for (_, v1), (_, v2) in zip(c, c[1:])
                if v1 is not None and v2 is not None and int(v2) < int(v1))
            print(f"versions seen: {dict(Counter(order))}; a client answered by an older "
                  f"version after a newer one: {out_of_order} times")
        lat = sorted(latencies)
        pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000  # noqa: E731
        print(json.dumps({"statuses": dict(statuses), "requests": len(lat),
                          "p50_ms": round(pct(0.5), 1), "p99_ms": round(pct(0.99), 1),
                          "max_ms": round(lat[-1] * 1000, 1)}))
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
        for line in open(os.path.join(work, "server.log")):
            if "ortserve_core::lifecycle" in line or "session ready" in line:
                print("  log:", line.strip()[:200])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
