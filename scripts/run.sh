#!/usr/bin/env bash
# Sets up (ONNX Runtime into .ortserve/) and serves the bundled default config on :8080.
# Usage: scripts/run.sh [CONFIG]   (default config/default.yaml)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
scripts/setup_models.sh
cargo build --release --locked
exec target/release/ortserve serve --config "${1:-config/default.yaml}"
