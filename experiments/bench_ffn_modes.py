"""The sparse FFN op's static modes (``SparseFFNConfig.mode``) timed side by side in training.

Forward + backward (all four gradients, with the L1 term) of ``sum(y * cotangent)`` on a Hopper
GPU, the paper's FFN shape, the synthetic activations of bench_ffn.py. Per case, each variant is
timed in turn over several windows (wall clock, median of the windows' per-call times, back-to-back
calls), so slow drifts of the GPU's clocks hit all of them alike:

    dense     jax.grad of the bf16 dense FFN (the dense model; the baseline of every ratio)
    auto      mode="auto": the on-device dispatcher (gate probe + lax.cond, forward and backward)
    sparse    mode="sparse": the sparse kernels with no conditional around them
    mode_dense  mode="dense": the op's plain XLA path (should equal `dense`: same FFN, + stats)

Also per variant: XLA's buffer assignment of the compiled step (peak bytes), the gradient error
against float32, and whether the call's stats said it fell back to dense (mode="sparse" above its
entry capacity runs the kernels and then the XLA-only dense correction: slower, still exact).

    PYTHONPATH=$PWD python3 experiments/bench_ffn_modes.py --out experiments/results/ffn_modes.json
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
VARIANTS = ("dense", "auto", "sparse", "mode_dense")


def step_fns(cfg: ops.SparseFFNConfig, cot):
  """{variant: jitted grad of the loss}, plus "reference" (float32) and "stats" (op forward)."""
  def dense_loss(x, wg, wu, wd):
    y, l1 = bf16_gated_ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y.astype(jnp.float32) * cot) + L1_COEFF * l1

  def reference_loss(x, wg, wu, wd):
    y, l1 = ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y * cot) + L1_COEFF * l1

  def op_loss(mode):
    c = dataclasses.replace(cfg, mode=mode)

    def loss(x, wg, wu, wd):
      y, st = ops.gated_sparse_ffn(x, wg, wu, wd, implementation="pallas", config=c)
      return jnp.sum(y.astype(jnp.float32) * cot) + L1_COEFF * st.l1
    return loss

  g = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))
  fns = dict(dense=g(dense_loss), auto=g(op_loss("auto")), sparse=g(op_loss("sparse")),
             mode_dense=g(op_loss("dense")), reference=g(reference_loss))
  # Under jax.grad the op's forward is the training forward; its stats say what the call did.
  fns["fallback"] = {mode: jax.jit(lambda *a, m=mode: jax.vjp(
      lambda *b: ops.gated_sparse_ffn(*b, implementation="pallas",
                                      config=dataclasses.replace(cfg, mode=m)), *a)[0][1]
      .dense_fallback) for mode in ("auto", "sparse")}
  return fns


def peak_bytes(f, *args) -> int:
  m = f.lower(*args).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def interleaved_wall_ms(fns: dict, args, *, windows: int, calls: int) -> dict[str, float]:
  per = {k: [] for k in fns}
  for f in fns.values():
    jax.block_until_ready(f(*args))  # compile outside the windows
  for _ in range(windows):
    for k, f in fns.items():
      per[k].append(benchmarking.wall_ms_per_call(f, *args, calls=calls)[1])
  return {k: statistics.median(v) for k, v in per.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--m", type=int, nargs="+", default=[16384])
  ap.add_argument("--active", type=float, nargs="+", default=[11, 28, 56, 168])
  ap.add_argument("--dist", nargs="+", default=["uniform", "skewed"])
  ap.add_argument("--capacity", type=int, default=32)
  ap.add_argument("--windows", type=int, default=5)
  ap.add_argument("--calls", type=int, default=10)
  ap.add_argument("--out", default="experiments/results/bench_ffn_modes.json")
  args = ap.parse_args(argv)
  if jax.devices()[0].platform != "gpu":
    raise SystemExit("bench_ffn_modes.py needs a GPU")
  cfg = ops.SparseFFNConfig(twell_capacity=args.capacity)
  header = benchmarking.run_header()
  print(f"device {header['device']}  jax {header['jax']}  (ms wall clock; x = dense / variant; "
        "peak GiB; * = the call fell back to dense)")
  print(f"{'M':>6} {'dist':8} {'act':>5} " + " ".join(f"{v:>10} {'x':>5}" for v in VARIANTS)
        + f" {'peak D':>6} {'peak S':>6} {'err S':>7} {'err MD':>7}")
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
        times = interleaved_wall_ms({k: fns[k] for k in VARIANTS}, a, windows=args.windows,
                                    calls=args.calls)
        peaks = {k: peak_bytes(fns[k], *a) for k in VARIANTS}
        fell = {k: bool(f(*a)) for k, f in fns["fallback"].items()}
        with jax.default_matmul_precision("highest"):
          ref = fns["reference"](*(x.astype(jnp.float32) for x in a))
        err = {k: max(float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
                      for g, r in zip(fns[k](*a), ref)) for k in ("sparse", "mode_dense")}
        rec = dict(M=m, distribution=dist, target_active=active,
                   active_per_token=p.active_per_token(),
                   **{f"{k}_ms": times[k] for k in VARIANTS},
                   **{f"speedup_{k}": times["dense"] / times[k] for k in VARIANTS[1:]},
                   **{f"{k}_peak_bytes": peaks[k] for k in VARIANTS},
                   **{f"{k}_fell_back_dense": v for k, v in fell.items()},
                   grad_rel_err_sparse=err["sparse"], grad_rel_err_mode_dense=err["mode_dense"],
                   timer=f"wall-clock, median of {args.windows} interleaved windows of "
                         f"{args.calls} back-to-back calls",
                   peak="XLA buffer assignment of the compiled fwd+bwd step")
        records.append(rec)
        cells = []
        for k in VARIANTS:
          mark = "*" if fell.get(k) else " "
          cells.append(f"{times[k]:9.3f}{mark} {times['dense'] / times[k]:5.2f}")
        print(f"{m:6d} {dist:8} {rec['active_per_token']:5.1f} " + " ".join(cells)
              + f" {peaks['dense'] / 2**30:6.2f} {peaks['sparse'] / 2**30:6.2f}"
              f" {err['sparse']:7.1e} {err['mode_dense']:7.1e}", flush=True)
        benchmarking.write_results(args.out, header, records)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
