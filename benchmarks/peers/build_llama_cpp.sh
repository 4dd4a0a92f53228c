#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-server` from the llama.cpp copy vendored in the
# llama-cpp-python sdist (PyPI is the only reachable source of llama.cpp here).
# The build takes ~20 minutes on 2 cores, so the build directory is cached and
# the script returns at once when the binary already exists.
#
# Usage: benchmarks/peers/build_llama_cpp.sh   (prints the llama-server path)
# Env:   LOOM_PEERS_DIR (default ~/.cache/loom/peers), LLAMA_CPP_PYTHON_VERSION,
#        PYTHON (a python with pip, default python3), JOBS (default 2)
set -euo pipefail

PEERS_DIR="${LOOM_PEERS_DIR:-$HOME/.cache/loom/peers}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
SRC_DIR="$PEERS_DIR/src"
LLAMA_DIR="$PEERS_DIR/llama.cpp"
BUILD_DIR="$LLAMA_DIR/build"
BIN="$BUILD_DIR/bin/llama-server"

if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$SRC_DIR" "$LLAMA_DIR"
SDIST="$SRC_DIR/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    "$PYTHON" -m pip download --no-binary :all: --no-deps \
        "llama-cpp-python==$VERSION" -d "$SRC_DIR" >&2
fi
if [[ ! -f "$LLAMA_DIR/src/CMakeLists.txt" ]]; then
    rm -rf "$LLAMA_DIR/src"
    tar -xzf "$SDIST" -C "$SRC_DIR"
    cp -r "$SRC_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp" "$LLAMA_DIR/src"
fi

nice -n 10 cmake -S "$LLAMA_DIR/src" -B "$BUILD_DIR" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_CURL=OFF >&2
nice -n 10 cmake --build "$BUILD_DIR" --target llama-server -j "$JOBS" >&2
echo "$BIN"
