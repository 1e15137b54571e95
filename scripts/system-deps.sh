#!/usr/bin/env bash
# System packages keel uses from Debian: tesseract-ocr (OCR of scanned PDF pages).
# Installs what is missing when it can (root, apt-get); otherwise says what is missing and carries on, and the
# tests that need it are skipped with that reason.
set -uo pipefail
missing=()
command -v tesseract >/dev/null 2>&1 || missing+=(tesseract-ocr)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (apt-get)"
  if apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
    exit 0
  fi
  echo "warning: apt-get could not install ${missing[*]}; OCR is off and its tests will be skipped" >&2
else
  echo "warning: ${missing[*]} missing and this is not a root shell with apt-get;" \
    "install it (sudo apt-get install ${missing[*]}) for OCR of scanned PDFs" >&2
fi
exit 0
