#!/usr/bin/env bash
# Create .venv and install the pinned requirements (skipped when they are already in place).
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # (this machine's pip config names local mirrors that may be absent: hide that noise)
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import flask, flask_sock, pydantic, psycopg" # fail loudly if pip failed
  echo "$want" >"$stamp"
fi
