#!/usr/bin/env bash
# The README's main command: bootstraps .venv, then trains the sparse `tiny` model on the default
# corpus (the interpreter's standard library) on the CPU for about three minutes, saves a
# checkpoint, evaluates validation loss and sparsity, prints a summary table and writes the plot
# to runs/main/curves.png. Extra args pass through (e.g. --set train.l1_coeff=0).
# The FFN demo of the op itself: python experiments/demo_ffn.py
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/bootstrap.sh")"
cd "$root"
exec "$py" experiments/train.py --config tiny --steps 1600 --max-minutes 3 --out runs/main \
  --fresh --set train.ckpt_every=400 "$@"
