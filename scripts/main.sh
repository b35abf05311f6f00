#!/usr/bin/env bash
# The README's main command: bootstraps .venv, then trains the sparse `tiny` model on the default
# corpus (the interpreter's standard library) on the CPU for 1600 steps (about 2.5 minutes on a
# quiet 2-core CPU), saves a checkpoint, evaluates validation loss and sparsity, prints a summary
# table and writes the plot to runs/main/curves.png. Extra args pass through (e.g.
# --set train.l1_coeff=0); a run with extra args gets its own directory runs/main-<hash of them>.
#
# The result does not depend on the machine's speed: the learning-rate schedule is set by the
# step count, and the 15-minute budget is only a cap for a machine over ~5x slower (or busier)
# than that; rerunning the same command resumes the run (from its latest checkpoint) and ends at
# the same result as an uninterrupted one. --fresh starts the run over.
# The FFN demo of the op itself: .venv/bin/python experiments/demo_ffn.py
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/bootstrap.sh")"
cd "$root"
out=runs/main
key=()
for a in "$@"; do [ "$a" = "--fresh" ] || key+=("$a"); done
if [ ${#key[@]} -gt 0 ]; then
  out="runs/main-$(printf '%s\n' "${key[@]}" | "$py" -c 'import hashlib, sys; print(hashlib.sha1(sys.stdin.buffer.read()).hexdigest()[:8])')"
fi
exec "$py" experiments/train.py --config tiny --steps 1600 --max-minutes 15 --out "$out" \
  --set train.ckpt_every=200 "$@"
