"""The sparse FFN op's static modes (``SparseFFNConfig.mode``) timed side by side in training.

Forward + backward (all four gradients, with the L1 term) of ``sum(y * cotangent)`` on a Hopper
GPU, the paper's FFN shape, the synthetic activations of bench_ffn.py. Per case, each variant is
timed in turn over several windows (wall clock, median of the windows' per-call times, back-to-back
calls), so slow drifts of the GPU's clocks hit all of them alike:

    dense     jax.grad of the bf16 dense FFN (the dense model; the baseline of every ratio)
    auto      mode="auto": the on-device dispatcher (gate probe + lax.cond, forward and backward)
    sparse    mode="sparse": the sparse kernels with no conditional around them
    mode_dense  mode="dense": the op's plain XLA path (should equal `dense`: same FFN, + stats)
    hot_cold  (``--hot-cold``) the training split of ``train.hot_cold``: the layer's neurons
              reordered by ``ops.hotcold.plan_layer`` from the problem's own firing counts, the
              hot block dense (XLA autodiff) and the rest mode="sparse" (the same function on
              permuted neurons; its gradients are compared in that order)

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
import numpy as np

from sparse_jax import benchmarking
from pallas_kernels import common
from sparse_jax import ops
from sparse_jax.ops import hotcold
from sparse_jax.ops.dense import bf16_gated_ffn_with_l1, ffn_with_l1, gate_active, matmul_nt
from sparse_jax.synthetic import make_ffn_problem

L1_COEFF = 1e-2
VARIANTS = ("dense", "auto", "sparse", "mode_dense")


def step_fns(cfg: ops.SparseFFNConfig, cot, n_hot: int | None = None):
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

  def hot_cold_loss(x, wg, wu, wd):  # on permuted weights (main)
    y, st = hotcold.hot_cold_ffn(x, wg, wu, wd, n_hot=n_hot, implementation="pallas",
                                 config=dataclasses.replace(cfg, mode="sparse"))
    return jnp.sum(y.astype(jnp.float32) * cot) + L1_COEFF * st.l1

  g = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))
  fns = dict(dense=g(dense_loss), auto=g(op_loss("auto")), sparse=g(op_loss("sparse")),
             mode_dense=g(op_loss("dense")), reference=g(reference_loss))
  if n_hot is not None:
    fns["hot_cold"] = g(hot_cold_loss)
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


def reference_grads(fns: dict, args):
  """The float32 gradients (highest matmul precision) on ``args``."""
  with jax.default_matmul_precision("highest"):
    return fns["reference"](*(x.astype(jnp.float32) for x in args))


def grad_rel_err(grads, ref) -> float:
  """The largest relative error (Frobenius) over the four gradients."""
  return max(float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
             for g, r in zip(grads, ref))


def interleaved_wall_ms(fns: dict, args, *, windows: int, calls: int, extra=None
                        ) -> dict[str, float]:
  """Median wall ms per call of each function on ``args``, timed in turn within each window;
  ``extra``: (name, f, its own args), timed in the same rotation (hot_cold's permuted weights)."""
  runs = {k: (f, args) for k, f in fns.items()}
  if extra is not None:
    runs[extra[0]] = extra[1:]
  per = {k: [] for k in runs}
  for f, a in runs.values():
    jax.block_until_ready(f(*a))  # compile outside the windows
  for _ in range(windows):
    for k, (f, a) in runs.items():
      per[k].append(benchmarking.wall_ms_per_call(f, *a, calls=calls)[1])
  return {k: statistics.median(v) for k, v in per.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--m", type=int, nargs="+", default=[16384])
  ap.add_argument("--shape", default="2048x5632", help="d_model x d_ff")
  ap.add_argument("--active", type=float, nargs="+", default=[11, 28, 56, 168])
  ap.add_argument("--dist", nargs="+", default=["uniform", "skewed"])
  ap.add_argument("--capacity", type=int, default=32)
  ap.add_argument("--windows", type=int, default=5)
  ap.add_argument("--calls", type=int, default=10)
  ap.add_argument("--hot-cold", action="store_true",
                  help="also the hot/cold training split (variant hot_cold)")
  ap.add_argument("--out", default="experiments/results/bench_ffn_modes.json")
  args = ap.parse_args(argv)
  if jax.devices()[0].platform != "gpu" and not common.pallas_interpret():
    raise SystemExit("bench_ffn_modes.py needs a GPU (or SPARSE_JAX_PALLAS_INTERPRET=1 with a "
                     "small --shape, to check the script on the CPU)")
  d_model, d_ff = (int(v) for v in args.shape.split("x"))
  cfg = ops.SparseFFNConfig(twell_capacity=args.capacity)
  header = benchmarking.run_header()
  print(f"device {header['device']}  jax {header['jax']}  (ms wall clock; x = dense / variant; "
        "peak GiB; * = the call fell back to dense)")
  variants = VARIANTS + (("hot_cold",) if args.hot_cold else ())
  print(f"{'M':>6} {'dist':8} {'act':>5} " + " ".join(f"{v:>10} {'x':>5}" for v in variants)
        + f" {'peak D':>6} {'peak S':>6} {'err S':>7} {'err MD':>7}")
  records = []
  key = jax.random.key(0)
  for m in args.m:
    for dist in args.dist:
      for active in args.active:
        key, k1, k2 = jax.random.split(key, 3)
        p = make_ffn_problem(k1, m, d_model, d_ff, active_per_token=active, distribution=dist)
        a = (p.x, p.w_gate, p.w_up, p.w_down)
        cot = jax.random.normal(k2, p.x.shape, jnp.float32)
        plan = a_hc = None
        if args.hot_cold:
          # The split as the training dispatcher plans it: from per-neuron firing counts (as the
          # op counts them), on the weights in the plan's neuron order.
          counts = jnp.sum(gate_active(matmul_nt(p.x, p.w_gate)), axis=0)
          plan = hotcold.plan_layer(np.asarray(counts) / m, d_model=p.x.shape[1], m=m)
          a_hc = (p.x, *hotcold.permute_neurons(plan.perm, *a[1:]))
        fns = step_fns(cfg, cot, None if plan is None else plan.n_hot)
        times = interleaved_wall_ms({k: fns[k] for k in VARIANTS}, a, windows=args.windows,
                                    calls=args.calls,
                                    extra=None if plan is None else (
                                        "hot_cold", fns["hot_cold"], a_hc))
        peaks = {k: peak_bytes(fns[k], *a) for k in VARIANTS}
        fell = {k: bool(f(*a)) for k, f in fns["fallback"].items()}
        ref = reference_grads(fns, a)
        err = {k: grad_rel_err(fns[k](*a), ref) for k in ("sparse", "mode_dense")}
        extra = {}
        if plan is not None:
          err["hot_cold"] = grad_rel_err(fns["hot_cold"](*a_hc), reference_grads(fns, a_hc))
          peaks["hot_cold"] = peak_bytes(fns["hot_cold"], *a_hc)
          extra = dict(hot_cold_n_hot=plan.n_hot, hot_cold_predicted=plan.predicted,
                       grad_rel_err_hot_cold=err["hot_cold"])
        rec = dict(M=m, distribution=dist, target_active=active,
                   active_per_token=p.active_per_token(),
                   **{f"{k}_ms": times[k] for k in variants},
                   **{f"speedup_{k}": times["dense"] / times[k] for k in variants[1:]},
                   **{f"{k}_peak_bytes": peaks[k] for k in variants},
                   **{f"{k}_fell_back_dense": v for k, v in fell.items()},
                   grad_rel_err_sparse=err["sparse"], grad_rel_err_mode_dense=err["mode_dense"],
                   **extra,
                   timer=f"wall-clock, median of {args.windows} interleaved windows of "
                         f"{args.calls} back-to-back calls",
                   peak="XLA buffer assignment of the compiled fwd+bwd step")
        records.append(rec)
        cells = []
        for k in variants:
          mark = "*" if fell.get(k) else " "
          cells.append(f"{times[k]:9.3f}{mark} {times['dense'] / times[k]:5.2f}")
        print(f"{m:6d} {dist:8} {rec['active_per_token']:5.1f} " + " ".join(cells)
              + f" {peaks['dense'] / 2**30:6.2f} {peaks['sparse'] / 2**30:6.2f}"
              f" {err['sparse']:7.1e} {err['mode_dense']:7.1e}", flush=True)
        benchmarking.write_results(args.out, header, records)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
