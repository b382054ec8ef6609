#!/usr/bin/env python3
"""Restarts two gRPC replicas one at a time behind HAProxy while clients call them, and reports
what the clients saw.

    .ortserve/venv/bin/python scripts/grpc_rolling_restart.py --binary target/release/ortserve \
        [--rounds 3] [--clients 8] [--no-checks]

(The Python needs grpcio and tritonclient[grpc], as .ortserve/venv has; run it as root: when
`haproxy` is missing it is installed with apt-get.)

Two replicas (A, B) serve tests/fixtures/mlp.onnx on 127.0.0.1 with `drain_delay: 2s`. HAProxy
sits in front: `mode http`, a frontend on 127.0.0.1 speaking h2c (`proto h2`), and a backend with
the replicas' gRPC ports as `proto h2` servers, health-checked with `GET /v2/health/ready` on
their admin ports every 200 ms (`fall 1`, `rise 2`, so a draining replica, whose readiness is
503 at once, leaves the rotation within a check), with `retry-on all-retryable-errors`,
`retries 3` and `option redispatch`. Clients (one HTTP/2 connection each to HAProxy, gRPC's own
transparent retries off) call `inference.GRPCInferenceService/ModelInfer` back to back for the
whole run. Each round then restarts A and then B: SIGTERM, wait for the exit, start a new
replica on the same ports, wait until its readiness is 200 and HAProxy has it UP.

With --no-checks HAProxy has no health checks: a draining replica stays in the rotation through
its drain_delay, so calls are in flight when it sends GOAWAY and closes its listener, and only
the GOAWAY and the refused connections (retried, redispatched) turn HAProxy away. The script then
puts the replica in maintenance (HAProxy's runtime API) from its exit until the new one is ready,
as a deploy tool would, so that only the drain is tested, not calls to a replica still loading.

It prints the timeline of each restart (SIGTERM, HAProxy DOWN, exit, start, ready, HAProxy UP),
the calls (total, OK, failed by status code with the first messages and when they failed),
calls/s and latencies, HAProxy's counts per replica, and the calls HAProxy logged with an error,
a retry or a redispatch. A benchmark, not a test: it asserts nothing, but exits 1
if any call failed.
"""

import argparse
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

# An `option httplog` line: ... frontend backend/server Tq/Tw/Tc/Tr/Ta status bytes - - flags
# actconn/feconn/beconn/srv_conn/retries ...
HTTPLOG = re.compile(r" \S+ \S+/\S+ [-\d]+/[-\d]+/[-\d]+/[-\d]+/\+?[-\d]+ (?P<status>-?\d+) "
                    r"\S+ \S+ \S+ (?P<flags>\S{4}) \d+/\d+/\d+/\d+/\+?(?P<retries>\d+) ")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = time.monotonic()


def now():
    return time.monotonic() - T0


def say(msg):
    print(f"[{now():7.2f}s] {msg}", flush=True)


def ready(admin, timeout=1.0):
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=timeout)
    try:
        c.request("GET", "/v2/health/ready")
        return c.getresponse().status == 200
    except OSError:
        return False
    finally:
        c.close()


