#!/usr/bin/env bash
# Creates (or refreshes) .venv with Python 3.12 and the project installed, then prints its python.
# Sourced by scripts/main.sh and scripts/test.sh; safe to run on a fresh machine with only Python.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

find_python312() {
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    command -v python3.12; return 0
  fi
  local pyroot=""
  if command -v pyenv >/dev/null 2>&1; then pyroot="$(pyenv root 2>/dev/null || true)"; fi
  [ -n "$pyroot" ] || pyroot="${PYENV_ROOT:-$HOME/.pyenv}"
  local cand
  for cand in $(ls -d "$pyroot"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r) /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if [ -x "$cand" ]; then echo "$cand"; return 0; fi
  done
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  py="$(find_python312)" || {
    echo "error: sparse_jax needs Python 3.12 (JAX 0.11 requires it) and none was found." >&2
    echo "       Looked for python3.12 on PATH and under \$(pyenv root)/versions/3.12.*; install one (e.g. 'pyenv install 3.12')." >&2
    exit 1
  }
  echo "bootstrap: creating .venv with $py" >&2
  "$py" -m venv "$venv"
fi

stamp="$venv/.sparse_jax_installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing sparse_jax and its dependencies into .venv" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e "$root[test]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
