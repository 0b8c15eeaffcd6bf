#!/usr/bin/env bash
# Experience-library benchmark: starts a server on the default model with a
# fresh state dir, runs bench/experience_curve.py against it, and leaves
# bench/out/experience.{png,json}. Speculation is off so that sampled
# rollouts and evaluations depend on their seeds alone.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check matplotlib==3.10.7
state=$(mktemp -d)
port=${PORT:-8391}
target/release/ouro serve --port "$port" --state-dir "$state" --trainer off --speculation off >"$state/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$state"' EXIT
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 1; done
.venv/bin/python bench/experience_curve.py --url "http://127.0.0.1:$port" --out bench/out/experience "$@"
