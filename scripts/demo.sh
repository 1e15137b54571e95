#!/usr/bin/env bash
# make demo: start a keel server on a private data dir, submit a task through the HTTP API with
# `keel submit` (live progress bar, then the envelope), and stop the server cleanly.
# Until the flagship workflow lands (issue 7) it runs the built-in `diagnostic` workflow (durable steps, no model),
# then `ask`: one question to the embedded local model (llama.cpp on a GGUF from PyPI), tokens streaming,
# then a write tool (send_email) that waits for a person's approval before it runs, exactly once, then memory:
# two generated contracts and an encrypted one ingested (the encrypted one skipped with its reason), and a search
# with scores and a confidence level.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=${KEEL_DEMO_DIR:-.keel/demo}
PORT=${KEEL_DEMO_PORT:-8765}
mkdir -p "$DATA"
export KEEL_DATA_DIR="$DATA"

if [ ! -s "$DATA/demo-v2.key" ]; then
  "$BIN/keel" keys create --tenant demo --scopes tasks:read,tasks:write,tasks:approve,tools:email > "$DATA/demo-v2.key"
fi
KEY=$(cat "$DATA/demo-v2.key")

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

echo
echo "A write tool waits for a person: send_email, submitted with --approve-every-write (exit 3 = waiting)"
URL="http://127.0.0.1:$PORT"
EMAIL='{"tool": "send_email", "args": {"to": ["ops@example.com"], "subject": "keel demo", "body": "Approved by a person."}}'
set +e
"$BIN/keel" submit tool_call --url "$URL" --api-key "$KEY" --input "$EMAIL" --tool send_email --approve-every-write \
  > "$DATA/waiting.json"
CODE=$?
set -e
[ "$CODE" -eq 3 ] || { echo "expected the task to wait for approval (exit 3), got $CODE"; exit 1; }
read -r TASK CALL < <(curl -fs -H "Authorization: Bearer $KEY" "$URL/v1/tasks?status=waiting_for_approval&limit=1" |
  "$BIN/python" -c 'import json,sys; t=json.load(sys.stdin)["items"][0]; print(t["id"], t["envelope"]["result"]["pending_decisions"][0]["call_id"])')
echo "approving $CALL of $TASK"
"$BIN/keel" tasks approve "$TASK" "$CALL" --url "$URL" --api-key "$KEY" --note "demo" > "$DATA/approved.json"
"$BIN/python" -c 'import json,sys; e=json.load(open(sys.argv[1])); print("email:", e["status"], e["result"]["result"])' \
  "$DATA/approved.json"
echo "(queued once in keel's outbox under its idempotency key; set KEEL_SMTP_URL to deliver it)"

echo
echo "Memory: ingest generated PDFs (parsed in a sandboxed child process, embedded with MiniLM on numpy)"
mkdir -p "$DATA/docs"
"$BIN/python" - "$DATA/docs" <<'PY'
import sys
from pathlib import Path

from keel.testing.pdfs import make_pdf

out = Path(sys.argv[1])
(out / "vendor-a.pdf").write_bytes(make_pdf([
    "MASTER SERVICES AGREEMENT - VENDOR A\n1. Payment. Customer pays each invoice within 30 days of receipt.\n"
    "2. Liability. Vendor A's liability is capped at the fees paid in the prior 12 months.",
]))
(out / "vendor-b.pdf").write_bytes(make_pdf([
    "SUPPLY AGREEMENT - VENDOR B\n1. Payment. Invoices are payable within 60 days; late payments accrue 2% a "
    "month.\n2. Liability. Vendor B's liability is unlimited for data breaches.",
]))
(out / "pricing-locked.pdf").write_bytes(make_pdf(["Confidential pricing schedule."], password="demo-secret"))
PY
set +e
"$BIN/keel" documents add "$DATA/docs/vendor-a.pdf" "$DATA/docs/vendor-b.pdf" "$DATA/docs/pricing-locked.pdf" \
  --url "$URL" --api-key "$KEY" > /dev/null
CODE=$?
set -e
[ "$CODE" -eq 1 ] || { echo "expected the encrypted PDF to be skipped (exit 1), got $CODE"; exit 1; }
"$BIN/keel" memory search "How long does the customer have to pay an invoice?" --k 2 --url "$URL" --api-key "$KEY" \
  > "$DATA/search.json"
"$BIN/python" - "$DATA/search.json" <<'PY'
import json
import sys

found = json.load(open(sys.argv[1]))
print(f"search: confidence {found['confidence']} ({found['level']})")
for hit in found["hits"]:
    print(f"  {hit['score']:.2f}  page {hit['page']}  {hit['text'][:90]!r}")
PY
