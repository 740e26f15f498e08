#!/usr/bin/env bash
# Set up a fresh virtual environment and run the main job on its default (README command 1).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${METAVERIFY_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt -e .
exec "$VENV/bin/metaverify" check "$@"
