#!/usr/bin/env bash
# Runs ouro's whole test suite on a fresh machine (this is what CI runs).
#
# Installs what the tests need (a Python venv with the official `openai`
# client and pytest, the default model), checks formatting and lints, then
# runs every test of the workspace in release mode (the tests drive the real
# model; unoptimized builds would be far too slow).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r server/tests/python/requirements.txt

cargo build --release --bins
target/release/ouro fetch-model >/dev/null

cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release --workspace
