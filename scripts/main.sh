#!/usr/bin/env bash
# The README's main command: bootstraps .venv, then runs the main job (extra args pass through).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/bootstrap.sh")"
cd "$root"
exec "$py" experiments/demo_ffn.py "$@"
