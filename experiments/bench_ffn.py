"""FFN inference benchmark: the bf16 dense XLA FFN vs the sparse FFN op, on a Hopper GPU.

Per case (shape x M x activity distribution x density; ``sparse_jax.synthetic`` builds gate
weights and inputs so that the real op sees that activity pattern):

* ``speedup`` (the headline): wall clock, dense and sparse timed side by side
  (``sparse_jax.benchmarking.side_by_side``: alternating in this process on the same inputs,
  median over rounds of back-to-back calls), ``dense_ms / sparse_ms``. ``sparse`` is the public
  op with its dispatcher (``gated_sparse_ffn``, ``SparseFFNConfig`` defaults but
  ``--capacity``); ``sparse_forced`` always takes the sparse kernels (``max_active_fraction=None``);
  ``mode_dense`` is the op with ``mode="dense"`` (the plain dense FFN, no probe).
* ``speedup_host``: the same dispatch rule decided outside the compiled function, as a prepared
  checkpoint's measured statistics or a caller's ``mode`` do (``host_mode``: sparse when the
  dispatcher's estimate on this batch, ``estimate_active_fraction``, is under its threshold and
  the width is one where the kernels pay (``pallas_backend.auto_runs_dense``), so
  ``sparse_forced``; dense otherwise, so ``mode_dense``): no probe, no ``lax.cond``.
* ``kernel_speedup``: the breakdown, CUPTI kernel sums (launch gaps excluded) of dense over
  sparse_forced, when the dispatcher chose sparse (its dense branch runs inside a device-side
  conditional that CUPTI does not see); ``kernel_speedup_forced`` always. CUPTI runs after every
  wall-clock measurement of the run: once attached it can inflate later wall times.
* ``rel_err`` / ``rel_err_forced``: vs the float32 FFN on ``err_rows`` rows (first row included);
  ``overflow_rows``: rows whose TwELL tiles overflowed (recomputed exactly); ``dense_fallback``:
  the dispatcher ran the dense path; the summary gives the share of such cases.

    python3 experiments/bench_ffn.py --quick --out $OUT/bench_ffn.json   # H200: ~2-3 min
    python3 experiments/bench_ffn.py --m 4096 16384 65536 --shape 2048x5632 4096x14336
    python3 experiments/bench_ffn.py --cpu-smoke --out /tmp/bench_ffn.json   # any machine
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_jax import benchmarking, ops  # noqa: E402
from sparse_jax.benchmarking import ffn_cases  # noqa: E402
from sparse_jax.benchmarking.results import command_line, fmt  # noqa: E402
from sparse_jax.ops import pallas_backend  # noqa: E402
from sparse_jax.ops.dense import bf16_gated_ffn_with_l1  # noqa: E402

TIMED = ("dense", "sparse", "sparse_forced", "mode_dense")


def compile_fns(args4, impl: str, cfg: ops.SparseFFNConfig) -> tuple[dict, float]:
  """Every function of a (shape, M), compiled once for these argument shapes."""
  forced = dataclasses.replace(cfg, max_active_fraction=None)
  op = lambda c: (lambda *a: ops.gated_sparse_ffn(*a, implementation=impl, config=c))  # noqa: E731
  fns = dict(dense=lambda *a: bf16_gated_ffn_with_l1(*a)[0],  # the dense model in bf16
             # Timed functions return y only, as inference does (unused statistics are dropped).
             sparse=lambda *a: op(cfg)(*a)[0], sparse_forced=lambda *a: op(forced)(*a)[0],
             mode_dense=lambda *a: op(dataclasses.replace(cfg, mode="dense"))(*a)[0],
             stats=op(cfg), stats_forced=op(forced))
  t0 = time.perf_counter()
  out = {k: jax.jit(f).lower(*args4).compile() for k, f in fns.items()}
  return out, time.perf_counter() - t0


def wall_case(case, fns, settings, args) -> dict:
  p = case.problem(args.seq_len)
  a = (p.x, p.w_gate, p.w_up, p.w_down)
  wall = benchmarking.side_by_side({k: fns[k] for k in TIMED}, a, rounds=settings["rounds"],
                                   calls_per_round=settings["calls_per_round"], baseline="dense")
  (y, st), (y_f, st_f) = fns["stats"](*a), fns["stats_forced"](*a)
  rows = ffn_cases.error_rows(case.m, settings["err_rows"])
  ms = {k: wall["candidates"][k]["median_ms"] for k in TIMED}
  estimate = float(pallas_backend.estimate_active_fraction(p.x, p.w_gate, args.cfg))
  mode = ("dense" if pallas_backend.auto_runs_dense(case.d_model, args.cfg)
          or estimate > pallas_backend.dispatch_threshold(args.cfg, case.m) else "sparse")
  return dict(
      case.fields(), **ffn_cases.activity_fields(p), speedup=wall["speedup"]["sparse"],
      speedup_forced=wall["speedup"]["sparse_forced"],
      speedup_mode_dense=wall["speedup"]["mode_dense"], host_mode=mode,
      speedup_host=wall["speedup"]["sparse_forced" if mode == "sparse" else "mode_dense"],
      dispatch_estimate=estimate, dense_ms=ms["dense"], sparse_ms=ms["sparse"],
      sparse_forced_ms=ms["sparse_forced"], mode_dense_ms=ms["mode_dense"], wall=wall,
      op_active_per_token=float(st_f.l0), rel_err=ffn_cases.rel_err_f32(y, p, rows),
      rel_err_forced=ffn_cases.rel_err_f32(y_f, p, rows), overflow_rows=int(st.overflow_rows),
      overflow_rows_forced=int(st_f.overflow_rows),
      overflow_share_forced=int(st_f.overflow_rows) / case.m,
      dense_fallback=float(st.dense_fallback), dense_fallback_forced=float(st_f.dense_fallback))


def cupti_case(case, rec, fns, settings, args) -> None:
  p = case.problem(args.seq_len)
  a = (p.x, p.w_gate, p.w_up, p.w_down)
  n = settings["cupti_iterations"]
  dense, _ = benchmarking.cupti_ms(fns["dense"], *a, iterations=n)
  forced, spread = benchmarking.cupti_ms(fns["sparse_forced"], *a, iterations=n)
  rec.update(cupti_dense_ms=dense, cupti_sparse_forced_ms=forced,
             cupti_sparse_forced_spread=[float(np.min(spread)), float(np.max(spread))],
             kernel_speedup_forced=dense / forced,
             kernel_speedup=None if rec["dense_fallback"] else dense / forced)
  if args.breakdown:
    rec["kernels_forced"] = [k for k in benchmarking.cupti_breakdown(fns["sparse_forced"], *a)
                             if k[1] > 0]


HEAD = ("M", "shape", "dist", "act/tok", "p99", "dense ms", "sparse ms", "speedup", "forced ms",
        "x forced", "x mode dense", "host", "x host", "kernel x", "rel err", "ovf rows", "path")


def row(r: dict) -> tuple:
  return (str(r["M"]), f"{r['d_model']}x{r['d_ff']}", r["distribution"],
          f"{r['active_per_token']:.1f}", f"{r['active_p99']:.0f}", f"{r['dense_ms']:.3f}",
          f"{r['sparse_ms']:.3f}", f"{r['speedup']:.2f}", f"{r['sparse_forced_ms']:.3f}",
          f"{r['speedup_forced']:.2f}", f"{r['speedup_mode_dense']:.2f}", r["host_mode"],
          f"{r['speedup_host']:.2f}", fmt(r.get("kernel_speedup_forced"), ".2f"),
          f"{r['rel_err']:.1e}", str(r["overflow_rows_forced"]),
          "dense" if r["dense_fallback"] else "sparse")


def summary(records: list[dict]) -> dict:
  if not records:
    return {}
  worst = min(records, key=lambda r: r["speedup"])
  worst_host = min(records, key=lambda r: r["speedup_host"])
  name = lambda r: (f"{r['distribution']} {r['target_active']:g}/token "  # noqa: E731
                    f"M={r['M']} {r['d_model']}x{r['d_ff']}")
  return dict(cases=len(records), min_speedup=worst["speedup"], min_speedup_case=name(worst),
              min_speedup_host=worst_host["speedup_host"], min_speedup_host_case=name(worst_host),
              dense_fallback_share=float(np.mean([r["dense_fallback"] for r in records])),
              max_rel_err=max(r["rel_err"] for r in records))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ffn_cases.add_grid_args(ap)
  ap.add_argument("--capacity", type=int, default=32, help="SparseFFNConfig.twell_capacity")
  ap.add_argument("--max-active-fraction", type=float,
                  default=ops.SparseFFNConfig().max_active_fraction)
  ap.add_argument("--impl", help="the op's implementation (default: the accelerated one)")
  ap.add_argument("--no-cupti", action="store_true", help="wall clock only")
  ap.add_argument("--breakdown", action="store_true", help="per-kernel CUPTI times")
  ap.add_argument("--out", default="experiments/results/bench_ffn.json")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = ap.parse_args(argv)
  settings = ffn_cases.resolve(args)
  ffn_cases.require_platform(args, "bench_ffn.py")
  impl = ffn_cases.sparse_implementation(args.impl, args.cpu_smoke)
  use_cupti = not (args.no_cupti or args.cpu_smoke)
  cfg = args.cfg = ops.SparseFFNConfig(twell_capacity=args.capacity,
                                       max_active_fraction=args.max_active_fraction)
  command = command_line("experiments/bench_ffn.py", argv)
  header = dict(benchmarking.run_header(command), implementation=impl, settings=settings,
                config=dataclasses.asdict(cfg), cupti=use_cupti)
  print(f"device {header['device']}  jax {header['jax']}  implementation {impl}  {settings}")
  def compile_case(case):
    p = case.problem(args.seq_len)
    return compile_fns((p.x, p.w_gate, p.w_up, p.w_down), impl, cfg)

  records = ffn_cases.run_grid(
      args, settings, header, compile_fns=compile_case,
      wall_case=lambda case, fns: wall_case(case, fns, settings, args),
      cupti_case=lambda case, rec, fns: cupti_case(case, rec, fns, settings, args),
      row=row, summary=summary, use_cupti=use_cupti,
      extra=dict(twell_capacity=cfg.twell_capacity, implementation=impl))
  print(benchmarking.format_table(HEAD, [row(r) for r in records]))
  s = summary(records)
  print(f"min speedup {s['min_speedup']:.2f} ({s['min_speedup_case']}); decided on the host "
        f"{s['min_speedup_host']:.2f} ({s['min_speedup_host_case']}); dispatcher ran dense in "
        f"{100 * s['dense_fallback_share']:.0f}% of cases; max rel err {s['max_rel_err']:.1e}")
  print(f"wrote {args.out}")
  return dict(header=header, records=records, summary=s)


if __name__ == "__main__":
  main()
