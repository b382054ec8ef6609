#!/usr/bin/env bash
# Packs ONNX Runtime's GPU libraries for a GPU host that is reached by copying files of limited
# size (docs/GPU.md). Fetches the `onnxruntime-gpu` wheel with pip, keeps the shared libraries of
# its `onnxruntime/capi/` folder (the runtime, the provider bridge and the CUDA provider, about
# 300 MB; not the Python extension), compresses them into one tar.xz and cuts it into parts.
#
# Usage: scripts/pack-gpu-libs.sh [OUT_DIR] [PART_SIZE]
#   OUT_DIR    where the parts go (default .gpu-carry, git-ignored); old parts there are removed
#   PART_SIZE  largest part, as split(1) takes it (default 50M)
#   ORT_GPU_VERSION  the wheel's version (default 1.31.1)
# On the GPU host: cat OUT_DIR/part-* > capi.tar.xz, compare its sha256 with the one printed
# here, then tar -xJf capi.tar.xz, which gives capi/ for scripts/gpu-check.sh --ort-lib capi.
set -euo pipefail
out=${1:-.gpu-carry}
part_size=${2:-50M}
version=${ORT_GPU_VERSION:-1.31.1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp/wheel" \
  "onnxruntime-gpu==$version"
wheel=$(ls "$tmp"/wheel/onnxruntime_gpu-*.whl)
mkdir -p "$tmp/capi"
# A wheel is a zip archive: take only the libraries.
python3 - "$wheel" "$tmp/capi" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/") and ".so" in base and not base.startswith("onnxruntime_pybind11_state"):
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as dst:
                dst.write(src.read())
PY
ls "$tmp/capi"/libonnxruntime_providers_cuda.so >/dev/null
tar -C "$tmp" -cf - capi | xz -T0 -6 >"$tmp/capi.tar.xz"
mkdir -p "$out"
rm -f "$out"/part-*
split --bytes="$part_size" --numeric-suffixes "$tmp/capi.tar.xz" "$out/part-"
echo "pack-gpu-libs: onnxruntime-gpu $version, $(ls "$tmp/capi" | wc -l) libraries"
echo "pack-gpu-libs: sha256 of capi.tar.xz: $(sha256sum "$tmp/capi.tar.xz" | cut -d' ' -f1)"
ls -l "$out"
