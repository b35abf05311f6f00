"""Tuning sweep for the TwELL kernels (one GPU call): fused up+down variants and gate-kernel
configs at the 2B FFN shape, CUPTI medians, each checked against the reference.

    MOSAIC_GPU_DUMP_PTXAS=1 PYTHONPATH=$PWD python3 experiments/tune_twell.py --out tune.json
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import benchmarking
from pallas_kernels import twell_ffn, twell_gate
from sparse_jax.synthetic import make_ffn_problem

F = twell_ffn.FusedConfig
FUSED_VARIANTS = [
    F(), F(entries_per_step=2), F(split_loads=False), F(dynamic=False),
    F(warpgroups=3), F(entries_per_step=1, dynamic=False, split_loads=False),
]
G = twell_gate.GateConfig
GATE_VARIANTS = [G(), G(tile_k=128, max_concurrent_steps=2), G(cluster_m=True),
                 G(cluster_m=True, grid_minor_dim=0), G(cluster_m=True, grid_tile_width=4),
                 G(cluster_m=True, tile_k=128, max_concurrent_steps=2)]


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--m", type=int, default=16384)
  ap.add_argument("--iterations", type=int, default=10)
  ap.add_argument("--out", default="experiments/results/tune_twell.json")
  ap.add_argument("--gate-only", action="store_true")
  args = ap.parse_args(argv)
  header = benchmarking.run_header()
  print(header["device"])
  records = []
  cases = [("uniform", 28.0), ("skewed", 28.0), ("uniform", 56.0)][:1 if args.gate_only else 3]
  for ci, (dist, active) in enumerate(cases):
    p = make_ffn_problem(jax.random.key(ci), args.m, 2048, 5632, active_per_token=active,
                         distribution=dist)
    tw = jax.jit(lambda x, w: twell_gate.gate_twell(x, w, capacity=32))(p.x, p.w_gate)
    rows = np.linspace(0, args.m - 1, 1024).astype(np.int32)
    g = jnp.maximum(jnp.dot(p.x[rows], p.w_gate.T, preferred_element_type=jnp.float32), 0)
    h = (g.astype(jnp.bfloat16).astype(jnp.float32) *
         jnp.dot(p.x[rows], p.w_up.T, preferred_element_type=jnp.float32))
    ref = jnp.dot(h.astype(jnp.bfloat16).astype(jnp.float32), p.w_down.astype(jnp.float32))
    ok = ~np.asarray(tw.row_overflow())[rows]
    for cfg in [] if args.gate_only else FUSED_VARIANTS:
      f = jax.jit(lambda x, wu, wd, tw, cfg=cfg, wg=p.w_gate: twell_ffn.fused_up_down(
          x, wg, wu, wd, tw, config=cfg)[0])
      try:
        ms, _ = benchmarking.cupti_ms(f, p.x, p.w_up, p.w_down, tw, iterations=args.iterations)
        y = f(p.x, p.w_up, p.w_down, tw)
        err = float(jnp.linalg.norm((y[rows].astype(jnp.float32) - ref)[ok]) /
                    jnp.linalg.norm(ref[ok]))
      except Exception as e:  # a variant that fails to build is reported, not fatal
        ms, err = float("nan"), repr(e)[:300]
      rec = dict(kind="fused", distribution=dist, active=active, M=args.m,
                 config=dataclasses.asdict(cfg), ms=ms, rel_err=err)
      records.append(rec)
      print(f"fused {dist:8} {active:5.0f} {ms:8.4f} ms  err {err}  {cfg}", flush=True)
    if ci == 0:
      for gcfg in GATE_VARIANTS:
        f = jax.jit(lambda x, w, gcfg=gcfg: twell_gate.gate_twell(x, w, capacity=32, config=gcfg))
        try:
          ms, _ = benchmarking.cupti_ms(f, p.x, p.w_gate, iterations=args.iterations)
          same = bool(jnp.all(f(p.x, p.w_gate).counts_MxT == tw.counts_MxT))
        except Exception as e:
          ms, same = float("nan"), repr(e)[:300]
        records.append(dict(kind="gate", M=args.m, config=dataclasses.asdict(gcfg), ms=ms,
                            counts_match=same))
        print(f"gate {ms:8.4f} ms  counts_match={same}  {gcfg}", flush=True)
      dense_gate = jax.jit(lambda x, w: jnp.maximum(x @ w.T, 0))
      ms, _ = benchmarking.cupti_ms(dense_gate, p.x, p.w_gate, iterations=args.iterations)
      records.append(dict(kind="xla_dense_gate", M=args.m, ms=ms))
      print(f"xla dense gate {ms:8.4f} ms")
    benchmarking.write_results(args.out, header, records)


if __name__ == "__main__":
  main()
