#!/usr/bin/env bash
# make demo: start a keel server on a private data dir, submit a task through the HTTP API with
# `keel submit` (live progress bar, then the envelope), and stop the server cleanly.
# Until the flagship workflow lands (issue 7) it runs the built-in `diagnostic` workflow (durable steps, no model),
# then `ask`: one question to the embedded local model (llama.cpp on a GGUF from PyPI), tokens streaming.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=${KEEL_DEMO_DIR:-.keel/demo}
PORT=${KEEL_DEMO_PORT:-8765}
mkdir -p "$DATA"
export KEEL_DATA_DIR="$DATA"

if [ ! -s "$DATA/demo.key" ]; then
  "$BIN/keel" keys create --tenant demo --scopes tasks:read,tasks:write > "$DATA/demo.key"
fi
KEY=$(cat "$DATA/demo.key")

"$BIN/keel" serve --port "$PORT" --log-level warning > "$DATA/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$PORT/readyz" > /dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { echo "keel serve failed to start:"; cat "$DATA/server.log"; exit 1; }
  sleep 0.1
done

echo "keel is serving on http://127.0.0.1:$PORT (data in $DATA)"
"$BIN/keel" submit diagnostic --url "http://127.0.0.1:$PORT" --api-key "$KEY" \
  --input '{"steps": 5, "step_seconds": 0.4}'

"$BIN/keel" submit ask --url "http://127.0.0.1:$PORT" --api-key "$KEY" \
  --input '{"question": "In two sentences: what is the main risk of relying on a single supplier?", "max_tokens": 120}'
