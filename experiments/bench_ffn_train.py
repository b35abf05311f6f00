"""FFN training benchmark: forward + backward (all four gradients of ``sum(y * cotangent) +
L1_COEFF * l1``) of the sparse FFN op vs ``jax.grad`` of the bf16 dense FFN, on a Hopper GPU.

Same cases as ``bench_ffn.py`` (shapes x M x distributions x densities, ``sparse_jax.synthetic``).
Per case:

* ``speedup`` (the headline): wall clock, the dense and sparse steps timed side by side
  (``sparse_jax.benchmarking.side_by_side``), ``dense_ms / sparse_ms``; ``sparse`` is the op with
  its dispatcher, ``sparse_forced`` always sparse (``max_active_fraction=None``).
* ``kernel_speedup_forced``: CUPTI kernel sums of dense over sparse_forced (a breakdown: launch
  gaps and kernels inside device-side conditionals are not counted), measured after all wall
  clocks of the run.
* peak memory: XLA's buffer assignment of each compiled step (arguments + outputs + temporaries
  - aliasing), ``peak_ratio`` sparse / dense;
* ``grad_rel_err``: the largest relative error of the four gradients vs the float32 step;
  ``overflow_rows`` and ``dense_fallback`` from the op's statistics in the step.

    python3 experiments/bench_ffn_train.py --quick --out $OUT/bench_ffn_train.json  # H200 ~3 min
    python3 experiments/bench_ffn_train.py --cpu-smoke --out /tmp/bench_ffn_train.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_jax import benchmarking, ops  # noqa: E402
from sparse_jax.benchmarking import ffn_cases  # noqa: E402
from sparse_jax.benchmarking.results import command_line, fmt  # noqa: E402
from sparse_jax.ops.dense import bf16_gated_ffn_with_l1, ffn_with_l1  # noqa: E402

L1_COEFF = 1e-2
TIMED = ("dense", "sparse", "sparse_forced")
GRADS = (0, 1, 2, 3)


def losses(impl: str, cfg: ops.SparseFFNConfig) -> dict:
  """loss(x, wg, wu, wd, cot) of each candidate; ``*_stats`` also return the op's FFNStats."""
  def dense(x, wg, wu, wd, cot):  # the dense model as it trains in bf16
    y, l1 = bf16_gated_ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y.astype(jnp.float32) * cot) + L1_COEFF * l1

  def reference(x, wg, wu, wd, cot):  # float32 ground truth for the gradient error
    y, l1 = ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y * cot) + L1_COEFF * l1

  def sparse(c):
    def loss(x, wg, wu, wd, cot):
      y, st = ops.gated_sparse_ffn(x, wg, wu, wd, implementation=impl, config=c)
      return jnp.sum(y.astype(jnp.float32) * cot) + L1_COEFF * st.l1, st
    return loss

  forced = dataclasses.replace(cfg, max_active_fraction=None)
  drop = lambda f: (lambda *a: f(*a)[0])  # noqa: E731
  return dict(dense=dense, reference=reference, sparse=drop(sparse(cfg)),
              sparse_forced=drop(sparse(forced)), sparse_stats=sparse(cfg))


def compile_steps(args5, impl, cfg) -> tuple[dict, float]:
  """Each candidate's gradient step compiled once for these shapes (+ the float32 reference and
  a statistics step, untimed)."""
  fs = losses(impl, cfg)
  steps = {k: jax.grad(fs[k], argnums=GRADS) for k in (*TIMED, "reference")}
  steps["stats"] = jax.grad(fs["sparse_stats"], argnums=GRADS, has_aux=True)
  t0 = time.perf_counter()
  f32 = tuple(a.astype(jnp.float32) for a in args5)
  out = {}
  for k, f in steps.items():
    if k == "reference":
      with jax.default_matmul_precision("highest"):
        out[k] = jax.jit(f).lower(*f32).compile()
    else:
      out[k] = jax.jit(f).lower(*args5).compile()
  return out, time.perf_counter() - t0


def wall_case(case, steps, settings, args) -> dict:
  p = case.problem(args.seq_len)
  cot = jax.random.normal(jax.random.key(case.seed + 1), p.x.shape, jnp.float32)
  a = (p.x, p.w_gate, p.w_up, p.w_down, cot)
  wall = benchmarking.side_by_side({k: steps[k] for k in TIMED}, a, rounds=settings["rounds"],
                                   calls_per_round=settings["calls_per_round"], baseline="dense")
  ref = steps["reference"](*(v.astype(jnp.float32) for v in a))
  got, st = steps["stats"](*a)
  err = max(float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
            for g, r in zip(got, ref))
  peaks = {k: benchmarking.compiled_memory(steps[k])["peak_bytes"] for k in TIMED}
  ms = {k: wall["candidates"][k]["median_ms"] for k in TIMED}
  ratio = lambda a, b: a / b if a and b else None  # noqa: E731
  return dict(
      case.fields(), **ffn_cases.activity_fields(p), speedup=wall["speedup"]["sparse"],
      speedup_forced=wall["speedup"]["sparse_forced"], dense_ms=ms["dense"],
      sparse_ms=ms["sparse"], sparse_forced_ms=ms["sparse_forced"], wall=wall,
      dense_peak_bytes=peaks["dense"], sparse_peak_bytes=peaks["sparse"],
      sparse_forced_peak_bytes=peaks["sparse_forced"],
      peak_ratio=ratio(peaks["sparse"], peaks["dense"]), grad_rel_err=err,
      op_active_per_token=float(st.l0), overflow_rows=int(st.overflow_rows),
      dense_fallback=float(st.dense_fallback),
      peak="XLA buffer assignment of the compiled fwd+bwd step")


