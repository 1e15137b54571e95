#!/usr/bin/env bash
# Install keel's `local` extra (llama-cpp-python and the GGUF weights) into .venv, showing progress.
#
# llama.cpp is compiled from source, and never for the build machine's CPU: pip's default build passes
# -march=native, which on a CPU with AMX (Intel Sapphire Rapids and later) turns on ggml's AMX backend, and that
# segfaults on the first decode (llama.cpp issue #20824). keel builds with GGML_NATIVE=OFF and a conservative
# x86-64 baseline (AVX, AVX2, FMA, F16C: every x86-64 CPU since 2013), AVX-512 and AMX off; on other
# architectures, llama.cpp's portable defaults. CMAKE_ARGS, if set, is added after keel's flags, so a user's
# -D wins (cmake keeps the last value).
#
# The wheel is built once into keel's own cache, in a folder named by the llama-cpp-python version and the
# exact flags (~/.cache/keel/llama-wheels/<key>/), so a wheel built with other flags is never picked up.
# Wheels of llama-cpp-python that pip built and cached itself (natively, before this script) are removed from
# pip's cache, saying so. The first build takes about 10-15 minutes on 2 cores; every later install, seconds.
#
#   scripts/install-local.sh                  install (or check) the local extra
#   scripts/install-local.sh --print-flags    print the cmake flags and the wheel key, build nothing
#   scripts/install-local.sh --purge-pip-cache  only drop llama-cpp-python wheels pip built and cached itself
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_VERSION=0.3.36 # keep in step with pyproject.toml's `local` extra
ARCH=${KEEL_BUILD_ARCH:-$(uname -m)}

case "$ARCH" in
  x86_64 | amd64)
    FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=OFF"
    FLAGS+=" -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF"
    FLAGS+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX_VNNI=OFF"
    WHY="x86-64: not for this CPU (GGML_NATIVE=OFF), a baseline every x86-64 CPU since 2013 runs (AVX2, FMA, F16C); no AVX-512, no AMX"
    ;;
  *)
    FLAGS="-DGGML_NATIVE=OFF"
    WHY="$ARCH: not for this CPU (GGML_NATIVE=OFF), llama.cpp's portable defaults for $ARCH"
    ;;
esac
# The llava/mtmd library is for images: keel does not use it, and it is a third of the build.
FLAGS+=" -DLLAVA_BUILD=OFF"
if [ -n "${CMAKE_ARGS:-}" ]; then
  FLAGS+=" $CMAKE_ARGS"
  WHY+="; then CMAKE_ARGS from the environment: $CMAKE_ARGS"
fi
KEY="llama-cpp-python-$LLAMA_VERSION-$ARCH-$(printf '%s' "$FLAGS" | sha256sum | cut -c1-16)"

if [ "${1:-}" = "--print-flags" ]; then
  printf 'CMAKE_ARGS=%s\nKEY=%s\nWHY=%s\n' "$FLAGS" "$KEY" "$WHY"
  exit 0
fi

BIN=.venv/bin
PIP=${KEEL_PIP:-$BIN/pip}
LOG=.venv/install-local.log
MARK=.venv/.llama-cpp-build
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/keel/llama-wheels/$KEY"
EXTRAS='.[dev,postgres,redis,temporal,local]'

# pip keys its cache of built wheels by the source, not by CMAKE_ARGS: a wheel it built natively earlier would
# be installed again silently. keel builds its own, so those are dropped.
purge_pip_cache() {
  if "$PIP" cache list llama_cpp_python 2>/dev/null | grep -q llama_cpp_python; then
    echo "  removing llama-cpp-python wheels that pip built and cached itself (possibly -march=native):"
    "$PIP" cache remove llama_cpp_python 2>&1 | sed 's/^/    /'
  fi
}
if [ "${1:-}" = "--purge-pip-cache" ]; then
  purge_pip_cache
  exit 0
fi

if [ "$(cat "$MARK" 2>/dev/null)" = "$KEY" ] && "$BIN/python" -c 'import llama_cpp' 2>/dev/null; then
  "$BIN/pip" install -q -e "$EXTRAS"
  "$BIN/python" -m keel.orchestration.llm.models.weights --quiet
  exit 0
fi

echo "the embedded model runtime: llama-cpp-python $LLAMA_VERSION, built portably"
echo "  why: $WHY"
echo "  cmake flags: $FLAGS"

purge_pip_cache

start=$(date +%s)
if ! ls "$WHEELS"/llama_cpp_python-*.whl > /dev/null 2>&1; then
  echo "  compiling llama.cpp from source: about 10-15 minutes on 2 cores, once (the wheel is kept in $WHEELS)"
  mkdir -p "$WHEELS.partial"
  CMAKE_ARGS="$FLAGS" FORCE_CMAKE=1 "$BIN/pip" wheel --no-deps --no-cache-dir --progress-bar off \
    --no-binary llama-cpp-python -w "$WHEELS.partial" "llama-cpp-python==$LLAMA_VERSION" > "$LOG" 2>&1 &
  BUILD=$!
  trap 'kill $BUILD 2>/dev/null || true' INT TERM
  while kill -0 "$BUILD" 2>/dev/null; do
    sleep 15
    kill -0 "$BUILD" 2>/dev/null || break
    elapsed=$(($(date +%s) - start))
    last=$(grep -E 'Building wheel|Collecting|Downloading|Created wheel|Building' "$LOG" | tail -1 | cut -c1-90)
    printf '  %dm%02ds elapsed: %s\n' $((elapsed / 60)) $((elapsed % 60)) "${last:-starting}"
  done
  if ! wait "$BUILD"; then
    echo "building llama-cpp-python failed; the last lines of $LOG:" >&2
    tail -30 "$LOG" >&2
    exit 1
  fi
  rm -rf "$WHEELS" && mv "$WHEELS.partial" "$WHEELS"
  elapsed=$(($(date +%s) - start))
  printf '  compiled in %dm%02ds\n' $((elapsed / 60)) $((elapsed % 60))
else
  echo "  using the wheel built earlier with these exact flags: $WHEELS"
fi
"$PIP" install -q --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
"$BIN/pip" install -q -e "$EXTRAS"
printf '%s\n' "$KEY" > "$MARK"
echo "  llama.cpp reports: $("$BIN/python" -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode().strip())')"
"$BIN/python" -m keel.orchestration.llm.models.weights
elapsed=$(($(date +%s) - start))
printf 'embedded model runtime installed in %dm%02ds\n' $((elapsed / 60)) $((elapsed % 60))
