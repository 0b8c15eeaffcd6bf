#!/usr/bin/env bash
# Build llama.cpp's `llama-bench` (CPU-only, Release, -march=native) as a
# reference point for ouro's own throughput numbers.
#
# Why from the llama-cpp-python sdist: it is on PyPI (reachable from this
# sandbox, GitHub is not) and vendors a pinned llama.cpp in vendor/llama.cpp.
# Everything lands in third_party/ (git-ignored). Idempotent: if the binary is
# already built it only prints its path. Prints the binary path on stdout;
# progress goes to stderr.
#
# Usage: bench/build-llama-bench.sh   then   "$(bench/build-llama-bench.sh)" -m MODEL.gguf -t 2 -o json
set -euo pipefail

LCP_VERSION=0.3.36           # llama-cpp-python sdist version (pinned)
LLAMA_COMMIT=0c1e57098       # llama.cpp commit it vendors (from its CHANGELOG); sdist has no .git

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TP="$ROOT/third_party"
SRC="$TP/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
BUILD="$TP/llama.cpp-build"
BIN="$BUILD/bin/llama-bench"

if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$TP"

# 1. Fetch + unpack the sdist. `--no-binary llama-cpp-python` (not :all:) so
#    pip's metadata step may use wheels for build deps; with :all: it compiles
#    CMake itself from source (~tens of minutes).
SDIST="$TP/llama_cpp_python-$LCP_VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
  python3 -m pip download --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LCP_VERSION" -d "$TP" >&2
fi
[[ -f "$SRC/CMakeLists.txt" ]] || tar -xzf "$SDIST" -C "$TP"

# 2. cmake: system one if present, else a pip-installed one in a private venv.
CMAKE="$(command -v cmake || true)"
if [[ -z "$CMAKE" ]]; then
  CMAKE="$TP/cmake-venv/bin/cmake"
  if [[ ! -x "$CMAKE" ]]; then
    python3 -m venv "$TP/cmake-venv" >&2
    "$TP/cmake-venv/bin/pip" install -q cmake >&2
  fi
fi

# 3. Configure (CPU only, static, no curl/ssl/tests/server) and build just llama-bench.
"$CMAKE" -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_VULKAN=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMIT="$LLAMA_COMMIT" >&2
"$CMAKE" --build "$BUILD" --config Release --target llama-bench -j2 >&2

echo "$BIN"