def ensure_haproxy():
    path = shutil.which("haproxy")
    if path:
        return path
    say("haproxy is not installed: installing it with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "haproxy"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    path = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(path):
        raise SystemExit("haproxy is still missing after apt-get install")
    return path


class Replica:
    def __init__(self, name, binary, work, model, base):
        self.name, self.binary, self.work = name, binary, work
        self.http, self.admin, self.grpc = base, base + 1, base + 2
        self.cfg = os.path.join(work, f"{name}.yaml")
        with open(self.cfg, "w") as f:
            f.write(
                f"server: {{http_addr: '127.0.0.1:{self.http}', "
                f"admin_addr: '127.0.0.1:{self.admin}', grpc_addr: '127.0.0.1:{self.grpc}', "
                f"drain_delay: 2s, shutdown_timeout: 10s}}\n"
                f"models:\n  - {{name: mlp, path: {model}, devices: cpu, "
                f"batching: {{max_batch_size: 8}}}}\n")
        self.proc, self.generation, self.log = None, 0, None

    def start(self):
        self.generation += 1
        self.log = os.path.join(self.work, f"{self.name}{self.generation}.log")
        with open(self.log, "w") as log:
            # A session of its own, so a Ctrl-C reaches the script only; it stops the replicas.
            self.proc = subprocess.Popen([self.binary, "serve", "--config", self.cfg],
                                         stdout=log, stderr=log, start_new_session=True)

    def wait_ready(self, limit=120):
        t = time.monotonic()
        while not ready(self.admin):
            if self.proc.poll() is not None:
                raise SystemExit(f"replica {self.name} exited {self.proc.returncode}; "
                                 f"see {self.log}")
            if time.monotonic() - t > limit:
                raise SystemExit(f"replica {self.name} not ready in {limit} s; see {self.log}")
            time.sleep(0.05)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class HAProxy:
    def __init__(self, binary, work, port, replicas, checks=True):
        self.binary, self.work, self.port = binary, work, port
        self.sock = os.path.join(work, "haproxy.sock")
        self.cfg = os.path.join(work, "haproxy.cfg")
        self.log = os.path.join(work, "haproxy.log")
        # With checks off, HAProxy learns of a drain only from the replica's GOAWAY and, once
        # its listener is closed, from refused connections (retried on the other replica).
        servers = "\n".join(
            f"    server {r.name} 127.0.0.1:{r.grpc} proto h2"
            + (f" check port {r.admin} check-proto h1" if checks else "")
            for r in replicas)
        with open(self.cfg, "w") as f:
            f.write(f"""global
    log stdout format raw local0 info
    stats socket {self.sock} mode 600 level admin
    maxconn 2000

defaults
    mode http
    log global
    option httplog
    # Only the calls with an error, a retry or a redispatch are logged (100k lines a minute
    # otherwise, which HAProxy's non-blocking stdout log drops some of).
    option dontlog-normal
    option log-health-checks
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1
    retry-on all-retryable-errors

frontend grpc_in
    bind 127.0.0.1:{port} proto h2
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server inter 200ms fastinter 200ms downinter 200ms fall 1 rise 2
{servers}
""")
        self.proc = None

    def start(self):
        subprocess.run([self.binary, "-c", "-f", self.cfg], check=True,
                       stdout=subprocess.DEVNULL)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([self.binary, "-db", "-f", self.cfg],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        t = time.monotonic()
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() - t > 10:
                raise SystemExit(f"haproxy did not start; see {self.log}")
            time.sleep(0.05)

    def command(self, cmd):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(self.sock)
            s.sendall(cmd.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out.decode()
        finally:
            s.close()

    def servers(self):
        """{server name: its row of `show stat`} for the replicas backend."""
        lines = self.command("show stat").splitlines()
        head = lines[0].lstrip("# ").split(",")
        rows = {}
        for line in lines[1:]:
            row = dict(zip(head, line.split(",")))
            if row.get("pxname") == "replicas" and row.get("svname") not in ("BACKEND", None):
                rows[row["svname"]] = row
        return rows

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def interrupted(*_):
    raise KeyboardInterrupt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", default=os.path.join(ROOT, "tests/fixtures/mlp.onnx"))
    ap.add_argument("--port", type=int, default=18600,
                    help="HAProxy's port; replica A uses port+10..+12, B port+20..+22")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds of load before the first restart, between restarts and after")
    ap.add_argument("--deadline", type=float, default=30.0, help="each call's deadline, seconds")
    ap.add_argument("--no-checks", action="store_true",
                    help="no HAProxy health checks: a draining replica stays in the rotation "
                         "through its drain_delay until its GOAWAY and refused connections "
                         "turn HAProxy away; the script itself puts the replica in maintenance "
                         "from its exit until the new one is ready (as a deploy tool would)")
    a = ap.parse_args()
    if not 18600 <= a.port <= 18677:
        raise SystemExit("--port must leave its replicas within 18600-18699")
    lib = os.path.join(ROOT, ".ortserve/lib/libonnxruntime.so")
    if "ORT_DYLIB_PATH" not in os.environ and os.path.exists(lib):
        os.environ["ORT_DYLIB_PATH"] = lib

    # SIGTERM (a CI runner stopping the job) cleans up as Ctrl-C does.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)  # even if started with SIGINT ignored (`cmd &`)
    work = tempfile.mkdtemp(prefix="ortserve-rolling-")
    replicas = [Replica("a", os.path.abspath(a.binary), work, os.path.abspath(a.model),
                        a.port + 10),
                Replica("b", os.path.abspath(a.binary), work, os.path.abspath(a.model),
                        a.port + 20)]
    haproxy = HAProxy(ensure_haproxy(), work, a.port, replicas, checks=not a.no_checks)
    stop = threading.Event()
    threads = []
    failed = False
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready()
        say("replicas ready")
        haproxy.start()
        t = time.monotonic()
        while not a.no_checks and any(s["status"] != "UP" for s in haproxy.servers().values()):
            if time.monotonic() - t > 10:
                raise SystemExit(f"HAProxy has not both replicas UP: {haproxy.servers()}")
            time.sleep(0.05)
        seen = ", ".join(f"{n} {row['status']}" for n, row in haproxy.servers().items())
        say(f"haproxy on {a.port}, servers {seen}")

        # HAProxy's view of each server, every 20 ms, as (time, server, status) on changes.
        states, lock = [], threading.Lock()

        def watch():
            last = {}
            while not stop.is_set():
                try:
                    for name, row in haproxy.servers().items():
                        if last.get(name) != row["status"]:
                            last[name] = row["status"]
                            with lock:
                                states.append((now(), name, row["status"]))
                except OSError:
                    pass
                time.sleep(0.02)

        def haproxy_says(name, status, since, limit=30):
            t = time.monotonic()
            while time.monotonic() - t < limit:
                with lock:
                    for (at, n, s) in states:
                        if n == name and s.startswith(status) and at >= since:
                            return at
                time.sleep(0.01)
            return None

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        req = service_pb2.ModelInferRequest(model_name="mlp")
        inp = req.inputs.add()
        inp.name, inp.datatype = "input", "FP32"
        inp.shape.extend([1, 4])
        req.raw_input_contents.append(x.tobytes())
        ok = [0] * a.clients
        latencies = [[] for _ in range(a.clients)]
        failures = [[] for _ in range(a.clients)]  # (time, code, message)

        def client(i):
            channel = grpc.insecure_channel(
                f"127.0.0.1:{a.port}",
                options=[("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)])
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                while not stop.is_set():
                    t = time.perf_counter()
                    try:
                        resp = stub.ModelInfer(req, timeout=a.deadline)
                        if resp.outputs and resp.outputs[0].name == "logits" \
                                and resp.raw_output_contents:
                            ok[i] += 1
                        else:
                            failures[i].append((now(), "BAD_ANSWER", str(resp)[:200]))
                    except grpc.RpcError as e:
                        failures[i].append((now(), e.code().name, e.details()))
                    latencies[i].append(time.perf_counter() - t)
            finally:
                channel.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        load_start = time.perf_counter()
        for th in threads:
            th.start()
        say(f"{a.clients} clients calling ModelInfer through haproxy")
        time.sleep(a.settle)

        timeline = []
        for rnd in range(1, a.rounds + 1):
            for r in replicas:
                ev = {"round": rnd, "replica": r.name}
                ev["sigterm"] = now()
                r.proc.send_signal(signal.SIGTERM)
                code = r.proc.wait(timeout=60)
                ev["exit"], ev["exit_code"] = now(), code
                if a.no_checks:
                    haproxy.command(f"disable server replicas/{r.name}")
                ev["haproxy_down"] = (None if a.no_checks else
                                      haproxy_says(r.name, "DOWN", ev["sigterm"], limit=5))
                r.start()
                ev["start"] = now()
                r.wait_ready()
                ev["ready"] = now()
                if a.no_checks:
                    haproxy.command(f"enable server replicas/{r.name}")
                ev["haproxy_up"] = (None if a.no_checks else
                                    haproxy_says(r.name, "UP", ev["ready"] - 0.5, limit=30))
                if ev["haproxy_up"] is None and not a.no_checks:
                    raise SystemExit(f"HAProxy did not bring {r.name} back UP")
                timeline.append(ev)
                rel = lambda k: (("n/a" if a.no_checks else "never") if ev[k] is None  # noqa: E731
                                 else f"+{ev[k] - ev['sigterm']:.2f}s")
                say(f"round {rnd} replica {r.name}: SIGTERM; haproxy DOWN {rel('haproxy_down')}; "
                    f"exit {ev['exit_code']} {rel('exit')}; started {rel('start')}; "
                    f"ready {rel('ready')}; haproxy UP {rel('haproxy_up')}")
                time.sleep(a.settle)

        stop.set()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - load_start
        threads = []

        lat = sorted(x for c in latencies for x in c)
        fails = sorted(f for c in failures for f in c)
        total = len(lat)
        pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000  # noqa: E731
        print("\n== results ==")
        print(f"calls {total}, ok {sum(ok)}, failed {len(fails)}, {total / elapsed:.0f} calls/s "
              f"over {elapsed:.1f} s; latency p50 {pct(0.5):.2f} ms, p99 {pct(0.99):.2f} ms, "
              f"max {lat[-1] * 1000:.1f} ms")
        if fails:
            failed = True

            def phase(at):
                for ev in timeline:
                    n = ev["replica"]
                    if ev["sigterm"] <= at < ev["exit"]:
                        return f"{n} draining (SIGTERM..exit)"
                    if ev["exit"] <= at < ev["ready"]:
                        return f"{n} starting (exit..ready)"
                    if ev["haproxy_up"] and ev["ready"] <= at < ev["haproxy_up"]:
                        return f"{n} ready, not yet UP in haproxy"
                return "no restart under way"

            print(f"failed by code: {dict(Counter(c for _, c, _ in fails))}")
            print("failed by phase and code:")
            for (ph, c), n in sorted(Counter((phase(at), c) for at, c, _ in fails).items()):
                print(f"  {n:6d}  {c:18s} {ph}")
            print("distinct messages (count, first seen):")
            first = {}
            for (at, c, msg) in fails:
                first.setdefault((c, msg), [at, 0])[1] += 1
            for (c, msg), (at, n) in sorted(first.items(), key=lambda kv: kv[1][0])[:10]:
                print(f"  {n:6d}  [{at:7.2f}s] {c}: {msg[:300]}")
            print("first failures:")
            for (at, c, msg) in fails[:5]:
                print(f"  [{at:7.2f}s] {c}: {msg[:300]}")
        rows = haproxy.servers()
        print("sessions per replica (haproxy stot; a redispatched call counts on both): "
              + ", ".join(f"{n} {row['stot']}" for n, row in rows.items())
              + "; haproxy retries (wretr) "
              + ", ".join(f"{n} {row['wretr']}" for n, row in rows.items())
              + "; redispatches (wredis) "
              + ", ".join(f"{n} {row['wredis']}" for n, row in rows.items()))
        info = dict(l.split(": ", 1) for l in haproxy.command("show info").splitlines()
                    if ": " in l)
        print(f"haproxy: {info.get('DroppedLogs', '?')} log lines dropped")
        print("haproxy state changes: "
              + ", ".join(f"{n} {s} @{at:.2f}s" for (at, n, s) in states))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        failed = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop.set()
        for th in threads:
            th.join(timeout=a.deadline + 5)
        haproxy.stop()
        for r in replicas:
            r.stop()
        # HAProxy's lines about calls that were not a clean 200 on the first try, and its
        # warnings and alerts but for health checks (the state changes are printed above).
        noisy, kinds = [], Counter()
        for line in open(haproxy.log, errors="replace") if os.path.exists(haproxy.log) else []:
            m = HTTPLOG.search(line)
            if m:
                retried = "+" in line.split(m["flags"], 1)[1].split(" ", 2)[1]
                kinds[(m["status"], m["flags"],
                       ("redispatched after " if retried else "") + f"{m['retries']} retries")] += 1
                if m["status"] == "200" and m["flags"] == "----":
                    continue
            elif line.startswith("[") or "Health check" in line or "Server replicas/" in line:
                continue  # the same line again from stderr, or a check: in the timeline
            noisy.append(line.rstrip())
        print("haproxy log, calls with an error, retry or redispatch, by HTTP status, "
              "termination flags and retries:" + ("" if kinds else " none"))
        for (st, fl, rt), n in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {n:7d}  {st} {fl} {rt}")
        if noisy:
            print(f"haproxy log, other lines ({len(noisy)}, first 40):")
        for line in noisy[:40]:
            print("  ", line[:300])
        for r in replicas:
            for g in range(1, r.generation + 1):
                path = os.path.join(work, f"{r.name}{g}.log")
                for line in open(path, errors="replace") if os.path.exists(path) else []:
                    if any(w in line for w in ("WARN", "ERROR", "SIGTERM", "draining",
                                               "no longer accepting", "stopped")):
                        print(f"  {r.name}{g}:", line.strip()[:250])
        if os.environ.get("KEEP_WORK"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
