#!/usr/bin/env bash
# GPU check for a host with an NVIDIA GPU, CUDA 13 and cuDNN 9 (e.g. a PyTorch cu13x venv) but
# no Rust: uses a release binary built elsewhere and the onnxruntime-gpu 1.31.1 libraries.
#
#   scripts/gpu-check.sh --binary target/release/ortserve --ort-lib DIR [--seconds N] [--port P]
#
# DIR holds libonnxruntime.so.1.31.1, libonnxruntime_providers_shared.so and
# libonnxruntime_providers_cuda.so (scripts/pack-gpu-libs.sh packs them; unpack gives capi/).
# CUDA and cuDNN libraries are taken from the nvidia/ packages of the active Python, if any,
# else from LD_LIBRARY_PATH as it is.
#
# It starts ortserve with the fixture CNN on cuda:0 (tuned, pinned inputs), the same model on
# cuda:0 without pinned inputs, and on cpu; shows the sessions are on the GPU; prints the probe
# table with its NVML readings; checks GPU outputs equal CPU outputs; and prints throughput with
# and without pinned inputs. Exit status: 0 all checks passed, 1 a check failed, 2 it could not
# start (bad arguments, no library, no GPU).
set -uo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "gpu-check: $*" >&2; exit 2; }

binary="" ort_lib="" seconds=10 port=18090 pid=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=${2:-}; shift 2 ;;
    --ort-lib) ort_lib=${2:-}; shift 2 ;;
    --seconds) seconds=${2:-}; shift 2 ;;
    --port) port=${2:-}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "gpu-check: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$binary" ] && [ -n "$ort_lib" ] || usage
[ -x "$binary" ] || die "no executable ortserve at $binary"
case "$seconds" in ''|*[!0-9]*) die "--seconds needs a whole number" ;; esac
here=$(cd "$(dirname "$0")/.." && pwd)
model="$here/tests/fixtures/cnn.onnx"
[ -f "$model" ] || die "fixture model missing: $model"

lib=$(ls "$ort_lib"/libonnxruntime.so.1.* 2>/dev/null | head -n 1)
[ -n "$lib" ] || die "no libonnxruntime.so.1.* in $ort_lib"
for f in libonnxruntime_providers_shared.so libonnxruntime_providers_cuda.so; do
  [ -f "$ort_lib/$f" ] || die "$f missing from $ort_lib: the CUDA execution provider needs it (use the onnxruntime-gpu libraries)"
done

gpus=$(ls /proc/driver/nvidia/gpus 2>/dev/null | wc -l)
[ "$gpus" -gt 0 ] || die "no NVIDIA GPU visible (/proc/driver/nvidia/gpus is empty or missing)"
command -v python3 >/dev/null || die "python3 is needed for the HTTP client"

