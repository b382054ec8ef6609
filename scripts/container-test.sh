#!/usr/bin/env bash
# Builds the unchanged Dockerfile (CPU variant) with podman and runs the image the way k8s/base
# runs the pod, then checks it: readiness, the image's own HEALTHCHECK, a prediction on
# chelsea.png (a cat class first), /metrics, and SIGTERM -> exit 0 within the pod's grace period.
# Prints the image size and each step's time.
#
#   scripts/container-test.sh                       # by hand
#   ORTSERVE_CONTAINER_TEST=1 scripts/test.sh       # also at the end of the test command
#
# No image registry is reachable here, so the Dockerfile's base images are made locally:
#   debian:bookworm-slim   a Debian bookworm root from `debootstrap --variant=minbase`
#   rust:1.95-bookworm     that root plus the build packages and this machine's Rust toolchain
# podman runs with `--runtime runc` (crun refuses these hosts' hybrid cgroups), host networking,
# and the file and process limits the hosts allow. The pod's settings it reproduces:
# uid/gid 65532, read-only root, no capabilities, no privilege escalation, a tmpfs at /tmp
# (the emptyDir) and the ConfigMap's YAML (k8s/base/config.yaml) read-only at /etc/ortserve.
# It needs root (apt-get, debootstrap) and tens of minutes: the crate is built inside the image.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=${ORTSERVE_CONTAINER_WORK:-/var/tmp/ortserve-container}
port=8080           # the API
admin=8082          # probes and /metrics (server.admin_addr); the image's HEALTHCHECK probes it
name=ortserve-container-test
grace=$(sed -n 's/^ *terminationGracePeriodSeconds: *\([0-9]*\).*/\1/p' k8s/base/deployment.yaml)
run_opts=(--runtime runc --network=host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

t0=$(date +%s)
step() { printf '[%4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
fail() { step "FAIL: $*"; exit 1; }

step "packages: podman runc debootstrap"
missing=()
for p in podman runc debootstrap; do command -v "$p" >/dev/null || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
fi
podman --version
mkdir -p "$work"

if ! podman image exists debian:bookworm-slim; then
  step "debian:bookworm-slim from debootstrap --variant=minbase bookworm"
  rm -rf "$work/rootfs"
  debootstrap --variant=minbase bookworm "$work/rootfs" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; fail "debootstrap"; }
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar -C "$work/rootfs" -c . | podman import --change 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
  rm -rf "$work/rootfs"
fi

if ! podman image exists rust:1.95-bookworm; then
  sysroot=$(rustc --print sysroot)
  step "rust:1.95-bookworm from debian:bookworm-slim and $(rustc --version)"
  rm -rf "$work/rust" && mkdir -p "$work/rust"
  cp -a "$sysroot" "$work/rust/toolchain"
  # This host reaches the package registries through an egress proxy whose CA certificates are
  # in /usr/local/share/ca-certificates; the build image trusts them as the host does (so cargo
  # and pip in the Dockerfile's build stage can download). An image built behind any such
  # proxy needs the same; the Dockerfile itself is unchanged.
  mkdir -p "$work/rust/ca"
  cp /usr/local/share/ca-certificates/*.crt "$work/rust/ca/" 2>/dev/null || true
  cat >"$work/rust/Containerfile" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev make pkg-config git \
 && rm -rf /var/lib/apt/lists/*
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY toolchain /usr/local/rust
ENV PATH=/usr/local/rust/bin:$PATH CARGO_HOME=/usr/local/cargo
EOF
  podman build "${run_opts[@]}" --pull=never -t rust:1.95-bookworm "$work/rust" >"$work/rust-build.log" 2>&1 \
    || { tail -30 "$work/rust-build.log"; fail "rust image"; }
  rm -rf "$work/rust"
fi

step "podman build the unchanged Dockerfile (CPU variant)"
git diff --quiet HEAD -- Dockerfile || step "note: Dockerfile has uncommitted changes"
podman build "${run_opts[@]}" --pull=never --format docker -t ortserve:cpu -f Dockerfile . >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log"; fail "image build (log: $work/build.log)"; }
size=$(podman image inspect --format '{{.Size}}' ortserve:cpu)
step "image ortserve:cpu: $((size / 1024 / 1024)) MiB"

# A server that was just stopped (the quick start's) may still be draining: wait up to 30 s.
for p in "$port" "$admin"; do
  for _ in $(seq 1 30); do
    grep -q ":$p " <<<"$(ss -ltn)" || break
    sleep 1
  done
  if grep -q ":$p " <<<"$(ss -ltn)"; then grep ":$p " <<<"$(ss -ltnp)" >&2 || true; fail "port $p is taken on this host"; fi
done
podman rm -f "$name" >/dev/null 2>&1 || true
mkdir -p "$work/etc"
cp k8s/base/config.yaml "$work/etc/config.yaml"
step "run as the pod runs: uid 65532, read-only root, no capabilities, tmpfs /tmp, ConfigMap read-only"
podman run -d --name "$name" "${run_opts[@]}" \
  --user 65532:65532 --read-only --cap-drop=ALL --security-opt no-new-privileges \
  --tmpfs /tmp:rw,size=256m,mode=1777 \
  -v "$work/etc:/etc/ortserve:ro" \
  ortserve:cpu serve --config /etc/ortserve/config.yaml >/dev/null
started=$(date +%s)
ready=""
for _ in $(seq 1 300); do   # the startupProbe allows 5 minutes
  if [ "$(podman inspect --format '{{.State.Running}}' "$name")" != true ]; then
    podman logs "$name" 2>&1 | tail -20
    fail "the container exited"
  fi
  # As the pod's startupProbe asks: readiness on the admin port.
  if curl -fsS -o /dev/null "http://127.0.0.1:$admin/v2/health/ready" 2>/dev/null; then ready=1; break; fi
  sleep 1
done
[ -n "$ready" ] || { podman logs "$name" 2>&1 | tail -20; fail "not ready within 300 s"; }
step "ready after $(( $(date +%s) - started )) s"

podman healthcheck run "$name" || fail "the image's HEALTHCHECK failed"
step "HEALTHCHECK (the binary's own probe): healthy"

reply=$(curl -fsS -F image=@.ortserve/data/chelsea.png \
  "http://127.0.0.1:$port/v1/models/efficientnet_lite0:predict")
top=$(python3 -c 'import json,sys; c=json.loads(sys.argv[1])["predictions"][0]["classes"][0]; print(c["index"], c["label"], round(c["score"], 3))' "$reply")
step "chelsea.png: top class $top"
case "$top" in 28[1-7]\ *) ;; *) fail "expected a cat class (281-287) first" ;; esac

metrics=$(curl -fsS "http://127.0.0.1:$admin/metrics")   # where Prometheus scrapes
grep -q '^ortserve_requests_total{' <<<"$metrics" || fail "/metrics has no ortserve_requests_total"
step "/metrics: $(grep -c '^ortserve_' <<<"$metrics") ortserve_ series lines"

step "SIGTERM (podman stop, killed after the pod's grace period of ${grace} s)"
stop0=$(date +%s)
podman stop -t "$grace" "$name" >/dev/null
took=$(( $(date +%s) - stop0 ))
code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
podman logs "$name" 2>&1 | tail -3
podman rm "$name" >/dev/null
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
[ "$took" -lt "$grace" ] || fail "took ${took} s, the grace period is ${grace} s"
step "exit 0 after ${took} s"
step "PASS"
