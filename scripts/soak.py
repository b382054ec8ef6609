#!/usr/bin/env python3
"""Soak: many clients, mixed valid and invalid requests, a flood past capacity, and a SIGTERM in
the middle. Bounded in time, 127.0.0.1 only, standard library only.

  python3 scripts/soak.py --binary target/release/ortserve [--clients 48] [--seconds 20]

It starts `ortserve serve` with a config of its own (the CNN fixture, a small queue so a flood
overflows it, drain_delay 2s, shutdown_timeout 10s), and reports:
  - status counts per kind of request, and answered vs failed after connecting;
  - p50/p99 latency of the 200s;
  - server RSS before and after the flood;
  - SIGTERM: when readiness turned 503, when new connections were refused, the exit code and time.
Exit status 0 when: valid requests got only 200/429 (503 only while draining), invalid ones only
4xx, no request was dropped after its connection was accepted, and the server exited 0 in time.
"""
import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def status_kib(pid, field):
    """A KiB field of /proc/PID/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pid):
    return status_kib(pid, "VmRSS")


def exchange(port, method, path, body=b"", headers=None, timeout=30):
    """One request on a fresh connection. Returns (status, head, body, seconds) or raises
    ConnectionRefusedError (not accepted) / OSError (dropped after connecting)."""
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}", "Connection: close"]
    for k, v in (headers or {}).items():
        head.append(f"{k}: {v}")
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    if not data.startswith(b"HTTP/1.1 "):
        raise OSError("connection closed without a response")
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(data[9:12]), head.decode("latin-1").lower(), rest, time.perf_counter() - t0


def request(port, method, path, body=b"", headers=None, timeout=30):
    """`exchange`, returning (status, seconds)."""
    status, _, _, secs = exchange(port, method, path, body, headers, timeout)
    return status, secs


def cnn_binary(rows, seed):
    values = [((i * 7919 + seed) % 200) / 100.0 - 1.0 for i in range(rows * 3 * 64 * 64)]
    header = json.dumps({"inputs": [{"name": "input", "shape": [rows, 3, 64, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 4 * len(values)}}]}).encode()
    return header + struct.pack(f"<{len(values)}f", *values), len(header)


INVALID = [
    ("POST", "/v2/models/cnn/infer", b'{"inputs": [', {}),                                  # malformed
    ("POST", "/v2/models/cnn/infer", b'{"inputs":[{"name":"input","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}', {}),
    ("POST", "/v2/models/nope/infer", b'{"inputs":[]}', {}),                               # unknown model
    ("POST", "/v2/models/cnn/infer", b"\x89PNG", {"Content-Type": "image/png"}),          # media type
    ("GET", "/v2/models/cnn/versions/9", b"", {}),                                         # unknown version
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--clients", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=20, help="flood time; SIGTERM comes at 60%% of it")
    ap.add_argument("--port", type=int, default=18097)
    a = ap.parse_args()

    work = tempfile.mkdtemp()
    cfg = os.path.join(work, "soak.yaml")
    with open(cfg, "w") as f:
        f.write(f"""server: {{http_addr: "127.0.0.1:{a.port}", drain_delay: 2s, shutdown_timeout: 10s, request_timeout: 10s}}
models:
  - name: cnn
    path: {os.path.abspath(os.path.join(FIXTURES, "cnn.onnx"))}
    devices: cpu
    batching: {{max_batch_size: 16, max_queue_delay: 2ms, queue_capacity: 16}}
""")
    server = subprocess.Popen([a.binary, "serve", "--config", cfg], stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(work, "server.log"), "w"))
    port = a.port
    for _ in range(300):
        try:
            if request(port, "GET", "/v2/health/ready")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    else:
        sys.exit("server did not become ready")

    rss_start = rss_kib(server.pid)
    valid_status, invalid_status, latencies = Counter(), Counter(), []
    refused, drops = [0], []
    lock = threading.Lock()
    start = time.time()
    stop = start + a.seconds
    term_at = start + 0.6 * a.seconds
    events = {}
    bodies = [cnn_binary(r, s) for s, r in enumerate((1, 2, 4))]

    def client(k):
        i = k
        while time.time() < stop:
            i += 1
            try:
                if i % 5 == 0:
                    method, path, body, hdr = INVALID[(i // 5) % len(INVALID)]
                    status, _ = request(port, method, path, body, hdr)
                    with lock:
                        invalid_status[status] += 1
                else:
                    body, n = bodies[i % len(bodies)]
                    status, secs = request(port, "POST", "/v2/models/cnn/infer", body,
                                           {"Content-Type": "application/octet-stream",
                                            "Inference-Header-Content-Length": str(n)})
                    with lock:
                        valid_status[status] += 1
                        if status == 200:
                            latencies.append(secs)
            except ConnectionRefusedError:
                with lock:
                    refused[0] += 1
                time.sleep(0.01)
            except OSError:
                with lock:
                    drops.append(time.time())

    def watcher():
        # After SIGTERM: when readiness flips, and when connections are refused.
        while time.time() < stop + 15:
            try:
                status, _ = request(port, "GET", "/v2/health/ready", timeout=5)
                if status == 503 and "ready_503" not in events and "sigterm" in events:
                    events["ready_503"] = time.time()
            except ConnectionRefusedError:
                if "sigterm" in events:
                    events.setdefault("refused", time.time())
                    return
            except OSError:
                pass
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
    w = threading.Thread(target=watcher)
    for t in threads:
        t.start()
    w.start()
    time.sleep(max(0, start + 0.2 * a.seconds - time.time()))
    rss_warm = rss_kib(server.pid)
    time.sleep(max(0, term_at - time.time()))
    rss_flood = rss_kib(server.pid)
    events["sigterm"] = time.time()
    server.send_signal(signal.SIGTERM)
    try:
        code = server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        code = None
    events["exit"] = time.time()
    for t in threads:
        t.join()
    w.join()

    # The listener closes drain_delay after SIGTERM; connections the kernel had queued but the
    # server never accepted are reset then. Those were not accepted; any other drop was.
    close_at = events["sigterm"] + 2.0
    at_close = [d for d in drops if abs(d - close_at) < 0.25]
    dropped = len(drops) - len(at_close)
    latencies.sort()
    pct = lambda p: 1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0
    t0 = events["sigterm"]
    report = {
        "clients": a.clients, "seconds": a.seconds,
        "valid_requests": dict(sorted(valid_status.items())),
        "invalid_requests": dict(sorted(invalid_status.items())),
        "not_accepted_connection_refused": refused[0],
        "reset_at_listener_close_never_accepted": len(at_close),
        "dropped_after_being_accepted": dropped,
        "latency_200_ms": {"p50": round(pct(0.5), 2), "p99": round(pct(0.99), 2), "count": len(latencies)},
        "rss_kib": {"start": rss_start, "flood_20pct": rss_warm, "flood_60pct": rss_flood},
        "sigterm": {
            "readiness_503_after_s": round(events["ready_503"] - t0, 3) if "ready_503" in events else None,
            "connections_refused_after_s": round(events["refused"] - t0, 3) if "refused" in events else None,
            "exit_code": code, "exit_after_s": round(events["exit"] - t0, 3),
        },
    }
    print(json.dumps(report, indent=2))
    ok = (set(valid_status) <= {200, 429, 503} and all(400 <= s < 500 for s in invalid_status)
          and dropped == 0 and code == 0 and events["exit"] - t0 <= 2 + 10 + 2
          and "ready_503" in events and ("refused" not in events or events["ready_503"] <= events["refused"]))
    print("RESULT:", "pass" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
