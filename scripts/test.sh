#!/usr/bin/env bash
# Install everything the suite needs, start a throwaway PostgreSQL, run the whole suite on it,
# then the gate tests again on SQLite. Runs as root in CI (PostgreSQL then runs as `postgres`).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  sudo_=()
  [ "$(id -u)" = 0 ] || sudo_=(sudo)
  "${sudo_[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

scripts/bootstrap.sh

if [ -z "${TEST_DATABASE_URL:-}" ]; then
  eval "$(scripts/throwaway-postgres.sh)"
  trap '$PG_STOP >/dev/null 2>&1 || true' EXIT
fi

echo "== lint"
.venv/bin/ruff check .
echo "== security lint and dependency audit"
scripts/audit.sh
echo "== suite on PostgreSQL"
.venv/bin/pytest "$@"
echo "== gate tests on SQLite"
COUNTERSIGN_TEST_ENGINE=sqlite .venv/bin/pytest -m "gate and not postgres_only" "$@"
