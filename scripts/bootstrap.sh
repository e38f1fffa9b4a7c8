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
  log=$(mktemp)
  if ! .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt >"$log" 2>&1; then
    # (hide the noise of local package mirrors this machine's pip config names but lacks)
    grep -v "^WARNING: Location" "$log" >&2
    exit 1
  fi
  rm -f "$log"
  echo "$want" >"$stamp"
fi