def cupti_case(case, rec, steps, settings, args) -> None:
  p = case.problem(args.seq_len)
  cot = jax.random.normal(jax.random.key(case.seed + 1), p.x.shape, jnp.float32)
  a = (p.x, p.w_gate, p.w_up, p.w_down, cot)
  n = settings["cupti_iterations"]
  dense, _ = benchmarking.cupti_ms(steps["dense"], *a, iterations=n)
  forced, _ = benchmarking.cupti_ms(steps["sparse_forced"], *a, iterations=n)
  rec.update(cupti_dense_ms=dense, cupti_sparse_forced_ms=forced,
             kernel_speedup_forced=dense / forced)


HEAD = ("M", "shape", "dist", "act/tok", "dense ms", "sparse ms", "speedup", "forced ms",
        "x forced", "kernel x", "peak D GiB", "peak S GiB", "ratio", "grad err", "ovf", "path")


def row(r: dict) -> tuple:
  gib = lambda b: fmt(b and b / 2**30, ".2f")  # noqa: E731
  return (str(r["M"]), f"{r['d_model']}x{r['d_ff']}", r["distribution"],
          f"{r['active_per_token']:.1f}", f"{r['dense_ms']:.3f}", f"{r['sparse_ms']:.3f}",
          f"{r['speedup']:.2f}", f"{r['sparse_forced_ms']:.3f}", f"{r['speedup_forced']:.2f}",
          fmt(r.get("kernel_speedup_forced"), ".2f"), gib(r["dense_peak_bytes"]),
          gib(r["sparse_peak_bytes"]), fmt(r["peak_ratio"], ".2f"), f"{r['grad_rel_err']:.1e}",
          str(r["overflow_rows"]), "dense" if r["dense_fallback"] else "sparse")


def summary(records: list[dict]) -> dict:
  worst = min(records, key=lambda r: r["speedup"])
  return dict(cases=len(records), min_speedup=worst["speedup"],
              min_speedup_case=f"{worst['distribution']} {worst['target_active']:g}/token "
                               f"M={worst['M']} {worst['d_model']}x{worst['d_ff']}",
              dense_fallback_share=float(np.mean([r["dense_fallback"] for r in records])),
              max_grad_rel_err=max(r["grad_rel_err"] for r in records))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ffn_cases.add_grid_args(ap)
  ap.add_argument("--capacity", type=int, default=32, help="SparseFFNConfig.twell_capacity")
  ap.add_argument("--impl", help="the op's implementation (default: the accelerated one)")
  ap.add_argument("--no-cupti", action="store_true", help="wall clock only")
  ap.add_argument("--out", default="experiments/results/bench_ffn_train.json")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = ap.parse_args(argv)
  settings = ffn_cases.resolve(args)
  ffn_cases.require_platform(args, "bench_ffn_train.py")
  impl = ffn_cases.sparse_implementation(args.impl, args.cpu_smoke)
  use_cupti = not (args.no_cupti or args.cpu_smoke)
  cfg = ops.SparseFFNConfig(twell_capacity=args.capacity)
  command = command_line("experiments/bench_ffn_train.py", argv)
  header = dict(benchmarking.run_header(command), implementation=impl, settings=settings,
                config=dataclasses.asdict(cfg), l1_coeff=L1_COEFF, cupti=use_cupti)
  print(f"device {header['device']}  jax {header['jax']}  implementation {impl}  {settings}")
  def compile_case(case):
    p = case.problem(args.seq_len)
    cot = jnp.zeros(p.x.shape, jnp.float32)  # shapes only: nothing is computed on it
    return compile_steps((p.x, p.w_gate, p.w_up, p.w_down, cot), impl, cfg)

  records = ffn_cases.run_grid(
      args, settings, header, compile_fns=compile_case,
      wall_case=lambda case, steps: wall_case(case, steps, settings, args),
      cupti_case=lambda case, rec, steps: cupti_case(case, rec, steps, settings, args),
      row=row, summary=summary, use_cupti=use_cupti,
      extra=dict(twell_capacity=cfg.twell_capacity, implementation=impl))
  print(benchmarking.format_table(HEAD, [row(r) for r in records]))
  s = summary(records)
  print(f"min speedup {s['min_speedup']:.2f} ({s['min_speedup_case']}); dispatcher ran dense in "
        f"{100 * s['dense_fallback_share']:.0f}% of cases; max grad rel err "
        f"{s['max_grad_rel_err']:.1e}")
  print(f"wrote {args.out}")
  return dict(header=header, records=records, summary=s)


if __name__ == "__main__":
  main()
