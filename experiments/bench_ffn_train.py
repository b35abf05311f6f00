"""FFN training benchmark: forward + backward (all four gradients, with the L1 term), dense XLA vs
the Pallas sparse path, on a Hopper GPU.

Same shapes and synthetic activations as bench_ffn.py. Times are wall-clock per call over
back-to-back calls in this process (CUPTI cannot see the kernels inside XLA's device-side
conditionals, which the training path uses); peak memory is XLA's buffer assignment for the
compiled step (arguments + outputs + temporaries, aliasing excluded), the bytes the step needs.

    PYTHONPATH=$PWD python3 experiments/bench_ffn_train.py --m 16384 --out experiments/results/ffn_train.json
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax
import jax.numpy as jnp

from sparse_jax import benchmarking
from sparse_jax import ops
from sparse_jax.ops.dense import bf16_gated_ffn_with_l1, ffn_with_l1
from sparse_jax.synthetic import make_ffn_problem

L1_COEFF = 1e-2


def step_fns(cfg, cot):
  def dense_loss(x, wg, wu, wd):  # the dense model as it trains in bf16
    y, l1 = bf16_gated_ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y.astype(jnp.float32) * cot) + L1_COEFF * l1

  def reference_loss(x, wg, wu, wd):  # float32 ground truth for the gradient error
    y, l1 = ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y * cot) + L1_COEFF * l1

  def sparse_loss(cfg):
    def loss(x, wg, wu, wd):
      y, st = ops.gated_sparse_ffn(x, wg, wu, wd, implementation="pallas", config=cfg)
      return jnp.sum(y.astype(jnp.float32) * cot) + L1_COEFF * st.l1
    return loss

  g = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))
  forced = dataclasses.replace(cfg, max_active_fraction=None)
  return dict(dense=g(dense_loss), sparse=g(sparse_loss(cfg)), forced=g(sparse_loss(forced)),
              reference=g(reference_loss))


def peak_bytes(f, *args) -> int:
  m = f.lower(*args).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def wall_ms(f, *args, windows=5, calls=10) -> float:
  return statistics.median(benchmarking.wall_ms_per_call(f, *args, calls=calls)[1]
                           for _ in range(windows))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--m", type=int, nargs="+", default=[16384])
  ap.add_argument("--active", type=float, nargs="+", default=[11, 28, 56, 168, 560])
  ap.add_argument("--dist", nargs="+", default=["uniform", "skewed"])
  ap.add_argument("--capacity", type=int, default=32)
  ap.add_argument("--out", default="experiments/results/bench_ffn_train.json")
  args = ap.parse_args(argv)
  if jax.devices()[0].platform != "gpu":
    raise SystemExit("bench_ffn_train.py needs a GPU")
  cfg = ops.SparseFFNConfig(twell_capacity=args.capacity)
  header = benchmarking.run_header()
  print(f"device {header['device']}  jax {header['jax']}")
  print(f"{'M':>6} {'dist':8} {'act/tok':>7} {'dense':>7} {'sparse':>7} {'speedup':>7} {'forced':>7} "
        f"{'x':>5} {'peak D':>8} {'peak S':>8} {'ratio':>5} {'grad err':>8}")
  records = []
  key = jax.random.key(0)
  for m in args.m:
    for dist in args.dist:
      for active in args.active:
        key, k1, k2 = jax.random.split(key, 3)
        p = make_ffn_problem(k1, m, 2048, 5632, active_per_token=active, distribution=dist)
        a = (p.x, p.w_gate, p.w_up, p.w_down)
        cot = jax.random.normal(k2, p.x.shape, jnp.float32)
        fns = step_fns(cfg, cot)
        timed = ("dense", "sparse", "forced")
        times = {k: wall_ms(fns[k], *a) for k in timed}
        peaks = {k: peak_bytes(fns[k], *a) for k in timed}
        f32 = tuple(x.astype(jnp.float32) for x in a)
        with jax.default_matmul_precision("highest"):
          ref = fns["reference"](*f32)
        got = fns["sparse"](*a)
        err = max(float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
                  for g, r in zip(got, ref))
        rec = dict(M=m, distribution=dist, target_active=active, active_per_token=p.active_per_token(),
                   dense_ms=times["dense"], sparse_ms=times["sparse"],
                   speedup=times["dense"] / times["sparse"], sparse_forced_ms=times["forced"],
                   speedup_forced=times["dense"] / times["forced"],
                   dense_peak_bytes=peaks["dense"], sparse_peak_bytes=peaks["sparse"],
                   sparse_forced_peak_bytes=peaks["forced"],
                   peak_ratio=peaks["sparse"] / peaks["dense"], grad_rel_err=err,
                   timer="wall-clock, median of 5 x 10 back-to-back calls",
                   peak="XLA buffer assignment of the compiled fwd+bwd step")
        records.append(rec)
        print(f"{m:6d} {dist:8} {rec['active_per_token']:7.1f} {times['dense']:7.3f} "
              f"{times['sparse']:7.3f} {rec['speedup']:7.2f} {times['forced']:7.3f} "
              f"{rec['speedup_forced']:5.2f} {peaks['dense'] / 2**30:8.2f} "
              f"{peaks['sparse'] / 2**30:8.2f} {rec['peak_ratio']:5.2f} {err:8.1e}", flush=True)
        benchmarking.write_results(args.out, header, records)
  print(f"wrote {args.out} (peaks in GiB)")


if __name__ == "__main__":
  main()
