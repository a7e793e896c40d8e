#!/usr/bin/env bash
# Make sure a PostgreSQL server is reachable for the test suite, and write its
# admin URL to .tmp/test-database-url.
#
# Order: $TEST_DATABASE_URL / $DATABASE_URL if it answers; else 127.0.0.1:5432;
# else start the machine's installed cluster; else initdb a throwaway cluster
# from the installed binaries (as the postgres user when running as root).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tmp
PY=${PY:-.venv/bin/python}

answers() {
  "$PY" - "$1" <<'PYEOF' >/dev/null 2>&1
import sys
from sqlalchemy import create_engine, text
url = sys.argv[1].replace("postgresql://", "postgresql+psycopg2://", 1)
with create_engine(url, connect_args={"connect_timeout": 3}).connect() as c:
    c.execute(text("select 1"))
PYEOF
}

found() { echo "$1" > .tmp/test-database-url; echo "PostgreSQL: $1"; exit 0; }

for candidate in "${TEST_DATABASE_URL:-}" "${DATABASE_URL:-}"; do
  if [ -n "$candidate" ] && [[ "$candidate" == postgres* ]] && answers "$candidate"; then found "$candidate"; fi
done
DEFAULT="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
answers "$DEFAULT" && found "$DEFAULT"

# The machine's own cluster, if it is installed but stopped.
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  for v in $(ls /etc/postgresql); do
    pg_ctlcluster --skip-systemctl-redirect "$v" main start >/dev/null 2>&1 || true
  done
  for _ in $(seq 1 20); do answers "$DEFAULT" && found "$DEFAULT"; sleep 0.5; done
fi

# A throwaway cluster from the installed binaries.
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$BIN" ] && command -v initdb >/dev/null 2>&1; then BIN=$(dirname "$(command -v initdb)"); fi
if [ -z "$BIN" ]; then
  echo "No PostgreSQL server reachable and no PostgreSQL binaries installed (apt-get install postgresql)." >&2
  exit 1
fi
PORT=5432
if (echo > /dev/tcp/127.0.0.1/5432) 2>/dev/null; then PORT=55432; fi
DATA=${TMPDIR:-/tmp}/orchestrator-pg-$PORT
run() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ ! -f "$DATA/PG_VERSION" ]; then
  mkdir -p "$DATA"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$DATA"
  run "$BIN/initdb" -D "$DATA" -U postgres --auth=trust >/dev/null
fi
run "$BIN/pg_ctl" -D "$DATA" -o "-p $PORT -k /tmp -c listen_addresses=127.0.0.1 -c fsync=on" -l "$DATA/server.log" -w start >/dev/null
URL="postgresql+psycopg2://postgres@127.0.0.1:$PORT/postgres"
for _ in $(seq 1 20); do answers "$URL" && found "$URL"; sleep 0.5; done
echo "Started a PostgreSQL cluster in $DATA but it does not answer; see $DATA/server.log" >&2
exit 1
