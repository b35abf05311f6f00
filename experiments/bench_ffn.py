"""FFN benchmark: dense XLA FFN vs the Pallas sparse FFN (inference), on a Hopper GPU.

Shapes of the paper's 2B model FFN (d_model 2048, d_ff 5632), bf16, synthetic calibrated gate
sparsity (``sparse_jax.synthetic``) for uniform and skewed activations. Times are CUPTI kernel
times (medians of repeated runs). ``sparse_ms`` is the public op with its dispatcher;
``sparse_forced_ms`` always takes the sparse kernels; ``gate_ms`` is the gate kernel with TwELL
packing alone and ``dense_gate_ms`` XLA's ``relu(x @ Wg^T)``.

    PYTHONPATH=$PWD python3 experiments/bench_ffn.py --m 16384 --out experiments/results/ffn_h100.json
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import benchmarking
from pallas_kernels import ffn_backend, twell_gate
from sparse_jax import ops
from sparse_jax.ops.dense import bf16_gated_ffn_with_l1
from sparse_jax.synthetic import make_ffn_problem


def rel_err_f32(y, p, rows):
  f32 = lambda a: a.astype(jnp.float32)
  x = f32(p.x[rows])
  hp = jax.lax.Precision.HIGHEST
  h = jnp.maximum(jnp.dot(x, f32(p.w_gate).T, precision=hp), 0) * jnp.dot(x, f32(p.w_up).T, precision=hp)
  ref = jnp.dot(h, f32(p.w_down), precision=hp)
  return float(jnp.linalg.norm(f32(y[rows]) - ref) / jnp.linalg.norm(ref))


def bench_case(key, m, d_model, d_ff, active, dist, cfg, iterations, breakdown):
  p = make_ffn_problem(key, m, d_model, d_ff, active_per_token=active, distribution=dist)
  args = (p.x, p.w_gate, p.w_up, p.w_down)
  dense = jax.jit(lambda *a: bf16_gated_ffn_with_l1(*a)[0])  # the dense model in bf16
  # Timed functions return y only, as inference does, so unused statistics are dropped by XLA.
  sparse_stats = jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas", config=cfg))
  forced_cfg = dataclasses.replace(cfg, max_active_fraction=None)
  forced_stats = jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas",
                                                         config=forced_cfg))
  forced = jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas",
                                                   config=forced_cfg)[0])
  probe = jax.jit(ffn_backend.estimate_active_fraction)
  dense_branch = jax.jit(lambda *a: ffn_backend.dense_with_stats(*a)[0])
  gate = jax.jit(lambda x, w: twell_gate.gate_twell(x, w, capacity=cfg.twell_capacity))
  dense_gate = jax.jit(lambda x, w: jnp.maximum(x @ w.T, 0))

  dense_ms, _ = benchmarking.cupti_ms(dense, *args, iterations=iterations)
  forced_ms, forced_all = benchmarking.cupti_ms(forced, *args, iterations=iterations)
  # CUPTI does not see kernels inside XLA's device-side conditionals, so the dispatched op is
  # timed as: the probe + the branch it takes, each measured by CUPTI on its own.
  probe_ms, _ = benchmarking.cupti_ms(probe, p.x, p.w_gate, iterations=iterations)
  chose_dense = bool(float(probe(p.x, p.w_gate)) > ffn_backend.dispatch_threshold(cfg, m))
  branch_ms = (benchmarking.cupti_ms(dense_branch, *args, iterations=iterations)[0]
               if chose_dense else forced_ms)
  sparse_ms = probe_ms + branch_ms
  gate_ms, _ = benchmarking.cupti_ms(gate, p.x, p.w_gate, iterations=iterations)
  dense_gate_ms, _ = benchmarking.cupti_ms(dense_gate, p.x, p.w_gate, iterations=iterations)

  y, stats = sparse_stats(*args)
  y_forced, stats_forced = forced_stats(*args)
  rows = np.linspace(0, m - 1, min(m, 2048)).astype(np.int32)
  rec = dict(M=m, d_model=d_model, d_ff=d_ff, distribution=dist, target_active=active,
             active_per_token=float(stats_forced.l0), dense_ms=dense_ms, sparse_ms=sparse_ms,
             speedup=dense_ms / sparse_ms, sparse_forced_ms=forced_ms,
             speedup_forced=dense_ms / forced_ms, gate_ms=gate_ms, dense_gate_ms=dense_gate_ms,
             gate_vs_dense_gate=gate_ms / dense_gate_ms,
             rel_err=rel_err_f32(y, p, rows), rel_err_forced=rel_err_f32(y_forced, p, rows),
             overflow_rows=int(stats_forced.overflow_rows),
             dispatcher_chose_dense=chose_dense, probe_ms=probe_ms,
             stats_dense_fallback=bool(stats.dense_fallback),
             forced_dense_fallback=bool(stats_forced.dense_fallback),
             forced_ms_spread=[float(np.min(forced_all)), float(np.max(forced_all))],
             twell_capacity=cfg.twell_capacity)
  if breakdown:
    rec["kernels_forced"] = [k for k in benchmarking.cupti_breakdown(forced, *args) if k[1] > 0]
  # Wall-clock (launch gaps, the conditional) is measured by dispatch_overhead.py in a fresh
  # process: once CUPTI has been attached, wall times in the same process come out inflated.
  return rec


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--m", type=int, nargs="+", default=[4096, 16384, 65536])
  ap.add_argument("--active", type=float, nargs="+", default=[11, 28, 56, 168, 560])
  ap.add_argument("--dist", nargs="+", default=["uniform", "skewed"])
  ap.add_argument("--d-model", type=int, default=2048)
  ap.add_argument("--d-ff", type=int, default=5632)
  ap.add_argument("--capacity", type=int, default=32)
  ap.add_argument("--max-active-fraction", type=float, default=ops.SparseFFNConfig().max_active_fraction)
  ap.add_argument("--iterations", type=int, default=20)
  ap.add_argument("--breakdown", action="store_true", help="per-kernel times and host-sync check")
  ap.add_argument("--out", default="experiments/results/bench_ffn.json")
  args = ap.parse_args(argv)
  if jax.devices()[0].platform != "gpu":
    raise SystemExit("bench_ffn.py needs a GPU (it times Mosaic GPU kernels with CUPTI)")

  cfg = ops.SparseFFNConfig(twell_capacity=args.capacity, max_active_fraction=args.max_active_fraction)
  header = benchmarking.run_header()
  print(f"device {header['device']}  jax {header['jax']}")
  records = []
  hdr = (f"{'M':>6} {'dist':8} {'act/tok':>7} {'dense':>7} {'sparse':>7} {'speedup':>7} "
         f"{'forced':>7} {'x':>5} {'gate':>6} {'Dgate':>6} {'relerr':>8} {'ovf':>5} {'disp':>5}")
  print(hdr)
  key = jax.random.key(0)
  for m in args.m:
    for dist in args.dist:
      for active in args.active:
        key, sub = jax.random.split(key)
        r = bench_case(sub, m, args.d_model, args.d_ff, active, dist, cfg, args.iterations,
                       args.breakdown)
        records.append(r)
        print(f"{m:6d} {dist:8} {r['active_per_token']:7.1f} {r['dense_ms']:7.3f} {r['sparse_ms']:7.3f} "
              f"{r['speedup']:7.2f} {r['sparse_forced_ms']:7.3f} {r['speedup_forced']:5.2f} "
              f"{r['gate_ms']:6.3f} {r['dense_gate_ms']:6.3f} {r['rel_err']:8.1e} "
              f"{r['overflow_rows']:5d} {'D' if r['dispatcher_chose_dense'] else 'S':>5}", flush=True)
        benchmarking.write_results(args.out, header, records)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
