"""Hot/cold split benchmark (issue 14): dense vs the sparse op vs the split, wall clock, H200.

Per case (paper FFN shape, bf16, M tokens; ``sparse_jax.synthetic`` distributions): firing
frequencies are measured on the batch, the split is planned with
``sparse_jax.ops.hotcold.plan_layer`` (default ``CostModel``), the weights are permuted, and the
candidates (jitted, returning y only) are timed side by side
(``sparse_jax.benchmarking.timing.side_by_side``, baseline the bf16 dense FFN): the op with its
dispatcher, the op forced sparse, and the split (cold part forced sparse, as a prepared checkpoint
runs it). ``speedup_split`` = dense / split (median over rounds). ``predicted_speedup`` is the cost
model's, with the gate's cost (XLA gate for the hot rows, Pallas gate kernel for the cold rows)
measured in the same process.

    PYTHONPATH=$PWD python3 experiments/bench_hotcold.py --out experiments/results/hotcold_h200.json
    PYTHONPATH=$PWD python3 experiments/bench_hotcold.py --predict-only   # CPU: the cost model only
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import synthetic
from sparse_jax.ops import hotcold

CASES = [("uniform", 28), ("skewed", 28), ("skewed", 56), ("zipf", 28), ("zipf", 56),
         ("clustered", 28), ("clustered", 56), ("dense_starts", 28), ("heavy_tail", 28),
         ("skewed", 11)]
# H200 kernel times at the paper's shape, M = 16384 (PERF_FLOORS.md), for --predict-only.
FLOOR_MS = dict(dense=1.49, dense_gate=0.45, pallas_gate=0.50)


def make_problem(key, profile: str, m: int, d_model: int, d_ff: int, active: float):
  return synthetic.make_ffn_problem(key, m, d_model, d_ff, active_per_token=active,
                                    distribution=profile)


def predicted_ms(plan: hotcold.LayerPlan, d_ff: int, gate_ms: dict) -> float:
  """The split's time by the cost model: the gate (XLA for hot rows, the Pallas kernel for cold
  rows, scaled by row counts from the full-width times) + hot up/down + cold gathers/overflow."""
  n_hot = plan.n_hot
  pr = plan.predicted
  gate = (gate_ms["dense_gate"] * n_hot + gate_ms["pallas_gate"] * (d_ff - n_hot)) / d_ff
  return gate + 1e3 * (pr["hot_dense_s"] + pr["cold_gather_s"] + pr["cold_overflow_s"])


def unsplit_predicted_ms(plan: hotcold.LayerPlan, gate_ms: dict) -> float:
  return gate_ms["pallas_gate"] + 1e3 * plan.predicted["unsplit_s"]


def predict_only(args, cases) -> list[dict]:
  """The cost model on the neuron profiles' expected frequencies (token-level distributions use
  their neuron profile, ``skewed``: the cost model sees frequencies, not token structure)."""
  rng = np.random.default_rng(0)
  out = []
  for profile, active in cases:
    neurons = profile if profile in synthetic.NEURON_PROFILES else "skewed"
    freq = synthetic.firing_probabilities(rng, args.d_ff, active, neurons)
    plan = hotcold.plan_layer(freq, d_model=args.d_model, m=args.m)
    split = predicted_ms(plan, args.d_ff, FLOOR_MS)
    unsplit = unsplit_predicted_ms(plan, FLOOR_MS)
    out.append(dict(profile=profile, target_active=active, n_hot=plan.n_hot,
                    hot_share=plan.predicted["hot_share_of_activity"],
                    predicted_split_ms=split, predicted_unsplit_ms=unsplit,
                    predicted_speedup=FLOOR_MS["dense"] / split,
                    predicted_unsplit_speedup=FLOOR_MS["dense"] / unsplit))
  return out


def bench(args, cases) -> list[dict]:
  from pallas_kernels import twell_gate
  from sparse_jax import ops
  from sparse_jax.benchmarking import ffn_cases, timing
  from sparse_jax.ops.dense import bf16_gated_ffn_with_l1
  from sparse_jax.ops.pallas_backend import gate_config
  cfg = ops.SparseFFNConfig()
  forced = dataclasses.replace(cfg, max_active_fraction=None)
  out = []
  for i, (profile, active) in enumerate(cases):
    p = make_problem(jax.random.key(i), profile, args.m, args.d_model, args.d_ff, active)
    freq = np.asarray(jnp.mean(p.gate_active(), axis=0, dtype=jnp.float32), np.float64)
    plan = hotcold.plan_layer(freq, d_model=args.d_model, m=args.m)
    wg, wu, wd = hotcold.permute_neurons(plan.perm, p.w_gate, p.w_up, p.w_down)
    split_stats = jax.jit(lambda *a: hotcold.hot_cold_ffn(
        *a, n_hot=plan.n_hot, implementation="pallas", config=forced))
    dense = jax.jit(lambda *a: bf16_gated_ffn_with_l1(*a)[0])
    op = jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas", config=cfg)[0])
    op_forced = jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas",
                                                        config=forced)[0])
    split = jax.jit(lambda *a: split_stats(*a)[0])
    # All candidates on one argument tuple: the split's permuted weights travel beside the
    # original ones, so the rounds alternate over every candidate.
    wrap = lambda f, permuted: (lambda x, g, u, d, pg, pu, pd: f(x, pg, pu, pd) if permuted
                                else f(x, g, u, d))
    fns = dict(dense=wrap(dense, False), op=wrap(op, False), forced=wrap(op_forced, False),
               split=wrap(split, True))
    t = timing.side_by_side(fns, (p.x, p.w_gate, p.w_up, p.w_down, wg, wu, wd),
                            rounds=args.rounds, calls_per_round=args.calls, baseline="dense")
    gates = timing.side_by_side(
        dict(dense_gate=jax.jit(lambda x, w: jnp.maximum(x @ w.T, 0)),
             pallas_gate=jax.jit(lambda x, w: twell_gate.gate_twell(
                 x, w, capacity=cfg.twell_capacity, config=gate_config(cfg, x.shape[1])))),
        (p.x, p.w_gate), rounds=args.rounds, calls_per_round=args.calls)
    gate_ms = {k: v["median_ms"] for k, v in gates["candidates"].items()}
    med = {k: v["median_ms"] for k, v in t["candidates"].items()}
    y, st = split_stats(p.x, wg, wu, wd)
    permuted = dataclasses.replace(p, w_gate=wg, w_up=wu, w_down=wd)
    rows = ffn_cases.error_rows(args.m, 2048)
    rec = dict(profile=profile, target_active=active, active_per_token=float(st.l0),
               M=args.m, n_hot=plan.n_hot, hot_share=plan.predicted["hot_share_of_activity"],
               dense_ms=med["dense"], op_ms=med["op"], forced_ms=med["forced"],
               split_ms=med["split"], speedup_op=t["speedup"]["op"],
               speedup_forced=t["speedup"]["forced"], speedup_split=t["speedup"]["split"],
               speedup_split_paired=t["speedup_paired"]["split"],
               predicted_speedup=med["dense"] / predicted_ms(plan, args.d_ff, gate_ms),
               gate_ms=gate_ms, rel_err_split=ffn_cases.rel_err_f32(y, permuted, rows),
               overflow_rows_split=int(st.overflow_rows), wall=t)
    out.append(rec)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()
                      if k != "wall"}), flush=True)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--m", type=int, default=16384)
  ap.add_argument("--d-model", type=int, default=2048)
  ap.add_argument("--d-ff", type=int, default=5632)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--calls", type=int, default=10)
  ap.add_argument("--cases", help="comma-separated profile:active subset, e.g. skewed:28,zipf:28 "
                                  "(default: all of CASES)")
  ap.add_argument("--predict-only", action="store_true",
                  help="the cost model's predictions only (no GPU needed)")
  ap.add_argument("--out", help="JSON results file")
  args = ap.parse_args()
  cases = CASES
  if args.cases:
    cases = [(c.split(":")[0], float(c.split(":")[1])) for c in args.cases.split(",")]
    bad = [c for c, _ in cases if c not in synthetic.DISTRIBUTIONS]
    if bad:
      raise SystemExit(f"--cases: unknown profile(s) {bad}")
  records = predict_only(args, cases) if args.predict_only else bench(args, cases)
  print(f"{'profile':>10} {'active':>6} {'n_hot':>6} {'hot share':>9}  speed-up vs dense")
  for r in records:
    if args.predict_only:
      tail = (f"predicted split {r['predicted_speedup']:.2f}x (unsplit "
              f"{r['predicted_unsplit_speedup']:.2f}x)")
    else:
      tail = (f"split {r['speedup_split']:.2f}x (predicted {r['predicted_speedup']:.2f}x), op "
              f"{r['speedup_op']:.2f}x, forced {r['speedup_forced']:.2f}x, rel err "
              f"{r['rel_err_split']:.1e}")
    active = r["target_active"]
    print(f"{r['profile']:>10} {active:>6} {r['n_hot']:>6} {100 * r['hot_share']:>8.1f}%  {tail}")
  if args.out:
    from sparse_jax.benchmarking import results
    results.write_results(args.out, results.run_header(), records)


if __name__ == "__main__":
  main()
