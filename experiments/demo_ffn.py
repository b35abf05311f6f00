"""FFN demo: a ReLU-gated FFN on random inputs with calibrated sparsity, dense vs sparse.

Prints, per case: measured active neurons per token and sparsity, the packed sizes of TwELL and
Hybrid against the dense hidden matrix, overflow counts, and the agreement of the sparse op (output
and all gradients) with the dense float32 FFN. Runs on a CPU in well under two minutes.

    python experiments/demo_ffn.py [--m 2048] [--d-model 256] [--d-ff 1024] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sparse_jax import ops
from sparse_jax.formats import hybrid, twell
from sparse_jax.ops.dense import ffn_with_l1
from sparse_jax.synthetic import make_ffn_problem


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_case(key, m, d_model, d_ff, active, dist, implementation):
  p = make_ffn_problem(key, m, d_model, d_ff, active_per_token=active, distribution=dist,
                       dtype=jnp.bfloat16)
  cfg = ops.SparseFFNConfig()
  k_cot = jax.random.fold_in(key, 1)
  cot = jax.random.normal(k_cot, p.x.shape, jnp.float32)
  coeff = 1e-2

  @jax.jit
  def sparse_loss_grads(x, wg, wu, wd):
    def loss(x, wg, wu, wd):
      y, stats = ops.gated_sparse_ffn(x, wg, wu, wd, implementation=implementation, config=cfg)
      return jnp.sum(y.astype(jnp.float32) * cot) + coeff * stats.l1, (y, stats)
    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, wg, wu, wd)

  @jax.jit
  def dense_loss_grads(x, wg, wu, wd):
    def loss(x, wg, wu, wd):
      y, l1 = ffn_with_l1(x, wg, wu, wd)
      return jnp.sum(y * cot) + coeff * l1, y
    f32 = lambda a: a.astype(jnp.float32)
    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(f32(x), f32(wg), f32(wu), f32(wd))

  infer = jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation=implementation, config=cfg))
  y_inf, stats_inf = infer(p.x, p.w_gate, p.w_up, p.w_down)
  t0 = time.perf_counter()
  grads, (y, stats) = jax.block_until_ready(sparse_loss_grads(p.x, p.w_gate, p.w_up, p.w_down))
  t_sparse = time.perf_counter() - t0
  ref_grads, y_ref = dense_loss_grads(p.x, p.w_gate, p.w_up, p.w_down)

  h = jax.nn.relu(jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32)).astype(jnp.bfloat16)
  tw = twell.encode(h, capacity=cfg.twell_capacity)
  hy = hybrid.encode(h, width=cfg.ell_width, tail_capacity=cfg.tail_rows_for(m))
  dense_bytes = m * d_ff * 2
  return dict(
      distribution=dist, target_active=active, active_per_token=float(stats_inf.l0),
      sparsity_pct=100.0 * (1.0 - float(stats_inf.l0) / d_ff),
      twell_bytes=tw.packed_bytes(), hybrid_bytes=hy.packed_bytes(), dense_h_bytes=dense_bytes,
      twell_overflow_rows=int(stats_inf.overflow_rows), hybrid_long_rows=int(hy.n_tail),
      hybrid_tail_overflow=bool(hy.overflow()),
      out_rel_err=rel_err(y_inf.astype(jnp.float32), y_ref),
      grad_rel_err=max(rel_err(g.astype(jnp.float32), r) for g, r in zip(grads, ref_grads)),
      fwd_bwd_first_call_s=t_sparse)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--m", type=int, default=2048, help="tokens")
  ap.add_argument("--d-model", type=int, default=256)
  ap.add_argument("--d-ff", type=int, default=1024)
  ap.add_argument("--active", type=float, nargs="+", default=[4.0, 10.0, 40.0])
  ap.add_argument("--implementation", default=None, choices=[None, "xla", "pallas"])
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", default=None, help="also write the rows as JSON here")
  args = ap.parse_args(argv)

  print(f"sparse_jax FFN demo on {jax.devices()[0].platform}: M={args.m} d_model={args.d_model} "
        f"d_ff={args.d_ff}, bf16, backends available: {ops.available_implementations()}")
  cases = [(a, d) for d in ("uniform", "skewed") for a in args.active]
  rows = []
  key = jax.random.key(args.seed)
  for i, (active, dist) in enumerate(tqdm(cases, desc="cases", unit="case")):
    rows.append(run_case(jax.random.fold_in(key, i), args.m, args.d_model, args.d_ff, active,
                         dist, args.implementation))

  hdr = (f"{'dist':8} {'active/tok':>10} {'sparsity%':>9} {'TwELL/dense':>11} {'Hybrid/dense':>12} "
         f"{'ovf rows':>8} {'long rows':>9} {'out err':>9} {'grad err':>9}")
  print("\n" + hdr + "\n" + "-" * len(hdr))
  for r in rows:
    print(f"{r['distribution']:8} {r['active_per_token']:10.1f} {r['sparsity_pct']:9.2f} "
          f"{r['twell_bytes'] / r['dense_h_bytes']:11.3f} {r['hybrid_bytes'] / r['dense_h_bytes']:12.3f} "
          f"{r['twell_overflow_rows']:8d} {r['hybrid_long_rows']:9d} "
          f"{r['out_rel_err']:9.2e} {r['grad_rel_err']:9.2e}")
  print("\nerrors: relative L2 vs the dense float32 FFN (bf16 inputs; bf16 rounding is ~4e-3).")
  print("TwELL/dense, Hybrid/dense: packed bytes over the dense bf16 hidden matrix.")
  print("ovf rows: TwELL rows with a full tile, recomputed exactly; long rows: Hybrid dense tail.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
