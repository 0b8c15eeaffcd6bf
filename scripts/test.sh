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

# The web console test (server/tests/console.rs) drives Debian's headless
# Chromium with Playwright (playwright-core, pinned in package-lock.json).
# Where they cannot be installed the console test fails, saying why.
if [ ! -x /usr/bin/chromium ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends chromium chromium-driver; } \
    || echo "could not install chromium; the console test will fail"
fi
(cd server/tests/console && npm ci --no-audit --no-fund --loglevel=error) || echo "npm ci failed; the console test will fail"

# The observability test (server/tests/observability.rs) scrapes ouro with a
# real Prometheus (Debian package); it skips, saying so, when there is none.
if [ ! -x /usr/bin/prometheus ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus || echo "could not install prometheus; its test will skip"
fi

cargo build --release --bins
target/release/ouro fetch-model >/dev/null

cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
# The tests' servers and clients write state folders and models under the
# temp dir: give them one of their own, removed when the run ends.
TMPDIR="$(mktemp -d -t ouro-tests.XXXXXX)"
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT
cargo test --release --workspace
