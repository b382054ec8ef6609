#!/usr/bin/env bash
# Installs what ortserve needs at run time into .ortserve/ (git-ignored):
#   .ortserve/lib/libonnxruntime.so.1.32.0  from the PyPI wheel onnxruntime==1.32.0, sha256-pinned.
# Only `pip download` is used to fetch; nothing else is downloaded. Safe to rerun: a verified
# library already in place is kept.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ORT_VERSION=1.32.0
# sha256 of libonnxruntime.so.1.32.0 inside onnxruntime-1.32.0 (manylinux_2_28_x86_64, cp311).
ORT_SHA256=6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f
lib_dir="$root/.ortserve/lib"
lib="$lib_dir/libonnxruntime.so.$ORT_VERSION"

verify() { [ -f "$lib" ] && echo "$ORT_SHA256  $lib" | sha256sum --check --status; }

if verify; then
  echo "setup: $lib present and verified"
  exit 0
fi

case "$(uname -m)" in
  x86_64) platform=manylinux_2_28_x86_64 ;;
  *) echo "setup: only x86_64 Linux has a pinned ONNX Runtime here; set ORT_DYLIB_PATH to your own libonnxruntime.so" >&2; exit 1 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "setup: fetching onnxruntime==$ORT_VERSION with pip download"
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --platform "$platform" --python-version 3.11 --implementation cp \
  -d "$work" "onnxruntime==$ORT_VERSION"
whl=$(ls "$work"/onnxruntime-"$ORT_VERSION"-*.whl)
mkdir -p "$lib_dir"
python3 - "$whl" "$lib_dir" "$ORT_VERSION" <<'PY'
import sys, zipfile, os
whl, out, ver = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for name in (f"onnxruntime/capi/libonnxruntime.so.{ver}", "onnxruntime/capi/libonnxruntime_providers_shared.so"):
        with z.open(name) as src, open(os.path.join(out, os.path.basename(name)), "wb") as dst:
            dst.write(src.read())
PY
if ! verify; then
  echo "setup: sha256 of $lib does not match the pinned $ORT_SHA256; refusing to use it" >&2
  rm -f "$lib"
  exit 1
fi
ln -sf "libonnxruntime.so.$ORT_VERSION" "$lib_dir/libonnxruntime.so"
echo "setup: installed $lib"
