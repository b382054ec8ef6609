#!/usr/bin/env bash
# Time to ready of config/default.yaml, probing every device at start against reading shared
# tuning results (tuning.results_file), as a new pod in a scale-up would.
#
#   scripts/time_to_ready.sh [target/release/ortserve]
#
# It runs `ortserve tune --json` once to make the results file, then starts the server twice,
# each time with an empty tuning cache of its own: once probing, once with the results file.
# It prints the seconds from start to /v2/health/ready 200, and each device's tuning source.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=${1:-target/release/ortserve}
port=${ORTSERVE_TTR_PORT:-18211}
work=$(mktemp -d)
cfg=config/.time-to-ready.yaml   # beside default.yaml, so its relative paths still resolve
trap 'rm -rf "$work" "$cfg"' EXIT

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
t0=$(date +%s%N)
"$bin" tune --config config/default.yaml --json "$work/results.json" --plot "$work/tuning.svg" >/dev/null
printf 'tune --json: %s ms, %s results\n' "$(ms_since "$t0")" \
  "$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$work/results.json")"

for mode in probe shared; do
  cache=$(mktemp -d -p "$work")
  extra="cache_dir: $cache"
  [ "$mode" = shared ] && extra="$extra, results_file: $work/results.json"
  sed "s|tuning: {|tuning: {$extra, |" config/default.yaml >"$cfg"
  t0=$(date +%s%N)
  ORTSERVE_HTTP_ADDR="127.0.0.1:$port" "$bin" serve --config "$cfg" 2>"$work/$mode.log" &
  pid=$!
  until curl -fsS -o /dev/null "http://127.0.0.1:$port/v2/health/ready" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { tail -5 "$work/$mode.log"; exit 1; }
    sleep 0.05
  done
  ready=$(ms_since "$t0")
  sources=$(for m in efficientnet_lite0 mlp cnn; do
    curl -fsS "http://127.0.0.1:$port/v1/models/$m/tuning" |
      python3 -c 'import json,sys; d=json.load(sys.stdin); print(" ".join(sys.argv[1] + "/" + x["device"] + "=" + x["source"] for x in d["devices"]))' "$m"
  done | tr '\n' ' ')
  kill -TERM "$pid"
  wait "$pid" || true
  printf '%-6s ready after %s ms  (%s)\n' "$mode" "$ready" "$sources"
done
