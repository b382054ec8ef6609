#!/usr/bin/env bash
# Sets up (ONNX Runtime into .ortserve/) and runs every test. CI runs this (.ci/run).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
scripts/setup_models.sh
scripts/setup_tools.sh

# Layering (DESIGN.md section 2): only src/device/ touches ort, only src/http/ touches axum/tower-http.
stray_ort=$(grep -rlE '(^|[^A-Za-z0-9_])ort::|^\s*use ort(::|;)' src | grep -v '^src/device/' || true)
stray_axum=$(grep -rlE '(^|[^A-Za-z0-9_])(axum|tower_http)::' src | grep -vE '^src/(http/|main\.rs|lib\.rs)' || true)
if [ -n "$stray_ort$stray_axum" ]; then
  echo "layering: ort outside src/device/: ${stray_ort:-none}; axum outside src/http/: ${stray_axum:-none}" >&2
  exit 1
fi

cargo test --locked --all-targets
