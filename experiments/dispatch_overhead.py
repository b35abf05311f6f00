"""Diagnostic: what the dispatcher's device-side ``lax.cond`` costs in wall-clock time.

CUPTI sums kernel times and does not see kernels inside XLA's device-side conditionals, and it
ignores launch gaps; this measures pipelined wall time per call (20 back-to-back calls) for the
dense FFN, the sparse kernels alone, the dispatched op, and ``cond(pred, dense, dense)`` (the pure
cost of the conditional). Run it under different ``XLA_FLAGS`` to compare command-buffer modes.

    PYTHONPATH=$PWD python3 experiments/dispatch_overhead.py --label default --out res.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax

from sparse_jax import benchmarking
from sparse_jax import ops
from sparse_jax.ops import pallas_backend
from sparse_jax.ops.dense import gated_ffn
from sparse_jax.synthetic import make_ffn_problem


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--m", type=int, default=16384)
  ap.add_argument("--active", type=float, nargs="+", default=[11, 28, 56, 168, 560])
  ap.add_argument("--dist", nargs="+", default=["uniform", "skewed"])
  ap.add_argument("--only", nargs="+", default=None, help="subset of the timed functions")
  ap.add_argument("--label", default="default")
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  cfg = ops.SparseFFNConfig()
  forced_cfg = dataclasses.replace(cfg, max_active_fraction=None)
  fns = {
      "dense": jax.jit(gated_ffn),
      "sparse_forced": jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas",
                                                               config=forced_cfg)[0]),
      "dispatched": jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas",
                                                            config=cfg)[0]),
      "cond_dense_dense": jax.jit(lambda x, *w: jax.lax.cond(
          pallas_backend.estimate_active_fraction(x, w[0]) > 0.5,
          lambda: gated_ffn(x, *w), lambda: gated_ffn(x, *w))),
      "probe_plus_dense": jax.jit(lambda x, *w: gated_ffn(x, *w) + (
          pallas_backend.estimate_active_fraction(x, w[0]) > 2.0).astype(x.dtype)),
  }
  rows = []
  for dist in args.dist:
    for active in args.active:
      p = make_ffn_problem(jax.random.key(0), args.m, 2048, 5632, active_per_token=active,
                           distribution=dist)
      a = (p.x, p.w_gate, p.w_up, p.w_down)
      for name, f in fns.items():
        if args.only and name not in args.only:
          continue
        disp, wall = benchmarking.wall_ms_per_call(f, *a, calls=30)
        rows.append(dict(label=args.label, xla_flags=os.environ.get("XLA_FLAGS", ""), M=args.m,
                         distribution=dist, active=active, fn=name, wall_ms=wall,
                         dispatch_ms=disp))
        print(f"{args.label:8} {dist:8} act {active:5.0f} {name:18} wall {wall:7.3f} ms  "
              f"host dispatch {disp:6.3f} ms", flush=True)
  prev = json.load(open(args.out)) if os.path.exists(args.out) else []
  with open(args.out, "w") as f:
    json.dump(prev + [dict(benchmarking.run_header(), **r) for r in rows], f, indent=1)


if __name__ == "__main__":
  main()
