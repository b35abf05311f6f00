#!/usr/bin/env bash
# The README's test command: bootstraps .venv, then runs the CPU test suite (GPU tests skip themselves).
# Two pytest-xdist workers (SPARSE_JAX_TEST_WORKERS=N for another count, 0 for one process), one
# test file per worker at a time; arguments pass through to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/bootstrap.sh")"
cd "$root"
workers="${SPARSE_JAX_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  exec "$py" -m pytest -q "$@"
fi
exec "$py" -m pytest -q -n "$workers" --dist loadfile --durations=15 "$@"
