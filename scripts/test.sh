#!/usr/bin/env bash
# Sets up (ONNX Runtime into .ortserve/) and runs every test. CI runs this (.ci/run).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
scripts/setup_models.sh
scripts/setup_tools.sh

# Layering is the crates' (docs/ARCHITECTURE.md, "Rules"): ortserve-core cannot name axum,
# hyper, tower-http or tonic because it does not depend on them, and the compiler enforces it.
# That no dependency brings them in is checked on the resolved graph; inside the core, only
# device/ names `ort`.
core_http=$(cargo tree --locked -p ortserve-core -e normal --prefix none | sed 's/ .*//' | sort -u \
  | grep -xE 'axum|hyper|hyper-util|tower|tower-http|tonic|h2' || true)
if [ -n "$core_http" ]; then
  echo "layering: ortserve-core depends on $core_http" >&2
  exit 1
fi
stray_ort=$(grep -rlE '(^|[^A-Za-z0-9_])ort::|^\s*use ort(::|;)' crates src | grep -v '^crates/core/src/device/' || true)
if [ -n "$stray_ort" ]; then
  echo "layering: ort outside crates/core/src/device/: $stray_ort" >&2
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
# asked (CI asks: .ci/run), as it is too slow for every local run; its runs are recorded in
# docs/BENCHMARKS.md ("Container image runs").
if [ "${ORTSERVE_CONTAINER_TEST:-}" = 1 ]; then
  scripts/container-test.sh
fi
