#!/usr/bin/env bash
# Runs README.md's quick start as written: the shell block (serve on loopback, wait for
# readiness, two requests) and the Python block (tritonclient), and checks what they print.
# Called by scripts/test.sh after the tests; needs ports 8080, 8081 and 8082 free on 127.0.0.1.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
block() { awk -v tag="$1" '$0 == "<!-- quickstart:" tag " -->" {on=1; next}
  $0 == "<!-- /quickstart:" tag " -->" {on=0} on && !/^```/' README.md; }
sh_block=$(block sh)
py_block=$(block py)
[ -n "$sh_block" ] && [ -n "$py_block" ] || { echo "quickstart: README.md has no quick start blocks" >&2; exit 1; }
for port in 8080 8081 8082; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "quickstart: port $port is in use; the quick start needs it" >&2
    exit 1
  fi
done
work=$(mktemp -d)
# The block runs in a session of its own, so the server it starts in the background is stopped
# with it.
setsid bash -euo pipefail -c "$sh_block" >"$work/out" 2>"$work/err" &
block_pid=$!
# The server drains before it exits (about a second); the stop waits for its whole session to be
# gone, so whatever runs next (the container test) finds ports 8080-8082 free.
stop() {
  kill -TERM -- "-$block_pid" 2>/dev/null || true
  # Processes of the session still alive (a zombie waiting to be reaped does not count).
  alive() { ps -o stat= -s "$block_pid" 2>/dev/null | grep -cv '^Z' || true; }
  for _ in $(seq 1 300); do
    [ "$(alive)" -gt 0 ] || break
    sleep 0.1
  done
  if [ "$(alive)" -gt 0 ]; then
    kill -KILL -- "-$block_pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -rf "$work"
}
trap stop EXIT
# The first run builds the release binary; the server then probes each model before it is ready.
for _ in $(seq 1 1800); do
  if ! kill -0 "$block_pid" 2>/dev/null; then break; fi
  sleep 1
done
if kill -0 "$block_pid" 2>/dev/null; then
  echo "quickstart: the shell block did not finish within 30 minutes" >&2
  tail -20 "$work/err" >&2
  exit 1
fi
wait "$block_pid" || { echo "quickstart: the shell block failed" >&2; tail -20 "$work/err" >&2; exit 1; }
out=$(cat "$work/out")
grep -q '"name":"logits"' <<<"$out" || { echo "quickstart: no logits in: $out" >&2; exit 1; }
grep -qi 'cat' <<<"$out" || { echo "quickstart: no cat class for chelsea.png in: $out" >&2; exit 1; }
py=$("$root/.ortserve/venv/bin/python" -c "$py_block")
grep -qE '^\[\[ *-?[0-9.e+-]+ +-?[0-9.e+-]+ +-?[0-9.e+-]+ *\]\]$' <<<"$py" \
  || { echo "quickstart: the Python block printed: $py" >&2; exit 1; }
echo "quickstart: README.md's quick start ran as written (mlp logits, a cat for chelsea.png, tritonclient $py)"
