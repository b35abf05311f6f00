#!/usr/bin/env bash
# The README's test command: bootstraps .venv, then runs the CPU test suite (GPU tests skip themselves).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/bootstrap.sh")"
cd "$root"
exec "$py" -m pytest -q "$@"
