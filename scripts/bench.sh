#!/usr/bin/env bash
# Run the benchmarks (bench/run.py) on a throwaway PostgreSQL and gunicorn, loopback only:
# writes bench/results.json and the table in bench/README.md. About 7 minutes in full.
#   scripts/bench.sh                       everything
#   scripts/bench.sh --only gate,race      a subset (the other sections of results.json stay)
#   scripts/bench.sh --quick               small sizes: checks the scripts work (~1.5 min)
#   scripts/bench.sh --help                every option
# Set TEST_DATABASE_URL to use an existing (throwaway: it is emptied) database instead.
set -euo pipefail
cd "$(dirname "$0")/.."

ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || {
  echo "installing Debian's postgresql"
  sudo_=()
  [ "$(id -u)" = 0 ] || sudo_=(sudo)
  "${sudo_[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq --no-install-recommends postgresql >/dev/null
}

scripts/bootstrap.sh

if [ -z "${TEST_DATABASE_URL:-}" ]; then
  eval "$(scripts/throwaway-postgres.sh)"
  trap '$PG_STOP >/dev/null 2>&1 || true' EXIT
fi

echo "== migrate"
DATABASE_URL="$TEST_DATABASE_URL" SECRET_KEY=bench .venv/bin/flask --app wsgi db upgrade >/dev/null
echo "== benchmarks ($(nproc) cores)"
DATABASE_URL="$TEST_DATABASE_URL" .venv/bin/python -m bench.run "$@"
