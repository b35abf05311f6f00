"""The compiled (optimized) HLO of the FFN training step, sparse (``mode="sparse"``) and dense
(``jax.grad`` of the bf16 dense FFN), at the paper shape, with counts of what its entry
computation launches: custom calls (Mosaic kernels, cuBLAS, the CUB sort), fusions, conditionals
and while loops. The wall clock of the sparse step is 0.4-0.6 ms above its CUPTI kernel sum
(NOTES_train.md). XLA forms command buffers after this HLO, on its thunks, so which launches they
capture is not in these files.

    python3 experiments/dump_train_step.py --out $OUT/hlo   # GPU, ~1 min
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_jax import ops  # noqa: E402
from sparse_jax.ops.dense import bf16_gated_ffn_with_l1  # noqa: E402
from sparse_jax.synthetic import make_ffn_problem  # noqa: E402


def summary(text: str) -> dict:
  """Counts of launched operations in the entry computation of an optimized HLO."""
  comps = re.split(r"\n(?=\S.*\{\s*$)", text, flags=re.M)
  entry = next((c for c in comps if c.startswith("ENTRY")), "")
  count = lambda pattern: len(re.findall(pattern, entry))  # noqa: E731
  return dict(custom_calls=count(r"custom-call\("), fusions=count(r" fusion\("),
              conditionals=count(r" conditional\("), whiles=count(r" while\("),
              mosaic_kernels=count(r'custom_call_target="mosaic_gpu'))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--m", type=int, default=16384)
  ap.add_argument("--out", default="experiments/results/hlo")
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  p = make_ffn_problem(jax.random.key(0), args.m, 2048, 5632, active_per_token=28,
                       distribution="skewed")
  cot = jax.random.normal(jax.random.key(1), p.x.shape, jnp.float32)
  a = (p.x, p.w_gate, p.w_up, p.w_down, cot)
  cfg = ops.SparseFFNConfig(mode="sparse")

  def sparse(x, wg, wu, wd, c):
    y, st = ops.gated_sparse_ffn(x, wg, wu, wd, config=cfg)
    return jnp.sum(y.astype(jnp.float32) * c) + 1e-3 * st.l1

  def dense(x, wg, wu, wd, c):
    y, l1 = bf16_gated_ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y.astype(jnp.float32) * c) + 1e-3 * l1

  for name, f in (("sparse", sparse), ("dense", dense)):
    text = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3))).lower(*a).compile().as_text()
    path = os.path.join(args.out, f"train_step_{name}_m{args.m}_after_optimizations.txt")
    with open(path, "w") as fh:
      fh.write(text)
    print(name, summary(text), "->", path, flush=True)


if __name__ == "__main__":
  main()
