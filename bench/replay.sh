#!/usr/bin/env bash
# Learning-curve benchmark of the online speculator (issue 5).
#
# Four configurations, each on a fresh server and a fresh --state-dir, driven
# by the same stream of requests (`ouro replay`: Python questions, then
# arithmetic word problems, greedy, one at a time, each user pausing
# THINK_MS (default 1000) before the next request: the trainer trains in those
# gaps; decode tokens/s is timed per request and leaves the pauses out):
#   off     no speculation
#   ngram   the n-gram drafter only
#   static  day-0 speculator + n-gram under the policy (auto), trainer off
#   online  the same, with the online trainer on (publishes every $PUBLISH steps)
# On the online server, after the stream, the trainer check: 20+20 requests
# with the trainer paused, then on, twice (serving with the trainer on must
# stay >= 0.85x of paused).
# Then bench/plot_replay.py prints the phase table and draws
# bench/out/replay.png. Usage: bench/replay.sh [PER_DOMAIN] [MAX_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
per_domain=${1:-150}
max_tokens=${2:-64}
publish=${PUBLISH:-20}
think=${THINK_MS:-1000}
port=${PORT:-8392}
key=bench-admin-key
cargo build --release --bins
mkdir -p bench/out
trainer_check() {
  local round st
  for round in 1 2; do
    for st in pause resume; do
      curl -sf -X POST -H "authorization: Bearer $key" "http://127.0.0.1:$port/admin/trainer/$st" >/dev/null
      target/release/ouro replay --url "http://127.0.0.1:$port" --label "trainer-$st" --speculation auto \
        --per-domain 20 --max-tokens "$max_tokens" --think-ms "$think" --admin-key "$key" --out "bench/out/replay-check-$st-$round.csv"
    done
  done
}
run_arm() {
  local label=$1 speculation=$2; shift 2
  local state; state=$(mktemp -d)
  target/release/ouro serve --port "$port" --state-dir "$state" --admin-key "$key" "$@" >"bench/out/replay-$label.log" 2>&1 &
  local pid=$!
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 1; done
  target/release/ouro replay --url "http://127.0.0.1:$port" --label "$label" --speculation "$speculation" \
    --per-domain "$per_domain" --max-tokens "$max_tokens" --think-ms "$think" --admin-key "$key" --out "bench/out/replay-$label.csv"
  curl -sf -H "authorization: Bearer $key" "http://127.0.0.1:$port/admin/trainer" >"bench/out/replay-$label-trainer.json" || true
  if [ "$label" = online ]; then trainer_check; fi
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$state"
}
run_arm off off --trainer off
run_arm ngram ngram --trainer off
run_arm static auto --trainer off
run_arm online auto --trainer on --publish-every "$publish"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check matplotlib==3.10.7
.venv/bin/python bench/plot_replay.py bench/out/replay-{off,ngram,static,online}.csv --png bench/out/replay.png \
  --paused bench/out/replay-check-pause-{1,2}.csv --resumed bench/out/replay-check-resume-{1,2}.csv
