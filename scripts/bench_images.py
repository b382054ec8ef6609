#!/usr/bin/env python3
"""Image upload benchmark: does decoding overlap with inference?

Starts `ortserve serve` on 127.0.0.1 with the given config, then for a bounded time each:
  1. sequential: one client, one image per request (decode, then infer, then the next);
  2. concurrent: N clients at once.
and prints images/s and, from /metrics, the time spent preprocessing and in device runs. When
preprocess + inference time exceeds the wall time, decoding ran while a device was busy.

Standard library only. Usage (after scripts/setup.sh, scripts/setup_models.sh, cargo build --release):
  python3 scripts/bench_images.py --binary target/release/ortserve --config config/default.yaml \
      --model efficientnet_lite0 --seconds 10 --clients 8 .ortserve/data/chelsea.png .ortserve/data/coffee.png
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def metric_sum(text, name, model):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(base, model):
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    return (metric_sum(text, "ortserve_preprocess_duration_seconds_sum", model),
            metric_sum(text, "ortserve_preprocess_duration_seconds_count", model),
            metric_sum(text, "ortserve_inference_duration_seconds_sum", model))


def post(url, body):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        return r.status


def phase(base, model, images, clients, seconds):
    url = f"{base}/v1/models/{model}:predict"
    before = scrape(base, model)
    done, errors = [0], [0]
    lock = threading.Lock()
    stop = time.time() + seconds

    def client(k):
        i = k
        while time.time() < stop:
            try:
                ok = post(url, images[i % len(images)]) == 200
            except Exception:
                ok = False
            with lock:
                done[0] += ok
                errors[0] += not ok
            i += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = scrape(base, model)
    pre, n, infer = (a - b for a, b in zip(after, before))
    return {"clients": clients, "images": done[0], "errors": errors[0], "wall_s": wall,
            "images_per_s": done[0] / wall, "preprocess_s": pre, "inference_s": infer,
            "busy_ratio": (pre + infer) / wall, "preprocess_ms_each": 1000 * pre / max(n, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--port", type=int, default=18099)
    ap.add_argument("images", nargs="+")
    a = ap.parse_args()
    images = [open(p, "rb").read() for p in a.images]
    cfg = open(a.config).read()
    cfg = re.sub(r"http_addr:\s*\S+", f"http_addr: 127.0.0.1:{a.port}", cfg)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.yaml")
        # Relative paths in the config stay relative to its own folder.
        cfg = cfg.replace("../", os.path.abspath(os.path.join(os.path.dirname(a.config), "..")) + "/")
        open(path, "w").write(cfg)
        server = subprocess.Popen([a.binary, "serve", "--config", path],
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "log"), "w"))
        base = f"http://127.0.0.1:{a.port}"
        try:
            for _ in range(600):
                try:
                    if urllib.request.urlopen(base + "/v2/health/ready", timeout=2).status == 200:
                        break
                except Exception:
                    time.sleep(0.5)
            else:
                sys.exit("server did not become ready")
            phase(base, a.model, images, 1, 2)  # warm-up
            print(f"{'phase':<11} {'clients':>7} {'images':>7} {'img/s':>7} {'pre_ms':>7} "
                  f"{'pre_s':>6} {'infer_s':>7} {'wall_s':>6} {'(pre+infer)/wall':>17} {'errors':>6}")
            for name, clients in (("sequential", 1), ("concurrent", a.clients)):
                r = phase(base, a.model, images, clients, a.seconds)
                print(f"{name:<11} {r['clients']:>7} {r['images']:>7} {r['images_per_s']:>7.1f} "
                      f"{r['preprocess_ms_each']:>7.1f} {r['preprocess_s']:>6.2f} {r['inference_s']:>7.2f} "
                      f"{r['wall_s']:>6.2f} {r['busy_ratio']:>17.2f} {r['errors']:>6}")
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
