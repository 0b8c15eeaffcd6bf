#!/usr/bin/env bash
# Learning-curve benchmark of the online speculator (issue 5).
#
# Four configurations, each on a fresh server and a fresh --state-dir, driven
# by the same stream of requests (`ouro replay`: Python questions, then
# arithmetic word problems, greedy, one at a time):
#   off     no speculation
#   ngram   the n-gram drafter only
#   static  day-0 speculator + n-gram under the policy (auto), trainer off
#   online  the same, with the online trainer on (publishes every $PUBLISH steps)
# Then bench/plot_replay.py prints the phase table and draws
# bench/out/replay.png. Usage: bench/replay.sh [PER_DOMAIN] [MAX_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
per_domain=${1:-150}
max_tokens=${2:-64}
publish=${PUBLISH:-10}
port=${PORT:-8392}
key=bench-admin-key
cargo build --release --bins
mkdir -p bench/out
run_arm() {
  local label=$1 speculation=$2; shift 2
  local state; state=$(mktemp -d)
  target/release/ouro serve --port "$port" --state-dir "$state" --admin-key "$key" "$@" >"bench/out/replay-$label.log" 2>&1 &
  local pid=$!
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 1; done
  target/release/ouro replay --url "http://127.0.0.1:$port" --label "$label" --speculation "$speculation" \
    --per-domain "$per_domain" --max-tokens "$max_tokens" --admin-key "$key" --out "bench/out/replay-$label.csv"
  curl -sf -H "authorization: Bearer $key" "http://127.0.0.1:$port/admin/trainer" >"bench/out/replay-$label-trainer.json" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$state"
}
run_arm off off --trainer off
run_arm ngram ngram --trainer off
run_arm static auto --trainer off
run_arm online auto --trainer on --publish-every "$publish"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check matplotlib==3.10.7
.venv/bin/python bench/plot_replay.py bench/out/replay-{off,ngram,static,online}.csv --png bench/out/replay.png
