#!/usr/bin/env bash
# Sets up (ONNX Runtime into .ortserve/) and runs every test. CI runs this (.ci/run).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
scripts/setup_models.sh
scripts/setup_tools.sh

# Layering (docs/ARCHITECTURE.md, "Rules"): only src/device/ touches ort, only src/http/ touches
# axum/tower-http, and src/http/ reaches the core only through the app façade (never dispatch,
# device or tuning).
stray_ort=$(grep -rlE '(^|[^A-Za-z0-9_])ort::|^\s*use ort(::|;)' src | grep -v '^src/device/' || true)
stray_axum=$(grep -rlE '(^|[^A-Za-z0-9_])(axum|tower_http)::' src | grep -v '^src/http/' || true)
http_core=$(grep -rnE '(^|[^A-Za-z0-9_])(dispatch|device|tuning)::' src/http || true)
if [ -n "$stray_ort$stray_axum$http_core" ]; then
  echo "layering: ort outside src/device/: ${stray_ort:-none}" >&2
  echo "layering: axum outside src/http/: ${stray_axum:-none}" >&2
  echo "layering: src/http/ naming dispatch, device or tuning: ${http_core:-none}" >&2
  exit 1
fi

# House style (docs/ARCHITECTURE.md, "Rules"): formatted, and clippy-clean with warnings as errors (dead code and
# unreachable `pub` items included).
cargo fmt --all --check
# A one-shot CI build has no use for incremental caches (they doubled the target folder's size).
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi
cargo clippy --locked --workspace --all-targets -- -D warnings

cargo test --locked --workspace --all-targets

# README.md's quick start, run as written (a release build, the bundled config on loopback).
scripts/quickstart.sh

# The container image, built and run for real (podman; tens of minutes, needs root): only when
# asked, as its output belongs in docs/DEPLOY.md rather than in every run.
if [ "${ORTSERVE_CONTAINER_TEST:-}" = 1 ]; then
  scripts/container-test.sh
fi
