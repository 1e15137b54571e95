#!/usr/bin/env bash
# A Redis server for development and tests: Debian's redis-server on 127.0.0.1, its files under one directory.
#
#   scripts/redis.sh start   start it (installs redis-server with apt-get when missing and root); prints its URL.
#                            Already running: prints the URL and does nothing else.
#   scripts/redis.sh url     print its URL (redis://127.0.0.1:PORT/0); exit 1 when it is not running
#   scripts/redis.sh stop    shut it down cleanly and wait for it to exit
#
# KEEL_REDIS_DIR   its directory (default .keel/services/redis at the repo root): pid, port, log
# KEEL_REDIS_PORT  the port (default: the one it had last time in this directory, else a free one)
# Nothing is persisted (--save "", no AOF): it holds session memory and wake-ups for development only.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${KEEL_REDIS_DIR:-$root/.keel/services/redis}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
pidfile="$dir/redis.pid"
portfile="$dir/port"

url_of() { echo "redis://127.0.0.1:$1/0"; }

alive() {
  # kill -0 also succeeds on a zombie: an exited daemon stays one until something reaps it.
  kill -0 "$1" 2>/dev/null || return 1
  local state
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
  [ "$state" != Z ]
}

running_pid() {
  # The pid of our server when it is alive, else nothing.
  [ -f "$pidfile" ] || return 1
  local pid
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [ -n "$pid" ] && alive "$pid" || return 1
  echo "$pid"
}

ping() { redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null | grep -q PONG; }

free_port() {
  local py
  py="$(command -v python3 || command -v python || true)"
  if [ -n "$py" ]; then
    "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    return
  fi
  local port
  for port in $(seq 16379 16479); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
  echo "no free port in 16379-16479" >&2
  return 1
}

ensure_installed() {
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is not installed and this is not a root shell with apt-get:" \
      "install it with 'sudo apt-get install redis-server' (or set KEEL_TEST_REDIS_URL to a server of yours)" >&2
    exit 1
  fi
  echo "installing redis-server (apt-get)" >&2
  if ! { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }; then
    echo "apt-get could not install redis-server" >&2
    exit 1
  fi
}

start() {
  if running_pid >/dev/null && ping "$(cat "$portfile")"; then
    url_of "$(cat "$portfile")"
    return
  fi
  ensure_installed
  local port="${KEEL_REDIS_PORT:-}"
  if [ -z "$port" ] && [ -f "$portfile" ]; then
    port="$(cat "$portfile")"
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && port=""  # taken by someone else since: pick another
  fi
  [ -n "$port" ] || port="$(free_port)"
  echo "$port" >"$portfile"
  rm -f "$pidfile"
  redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes --daemonize yes \
    --dir "$dir" --pidfile "$pidfile" --logfile "$dir/redis.log" --save "" --appendonly no
  for _ in $(seq 100); do
    if ping "$port"; then
      url_of "$port"
      return
    fi
    sleep 0.05
  done
  echo "redis-server did not answer on 127.0.0.1:$port within 5 s; see $dir/redis.log:" >&2
  tail -n 20 "$dir/redis.log" >&2 || true
  exit 1
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then
    echo "redis is not running (in $dir)"
    rm -f "$pidfile"
    return
  fi
  redis-cli -h 127.0.0.1 -p "$(cat "$portfile")" shutdown nosave >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    alive "$pid" || { rm -f "$pidfile"; echo "redis stopped"; return; }
    sleep 0.05
  done
  echo "redis (pid $pid) did not exit within 5 s of shutdown; sending SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  url)
    if running_pid >/dev/null && [ -f "$portfile" ]; then
      url_of "$(cat "$portfile")"
    else
      echo "redis is not running (in $dir): scripts/redis.sh start" >&2
      exit 1
    fi
    ;;
  *)
    echo "usage: $0 start|stop|url" >&2
    exit 2
    ;;
esac
