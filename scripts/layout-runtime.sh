#!/usr/bin/env bash
# Lays out the runtime tree the binary expects, for a container image or a test:
#   DEST/ortserve                       the binary
#   DEST/lib/libonnxruntime.so          ONNX Runtime (found next to the binary, in lib/)
#   DEST/models/                        EfficientNet-Lite0 and its labels
#   DEST/config/config.yaml             config/container.yaml
# Usage: scripts/layout-runtime.sh DEST --binary PATH [--variant cpu|cuda]
#   cpu:  libonnxruntime.so.1.32.0 from onnxruntime==1.32.0 (scripts/setup.sh, sha256-pinned)
#   cuda: the libraries of onnxruntime-gpu==1.31.1 (CUDA 13, cuDNN 9), providers beside it
# The Dockerfile runs this; tests/deploy.rs runs it into a temporary folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="" binary="" variant=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --variant) variant=$2; shift 2 ;;
    -*) echo "layout-runtime: unknown option $1" >&2; exit 2 ;;
    *) dest=$1; shift ;;
  esac
done
[ -n "$dest" ] && [ -n "$binary" ] || { echo "usage: $0 DEST --binary PATH [--variant cpu|cuda]" >&2; exit 2; }
[ -x "$binary" ] || { echo "layout-runtime: no executable at $binary" >&2; exit 2; }
mkdir -p "$dest/lib" "$dest/models" "$dest/config"

case "$variant" in
  cpu)
    "$root/scripts/setup.sh" >/dev/null
    cp "$root/.ortserve/lib/libonnxruntime.so.1.32.0" "$root/.ortserve/lib/libonnxruntime_providers_shared.so" "$dest/lib/"
    ln -sf libonnxruntime.so.1.32.0 "$dest/lib/libonnxruntime.so"
    ;;
  cuda)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp \
      -d "$work" "onnxruntime-gpu==1.31.1"
    python3 - "$work"/onnxruntime_gpu-*.whl "$dest/lib" <<'PY'
import os, sys, zipfile
whl, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        base = os.path.basename(n)
        if n.startswith("onnxruntime/capi/") and ".so" in base and "pybind11" not in base:
            with z.open(n) as src, open(os.path.join(out, base), "wb") as dst:
                dst.write(src.read())
PY
    ln -sf libonnxruntime.so.1.31.1 "$dest/lib/libonnxruntime.so"
    ;;
  *) echo "layout-runtime: --variant is cpu or cuda" >&2; exit 2 ;;
esac

"$root/scripts/setup_models.sh" >/dev/null
cp "$root/.ortserve/models/efficientnet_lite0.onnx" "$root/.ortserve/models/imagenet_labels.txt" "$dest/models/"
cp "$root/config/container.yaml" "$dest/config/config.yaml"
cp "$binary" "$dest/ortserve"
echo "layout-runtime: $variant tree in $dest"
