#!/usr/bin/env bash
# Makes the project-local virtualenv (.venv) with the Python test tools pinned in
# charts/tests/requirements.txt (real Helm as a library, pytest) and prints its directory.
# Reinstalls only when the requirements change.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp="$venv/.requirements.sha256"
want=$(sha256sum charts/tests/requirements.txt | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r charts/tests/requirements.txt >&2
  echo "$want" >"$stamp"
fi
echo "$PWD/$venv"
