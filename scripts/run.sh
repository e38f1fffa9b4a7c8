#!/usr/bin/env bash
# Install, migrate, seed the demo and serve http://127.0.0.1:5000 (SQLite by default).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
mkdir -p instance
# A stable key so dashboard sessions survive restarts of the demo.
[ -s instance/secret_key ] || .venv/bin/python -c 'import secrets; print(secrets.token_hex(32))' >instance/secret_key
export SECRET_KEY="${SECRET_KEY:-$(cat instance/secret_key)}"
export FLASK_APP=wsgi
.venv/bin/flask db upgrade
.venv/bin/flask seed-demo
# The worker expires stale requests beside the web server (see README for production).
.venv/bin/flask worker &
worker=$!
trap 'kill $worker 2>/dev/null' EXIT
echo
echo "Dashboard: http://127.0.0.1:5000/  (Ctrl-C to stop)"
# One process with threads: SQLite wants a single writer process; websockets want threads.
.venv/bin/gunicorn --bind 127.0.0.1:5000 --workers 1 --threads 32 --worker-class gthread \
  --timeout 0 --access-logfile - wsgi:app
