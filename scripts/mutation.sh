#!/usr/bin/env bash
# Mutation testing of reference/ and the engine (issue 19); method and tool choice in scripts/mutation.py.
#   bash scripts/mutation.sh coverage [-n 2]                         # once: per-test coverage map (.mutation/)
#   bash scripts/mutation.sh [PATHS ...] [--shard I/N] [--budget S] [--max N]  # run (resumes), then the report
#   bash scripts/mutation.sh report                                  # report only
#   bash scripts/mutation.sh list [PATHS ...]                        # count mutants
#   bash scripts/mutation.sh selftest                                # fast path == fresh import on known mutants
#   bash scripts/mutation.sh PATHS --survivors-only                  # re-run survivors after adding tests
# Results: reports/mutation/results/*.json (resume state), reports/mutation/README.md (kill rates, survivors).
# One process, niced: sized for a shared 2-core machine (run shards in parallel only on an idle one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-${METAVERIFY_VENV:-.venv}/bin/python}"
[ -x "$PY" ] || PY=python3
case "${1:-}" in
  report|list|selftest) exec "$PY" scripts/mutation.py "$@" ;;
  coverage) exec nice -n "${MUTATION_NICE:-5}" "$PY" scripts/mutation.py "$@" ;;
esac
nice -n "${MUTATION_NICE:-5}" "$PY" scripts/mutation.py run "$@"
exec "$PY" scripts/mutation.py report