# CUDA 13 and cuDNN 9 from the Python environment (PyTorch's nvidia-* wheels), when present.
nv=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null || true)
if [ -n "$nv" ]; then
  extra=$(find "$nv/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | tr '\n' ':')
  export LD_LIBRARY_PATH="${extra}${LD_LIBRARY_PATH:-}"
fi
export ORT_DYLIB_PATH="$lib" CUDA_DEVICE_ORDER=PCI_BUS_ID

work=$(mktemp -d)
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; [ -n "$pid" ] && wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT
cat > "$work/config.yaml" <<YAML
server: {http_addr: "127.0.0.1:$port", drain_delay: 0s, shutdown_timeout: 10s}
models:
  - name: cnn_gpu
    path: $model
    devices: "cuda:0"
    batching: {max_queue_delay: 1ms}
    tuning: {max_batch_cap: 512, max_duration: 90s, cache_dir: $work/cache, force: true}
  - name: cnn_gpu_plain
    path: $model
    devices: "cuda:0"
    cuda: {pinned_inputs: false}
    batching: {max_batch_size: 64, max_queue_delay: 1ms}
  - name: cnn_cpu
    path: $model
    devices: cpu
    batching: {max_batch_size: 64}
YAML

echo "== gpu-check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv 2>/dev/null || true
echo "library: $lib"
"$binary" serve --config "$work/config.yaml" > "$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "ortserve exited during startup:" >&2; tail -n 30 "$work/server.log" >&2; exit 2
  fi
  python3 - "$port" <<'PY' && break
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/health/ready", timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)
PY
  sleep 0.5
done
grep -E "session ready|tuning cnn_gpu" "$work/server.log" | sed 's/\x1b\[[0-9;]*m//g'
echo "== GPU memory held by ortserve (nvidia-smi)"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv 2>/dev/null | grep -E "pid|$pid" || true

python3 - "$port" "$seconds" <<'PY'
import json, struct, sys, threading, time, urllib.request, random
port, seconds = int(sys.argv[1]), int(sys.argv[2])
base = f"http://127.0.0.1:{port}"
ok = True

def get(path):
    return json.load(urllib.request.urlopen(base + path, timeout=30))

def infer(model, rows, values):
    header = json.dumps({"inputs": [{"name": "input", "shape": [rows, 3, 64, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 4 * len(values)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    body = header + struct.pack(f"<{len(values)}f", *values)
    req = urllib.request.Request(f"{base}/v2/models/{model}/infer", data=body, method="POST",
                                 headers={"Content-Type": "application/octet-stream",
                                          "Inference-Header-Content-Length": str(len(header))})
    resp = urllib.request.urlopen(req, timeout=60)
    data = resp.read()
    n = int(resp.headers["Inference-Header-Content-Length"])
    out = json.loads(data[:n])["outputs"][0]
    return struct.unpack(f"<{len(data) - n >> 2}f", data[n:]), out["shape"]

print("== devices")
for m in ("cnn_gpu", "cnn_gpu_plain", "cnn_cpu"):
    d = get(f"/v2/models/{m}")["devices"]
    print(m, [(x["name"], x["max_batch_size"]) for x in d])
    if m.startswith("cnn_gpu") and d[0]["name"] != "cuda:0":
        ok = False; print("FAIL: not on cuda:0")

print("== probe on cuda:0 (memory from NVML)")
t = get("/v1/models/cnn_gpu/tuning")["devices"][0]
print(f"chosen {t['chosen']} ({t['reason']}); memory source: {t['memory_source']}")
print(f"{'batch':>6} {'outcome':<20} {'latency_ms':>11} {'rows_per_s':>12} {'gpu_used_MiB':>13} {'gpu_total_MiB':>14}")
for p in sorted(t["probes"], key=lambda p: p["batch"]):
    total = p["memory_limit_bytes"] or 0
    print(f"{p['batch']:>6} {p['outcome']:<20} {p['latency_ms']:>11.3f} {p['rows_per_second']:>12.0f} "
          f"{p['memory_used_bytes'] / 2**20:>13.0f} {total / 2**20:>14.0f}")
if not t["memory_source"].startswith("NVML"):
    ok = False; print("FAIL: the probe did not read NVML")

print("== GPU outputs against CPU outputs")
random.seed(1)
for rows in (1, 7, 32):
    x = [random.uniform(-1, 1) for _ in range(rows * 3 * 64 * 64)]
    g, gs = infer("cnn_gpu", rows, x)
    c, cs = infer("cnn_cpu", rows, x)
    diff = max(abs(a - b) for a, b in zip(g, c))
    scale = max(abs(b) for b in c)
    good = gs == cs and diff <= 1e-3 * max(1.0, scale)
    ok &= good
    print(f"rows {rows}: shape {gs}, max |gpu - cpu| = {diff:.2e} (largest |value| {scale:.2f}) {'ok' if good else 'FAIL'}")

def load(model, rows, clients, secs):
    x = [random.uniform(-1, 1) for _ in range(rows * 3 * 64 * 64)]
    done, errors, lat = [0], [0], []
    stop = time.time() + secs
    def client():
        while time.time() < stop:
            t0 = time.perf_counter()
            try:
                infer(model, rows, x); done[0] += 1; lat.append(time.perf_counter() - t0)
            except Exception:
                errors[0] += 1
    ts = [threading.Thread(target=client) for _ in range(clients)]
    [t.start() for t in ts]; [t.join() for t in ts]
    lat.sort()
    p50 = lat[len(lat) // 2] * 1e3 if lat else 0
    return done[0] / secs, done[0] * rows / secs, p50, errors[0]

print(f"== throughput, 8 clients x 16 rows, binary tensors, {seconds}s each")
for m in ("cnn_gpu", "cnn_gpu_plain", "cnn_gpu", "cnn_gpu_plain"):
    rps, rows, p50, err = load(m, 16, 8, seconds / 2)
    label = "pinned+IoBinding" if m == "cnn_gpu" else "plain inputs"
    print(f"{label:<17} {rps:8.1f} req/s {rows:9.0f} rows/s  p50 {p50:7.2f} ms  errors {err}")
    ok &= err == 0
print("RESULT:", "all checks passed" if ok else "some checks FAILED")
sys.exit(0 if ok else 1)
PY
status=$?
kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
exit $status
