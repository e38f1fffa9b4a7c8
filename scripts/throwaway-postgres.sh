#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster in a temp dir and print `export ...` lines for it.
# Usage: eval "$(scripts/throwaway-postgres.sh)"; ...; "$PG_STOP"
# PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user.
set -euo pipefail

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$pgbin" ] || { echo "PostgreSQL server binaries not found" >&2; exit 1; }

dir=$(mktemp -d /tmp/countersign-pg.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_owner=()
if [ "$(id -u)" = 0 ]; then
  chown postgres:postgres "$dir"
  as_owner=(runuser -u postgres --)
fi
"${as_owner[@]}" "$pgbin/initdb" -D "$dir/data" -U postgres -A trust --no-sync >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
"${as_owner[@]}" "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=400 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
  >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
"$pgbin/psql" -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE DATABASE countersign_test" >/dev/null

echo "export TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:$port/countersign_test"
echo "export PG_ADMIN_URL=postgresql://postgres@127.0.0.1:$port/postgres"
echo "export PG_DATA_DIR=$dir/data"
echo "export PG_BIN=$pgbin"
echo "export PG_STOP='${as_owner[*]} $pgbin/pg_ctl -D $dir/data -m immediate stop'"
# For fault-injection tests: `$PG_CTL restart -m fast -w` (same options as the first start).
echo "export PG_CTL='${as_owner[*]} $pgbin/pg_ctl -D $dir/data -l $dir/server.log'"
