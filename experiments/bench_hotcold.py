"""Hot/cold split benchmark (issue 14): dense vs the sparse op vs the split, wall clock, H200.

Per case (paper FFN shape, bf16, M tokens): firing frequencies are measured on the batch, the split
is planned with ``sparse_jax.ops.hotcold.plan_layer`` (default ``CostModel``), the weights are
permuted, and four jitted functions returning y only are timed alternately in rounds (median of
per-round means, wall clock with ``block_until_ready``): the bf16 dense FFN, the op with its
dispatcher, the op forced sparse, and the split (cold part forced sparse, as a prepared checkpoint
runs it). ``speedup_split`` = dense / split. ``predicted_speedup`` is the cost model's, with the
gate's cost (XLA gate for the hot rows, Pallas gate kernel for the cold rows) measured here.

Profiles: ``uniform``, ``skewed`` (``sparse_jax.synthetic``), ``zipf`` (firing probability ~
1/rank^1.1 of 70% live neurons), ``clustered`` (the skewed profile with neurons ordered hottest
first, so the hot ones share a few tiles: the case that made the op 0.75x of dense).

    PYTHONPATH=$PWD python3 experiments/bench_hotcold.py --out experiments/results/hotcold_h200.json
    PYTHONPATH=$PWD python3 experiments/bench_hotcold.py --predict-only   # CPU: the cost model only
    SPARSE_JAX_PALLAS_INTERPRET=1 ... --m 256 --d-model 256 --d-ff 1024 --rounds 1 --calls 1  # smoke
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import synthetic
from sparse_jax.ops import hotcold

CASES = [("uniform", 28), ("skewed", 28), ("skewed", 56), ("zipf", 28), ("zipf", 56),
         ("clustered", 28), ("clustered", 56), ("skewed", 11)]
# H200 kernel times at the paper's shape, M = 16384 (PERF_FLOORS.md), for --predict-only.
FLOOR_MS = dict(dense=1.49, dense_gate=0.45, pallas_gate=0.50)


def zipf_probabilities(rng: np.random.Generator, d_ff: int, mean_active: float) -> np.ndarray:
  alive = rng.random(d_ff) >= synthetic.DEAD_FRACTION
  ranks = rng.permutation(d_ff) + 1.0
  p = np.where(alive, ranks ** -1.1, 0.0)
  for _ in range(50):
    p = np.minimum(p * (mean_active / max(p.sum(), 1e-12)), 0.9)
  return p


def probabilities(profile: str, rng, d_ff: int, active: float) -> np.ndarray:
  if profile == "zipf":
    return zipf_probabilities(rng, d_ff, active)
  base = "uniform" if profile == "uniform" else "skewed"
  p = synthetic.firing_probabilities(rng, d_ff, active, base)
  return np.sort(p)[::-1].copy() if profile == "clustered" else p


@contextlib.contextmanager
def _profile_patch(p: np.ndarray):
  # make_ffn_problem draws its probabilities from synthetic.firing_probabilities; this benchmark
  # supplies its own profile (the benchmark issue adds these profiles to synthetic.py itself).
  saved = synthetic.firing_probabilities
  synthetic.firing_probabilities = lambda *a, **k: p
  try:
    yield
  finally:
    synthetic.firing_probabilities = saved


def make_problem(key, profile: str, m: int, d_model: int, d_ff: int, active: float):
  p = probabilities(profile, np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30))),
                    d_ff, active)
  with _profile_patch(p):
    return synthetic.make_ffn_problem(key, m, d_model, d_ff, active_per_token=active,
                                      distribution="skewed")


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
  rng = np.random.default_rng(0)
  out = []
  for profile, active in cases:
    freq = probabilities(profile, rng, args.d_ff, active)
    plan = hotcold.plan_layer(freq, d_model=args.d_model, m=args.m)
    split = predicted_ms(plan, args.d_ff, FLOOR_MS)
    unsplit = unsplit_predicted_ms(plan, FLOOR_MS)
    out.append(dict(profile=profile, active=active, n_hot=plan.n_hot,
                    hot_share=plan.predicted["hot_share_of_activity"],
                    predicted_split_ms=split, predicted_unsplit_ms=unsplit,
                    predicted_speedup=FLOOR_MS["dense"] / split,
                    predicted_unsplit_speedup=FLOOR_MS["dense"] / unsplit))
  return out


def wall_ms(fns: dict, args, rounds: int, calls: int) -> dict:
  """Median over rounds of the mean wall ms per call, the functions alternating within a round."""
  for f in fns.values():
    jax.block_until_ready(f(*args))
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      jax.block_until_ready(f(*args))
      t0 = time.perf_counter()
      for _ in range(calls):
        y = f(*args)
      jax.block_until_ready(y)
      times[k].append(1e3 * (time.perf_counter() - t0) / calls)
  return {k: float(np.median(v)) for k, v in times.items()}


def rel_err_f32(y, x, wg, wu, wd, rows) -> float:
  f32 = lambda a: a.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  xr = f32(x[rows])
  h = jnp.maximum(jnp.dot(xr, f32(wg).T, precision=hp), 0) * jnp.dot(xr, f32(wu).T, precision=hp)
  ref = jnp.dot(h, f32(wd), precision=hp)
  return float(jnp.linalg.norm(f32(y[rows]) - ref) / jnp.linalg.norm(ref))


def bench(args, cases) -> list[dict]:
  from pallas_kernels import twell_gate
  from sparse_jax import ops
  from sparse_jax.ops.dense import bf16_gated_ffn_with_l1
  cfg = ops.SparseFFNConfig()
  forced = dataclasses.replace(cfg, max_active_fraction=None)
  out = []
  for i, (profile, active) in enumerate(cases):
    p = make_problem(jax.random.key(i), profile, args.m, args.d_model, args.d_ff, active)
    pre = jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32).astype(p.x.dtype)
    freq = np.asarray(jnp.mean(pre > 0, axis=0, dtype=jnp.float32), np.float64)
    plan = hotcold.plan_layer(freq, d_model=args.d_model, m=args.m)
    wg, wu, wd = hotcold.permute_neurons(plan.perm, p.w_gate, p.w_up, p.w_down)
    fns = dict(
        dense=jax.jit(lambda *a: bf16_gated_ffn_with_l1(*a)[0]),
        op=jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas", config=cfg)[0]),
        forced=jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas",
                                                       config=forced)[0]))
    t = wall_ms(fns, (p.x, p.w_gate, p.w_up, p.w_down), args.rounds, args.calls)
    split_fn = jax.jit(lambda *a: hotcold.hot_cold_ffn(*a, n_hot=plan.n_hot,
                                                       implementation="pallas", config=forced))
    both = wall_ms(dict(dense=fns["dense"], split=lambda *a: split_fn(*a)[0]),
                   (p.x, wg, wu, wd), args.rounds, args.calls)
    gates = wall_ms(dict(dense_gate=jax.jit(lambda x, w: jnp.maximum(x @ w.T, 0)),
                         pallas_gate=jax.jit(lambda x, w: twell_gate.gate_twell(
                             x, w, capacity=cfg.twell_capacity))),
                    (p.x, p.w_gate), args.rounds, args.calls)
    y, st = split_fn(p.x, wg, wu, wd)
    rows = np.linspace(0, args.m - 1, min(args.m, 2048)).astype(np.int32)
    rec = dict(profile=profile, target_active=active, active_per_token=float(st.l0),
               M=args.m, n_hot=plan.n_hot, hot_share=plan.predicted["hot_share_of_activity"],
               dense_ms=t["dense"], op_ms=t["op"], forced_ms=t["forced"],
               split_ms=both["split"], dense_ms_split_round=both["dense"],
               speedup_op=t["dense"] / t["op"], speedup_forced=t["dense"] / t["forced"],
               speedup_split=both["dense"] / both["split"],
               predicted_speedup=both["dense"] / predicted_ms(plan, args.d_ff, gates),
               gate_ms=gates, rel_err_split=rel_err_f32(y, p.x, wg, wu, wd, rows),
               overflow_rows_split=int(st.overflow_rows))
    out.append(rec)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}),
          flush=True)
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
    bad = [c for c, _ in cases if c not in ("uniform", "skewed", "zipf", "clustered")]
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
    active = r.get("target_active", r.get("active"))
    print(f"{r['profile']:>10} {active:>6} {r['n_hot']:>6} {100 * r['hot_share']:>8.1f}%  {tail}")
  if args.out:
    from experiments import bench_utils
    bench_utils.write_results(args.out, bench_utils.run_header(), records)


if __name__ == "__main__":
  main()
