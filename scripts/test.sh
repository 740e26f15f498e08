#!/usr/bin/env bash
# Set up a fresh virtual environment and run the whole test suite (README command 2).
#   bash scripts/test.sh            # CI profile: bounded, derandomised, ~minutes
#   HYPOTHESIS_PROFILE=thorough bash scripts/test.sh -m "slow or not slow"   # long run
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${METAVERIFY_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt -e .
bash scripts/install-browser.sh || echo "note: headless Chromium unavailable; browser tests will skip with the reason"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec "$VENV/bin/python" -m pytest -q -n 2 -p no:cacheprovider "$@"
