"""FFN training benchmark: forward + backward (the loss ``sum(y * cotangent) + L1_COEFF * l1`` and
its four gradients, ``jax.value_and_grad`` as a training step computes them) of the sparse FFN
op vs the bf16 dense FFN, on a Hopper GPU.

Same cases as ``bench_ffn.py`` (shapes x M x distributions x densities, ``sparse_jax.synthetic``).
Per case, timed side by side (``sparse_jax.benchmarking.side_by_side``: wall clock, alternating
in one process on the same inputs, median of rounds):

* ``dense``: ``jax.value_and_grad`` of the bf16 dense FFN (the dense model; the baseline of
  every ratio);
* ``sparse``: ``mode="sparse"``, the sparse kernels with no conditional around them (what
  ``train.dispatch=auto_host`` runs in a sparse layer);
* ``defer``: ``mode="sparse"`` with ``overflow_fallback="defer"``: no conditional at all (a
  call that needed the dense backward is flagged and redone by the training loop);
* ``defer_read``: ``defer`` followed by the host read of that flag after every call, as the
  training loop read ``metrics["redone"]`` after each step before it lagged the read (the device
  idles from the end of one call to the first launch of the next: one FFN per step is the worst
  case of that cost);
* ``defer_lagged``: ``defer`` with the host read of the *previous* call's flag once this call is
  queued, as the training loop reads a light step's flag (``train/loop.py``: the device never
  waits for the host);
* ``mode_dense``: ``mode="dense"``, the op's plain XLA path (what auto_host runs in a dense layer);
* ``device``: ``mode="auto"``, the on-device dispatcher (gate probe + ``lax.cond``, forward and
  backward; ``train.dispatch=device``).
* ``defer_alt`` (with ``--compare-backward [ORDER]``): ``defer`` with another
  ``SparseFFNConfig.train_backward`` (default: the first other than ``--train-backward``),
  timed in the same rounds: ``speedup_defer_alt``, ``alt_over_defer`` (>1: the other order is
  faster), and its gradient errors (``alt_grad_rel_err``, tie-free, as ``grad_rel_err``).

``speedup`` (the headline) is dense over the mode ``train.dispatch=auto_host`` settles on for a
layer with this batch's statistics (``host_mode``: ``sparse_jax.train.dispatch.settled_mode`` of
the sparse step's active fraction and ``dense_fallback``, with the default thresholds scaled to M)
and runs it (``train.overflow_fallback=defer``): a sparse layer runs ``defer_lagged``
(``defer_read`` or ``defer`` in runs made before they existed: ``host_timed``), plus the ``sparse``
step when the call flagged itself (the loop's exact redo: ``host`` "defer+redo"); a dense layer
runs ``mode_dense``. Also: ``speedup_sparse``, ``speedup_defer``, ``speedup_mode_dense``,
``speedup_device``;
``kernel_speedup_sparse``: CUPTI kernel sums of dense over sparse (a breakdown: launch gaps are
not counted), measured after all wall clocks of the run; peak memory: XLA's buffer assignment of
each compiled step (arguments + outputs + temporaries - aliasing), ``peak_ratio`` host pick /
dense; ``grad_rel_err``: the largest relative error of the four gradients of the sparse step vs
the float32 step (each in ``grad_rel_errs``), with the cotangent zeroed on the ``tie_rows`` rows
that hold a gate pre-activation at a ReLU tie (``synthetic.tie_free_cotangent``: there a bf16
tensor-core GEMM and the float32 reference may take different sides of the ReLU, and one flip
moves a whole gate-gradient term); ``grad_rel_errs_raw`` with the full cotangent, and the dense
bf16 step's errors beside both (``dense_grad_rel_errs``, ``dense_grad_rel_errs_raw``);
``overflow_rows`` and ``dense_fallback`` from the sparse step's statistics.

    python3 experiments/bench_ffn_train.py --quick --out $OUT/bench_ffn_train.json  # H200 ~4 min
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
from sparse_jax.benchmarking.results import command_line, fmt, load_json, write_results  # noqa: E402,E501
from sparse_jax.config import TrainConfig  # noqa: E402
from sparse_jax.train import dispatch  # noqa: E402
from sparse_jax.ops.dense import bf16_gated_ffn_with_l1, ffn_with_l1  # noqa: E402
from sparse_jax.synthetic import tie_free_cotangent  # noqa: E402

L1_COEFF = 1e-2
TIMED = ("dense", "sparse", "defer", "mode_dense", "device")
READ = "defer_read"  # the defer step and the host read of its flag (timed; peak = defer's)
LAG = "defer_lagged"  # the defer step and the read of the previous call's flag (the loop's)
READS = (READ, LAG)
ALT = "defer_alt"  # defer with the other SparseFFNConfig.train_backward (--compare-backward)
# candidate: (SparseFFNConfig.mode, SparseFFNConfig.overflow_fallback)
MODES = dict(sparse=("sparse", "cond"), defer=("sparse", "defer"), mode_dense=("dense", "cond"),
             device=("auto", "cond"))
GRADS = (0, 1, 2, 3)
GRAD_NAMES = ("dx", "dw_gate", "dw_up", "dw_down")


def other_backward(train_backward: str, wanted: str | None = "other") -> str:
  """The order ``defer_alt`` runs: ``wanted``, or the first other than ``train_backward``."""
  if wanted not in (None, "other"):
    return wanted
  return next(b for b in ops.base.TRAIN_BACKWARDS if b not in ("auto", train_backward))


def losses(impl: str, cfg: ops.SparseFFNConfig, alt_backward: str | None = None) -> dict:
  """loss(x, wg, wu, wd, cot) of each candidate; ``sparse_stats`` also returns the op's
  FFNStats (of mode sparse); ``alt_stats``: the same for ``defer`` with the other backward."""
  def dense(x, wg, wu, wd, cot):  # the dense model as it trains in bf16
    y, l1 = bf16_gated_ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y.astype(jnp.float32) * cot) + L1_COEFF * l1

  def reference(x, wg, wu, wd, cot):  # float32 ground truth for the gradient error
    y, l1 = ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y * cot) + L1_COEFF * l1

  def op(mode, fallback="cond", **extra):
    c = dataclasses.replace(cfg, mode=mode, overflow_fallback=fallback, **extra)

    def loss(x, wg, wu, wd, cot):
      y, st = ops.gated_sparse_ffn(x, wg, wu, wd, implementation=impl, config=c)
      return jnp.sum(y.astype(jnp.float32) * cot) + L1_COEFF * st.l1, st
    return loss

  drop = lambda f: (lambda *a: f(*a)[0])  # noqa: E731
  out = {name: drop(op(*mode)) for name, mode in MODES.items()}
  flagged = op("sparse", "defer")
  read = lambda *a: (lambda r: (r[0], r[1].dense_fallback))(flagged(*a))  # noqa: E731
  alt = op("sparse", "defer", train_backward=other_backward(cfg.train_backward, alt_backward))
  return dict(out, dense=dense, reference=reference, sparse_stats=op("sparse"), defer_read=read,
              defer_alt=drop(alt), alt_stats=alt)


def compile_steps(args5, impl, cfg, compare_backward: str | None = None) -> tuple[dict, float]:
  """Each candidate's gradient step compiled once for these shapes (+ the float32 reference and
  a statistics step, untimed); ``compare_backward``: also ``defer_alt`` with that order."""
  fs = losses(impl, cfg, compare_backward)
  # Timed steps return the loss and the gradients, as a training step does (with jax.grad
  # alone the forward output is dead code, and XLA drops the forward's conditionals with it).
  steps = {k: jax.value_and_grad(fs[k], argnums=GRADS) for k in TIMED}
  if compare_backward:
    steps[ALT] = jax.value_and_grad(fs[ALT], argnums=GRADS)
    steps["alt_stats"] = jax.grad(fs["alt_stats"], argnums=GRADS, has_aux=True)
  steps["reference"] = jax.grad(fs["reference"], argnums=GRADS)
  steps["stats"] = jax.grad(fs["sparse_stats"], argnums=GRADS, has_aux=True)
  steps[READ] = jax.value_and_grad(fs[READ], argnums=GRADS, has_aux=True)
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


def host_mode(active_per_token: float, d_ff: int, fallback: float, m: int) -> str:
  """The mode ``train.dispatch=auto_host`` settles on for a layer with these statistics, with
  the default thresholds (``TrainConfig``) at M tokens per call."""
  t = TrainConfig()
  return dispatch.settled_mode(
      active_per_token / d_ff, fallback,
      sparse_below=dispatch.scaled_threshold(t.dispatch_sparse_below, m),
      dense_above=dispatch.scaled_threshold(t.dispatch_dense_above, m))


def gradient_errors(steps, a, stats="stats") -> tuple[dict, dict, object]:
  """Relative errors of the four gradients of the sparse step (``stats``: that of another
  candidate) and of the dense bf16 step vs the float32 step on the arguments ``a`` (x, weights,
  cotangent), and the sparse step's stats."""
  ref = steps["reference"](*(v.astype(jnp.float32) for v in a))
  got, st = steps[stats](*a)
  dense = steps["dense"](*a)[1]
  rel = lambda gs: {name: float(jnp.linalg.norm(g.astype(jnp.float32) - r)  # noqa: E731
                                / jnp.linalg.norm(r)) for name, g, r in zip(GRAD_NAMES, gs, ref)}
  return rel(got), rel(dense), st


def host_pick(mode: str, fallback: float, ms: dict, peaks: dict) -> dict:
  """The headline fields for what the training loop runs for this batch: a sparse layer runs the
  ``defer`` step, plus the exact ``sparse`` step when the call flagged itself (the loop's redo);
  a dense layer runs ``mode_dense``."""
  sparse = LAG if LAG in ms else READ if READ in ms else "defer"
  pick = sparse if mode == "sparse" else "mode_dense"
  host_ms = ms[pick] + (ms["sparse"] if pick == sparse and fallback else 0.0)
  peaks = dict(peaks, **{k: peaks["defer"] for k in READS})
  peak = max(peaks[pick], peaks["sparse"]) if pick == sparse and fallback else peaks[pick]
  return dict(host_mode=("defer+redo" if fallback else "defer") if mode == "sparse" else "dense",
              host_timed=pick, speedup=ms["dense"] / host_ms, host_ms=host_ms,
              peak_ratio=peak / peaks["dense"] if peak and peaks["dense"] else None)


def rederive(path: str, command: str) -> dict:
  """Recomputes the headline fields of a stored run (its per-candidate medians and peaks) with
  the host pick this script makes now; the measurements themselves are unchanged."""
  run = load_json(path)
  for r in run["records"]:
    mode = host_mode(r["op_active_per_token"], r["d_ff"], r["dense_fallback"], r["M"])
    ms = {k: r[f"{k}_ms"] for k in TIMED + READS if f"{k}_ms" in r}
    peaks = {k: r[f"{k}_peak_bytes"] for k in TIMED}
    r.update(host_pick(mode, r["dense_fallback"], ms, peaks))
  run["header"]["rederived"] = dict(command=command, source=path, note=rederive.__doc__.strip())
  run["summary"] = summary(run["records"])
  return run


def wall_case(case, steps, settings, args) -> dict:
  p = case.problem(args.seq_len)
  cot = jax.random.normal(jax.random.key(case.seed + 1), p.x.shape, jnp.float32)
  a = (p.x, p.w_gate, p.w_up, p.w_down, cot)
  def read_flag(*a):  # a read of the step's flag after each call
    (loss, flag), grads = steps[READ](*a)
    bool(flag)
    return loss, grads
  unread = []
  def read_previous_flag(*a):  # the loop's read: the previous call's flag, this call queued
    (loss, flag), grads = steps[READ](*a)
    if unread:
      bool(unread.pop())
    unread.append(flag)
    return loss, grads
  alt = {ALT: steps[ALT]} if ALT in steps else {}
  wall = benchmarking.side_by_side({**{k: steps[k] for k in TIMED}, READ: read_flag,
                                    LAG: read_previous_flag, **alt}, a,
                                   rounds=settings["rounds"],
                                   calls_per_round=settings["calls_per_round"], baseline="dense")
  errs_raw, dense_errs_raw, st = gradient_errors(steps, a)
  cot_tie_free, tie_rows = tie_free_cotangent(cot, p.x, p.w_gate)
  errs, dense_errs, _ = gradient_errors(steps, a[:4] + (cot_tie_free,))
  err = max(errs.values())
  peaks = {k: benchmarking.compiled_memory(steps[k])["peak_bytes"] for k in TIMED}
  ms = {k: wall["candidates"][k]["median_ms"] for k in TIMED + READS}
  fallback = float(st.dense_fallback)
  mode = host_mode(float(st.l0), p.w_gate.shape[0], fallback, p.x.shape[0])
  ratio = lambda a, b: a / b if a and b else None  # noqa: E731
  extra = {}
  if alt:
    alt_errs, _, _ = gradient_errors(steps, a[:4] + (cot_tie_free,), stats="alt_stats")
    alt_ms = wall["candidates"][ALT]["median_ms"]
    extra = dict(alt_backward=other_backward(args.train_backward, args.compare_backward),
                 defer_alt_ms=alt_ms,
                 speedup_defer_alt=wall["speedup"][ALT], alt_over_defer=ms["defer"] / alt_ms,
                 alt_grad_rel_err=max(alt_errs.values()), alt_grad_rel_errs=alt_errs,
                 defer_alt_peak_bytes=benchmarking.compiled_memory(steps[ALT])["peak_bytes"])
  return dict(
      case.fields(), **ffn_cases.activity_fields(p),
      **host_pick(mode, fallback, ms, peaks), speedup_sparse=wall["speedup"]["sparse"],
      speedup_mode_dense=wall["speedup"]["mode_dense"], speedup_device=wall["speedup"]["device"],
      speedup_defer=wall["speedup"]["defer"], defer_ms=ms["defer"],
      speedup_defer_read=wall["speedup"][READ], defer_read_ms=ms[READ],
      speedup_defer_lagged=wall["speedup"][LAG], defer_lagged_ms=ms[LAG],
      dense_ms=ms["dense"], sparse_ms=ms["sparse"],
      mode_dense_ms=ms["mode_dense"], device_ms=ms["device"], wall=wall,
      **{f"{k}_peak_bytes": peaks[k] for k in TIMED},
      peak_ratio_sparse=ratio(peaks["sparse"], peaks["dense"]), grad_rel_err=err,
      grad_rel_errs=errs, dense_grad_rel_errs=dense_errs, grad_rel_errs_raw=errs_raw,
      dense_grad_rel_errs_raw=dense_errs_raw, tie_rows=tie_rows,
      op_active_per_token=float(st.l0), overflow_rows=int(st.overflow_rows),
      dense_fallback=fallback, peak="XLA buffer assignment of the compiled fwd+bwd step", **extra)


def cupti_case(case, rec, steps, settings, args) -> None:
  p = case.problem(args.seq_len)
  cot = jax.random.normal(jax.random.key(case.seed + 1), p.x.shape, jnp.float32)
  a = (p.x, p.w_gate, p.w_up, p.w_down, cot)
  n = settings["cupti_iterations"]
  dense, _ = benchmarking.cupti_ms(steps["dense"], *a, iterations=n)
  sparse, _ = benchmarking.cupti_ms(steps["sparse"], *a, iterations=n)
  rec.update(cupti_dense_ms=dense, cupti_sparse_ms=sparse, kernel_speedup_sparse=dense / sparse)


HEAD = ("M", "shape", "dist", "act/tok", "dense ms", "host", "speedup", "sparse ms", "x sparse",
        "x defer", "x read", "x lagged", "x mode dense", "x device", "kernel x", "peak D GiB",
        "peak ratio", "grad err", "raw err S/D", "ovf", "fallback")


def row(r: dict) -> tuple:
  gib = lambda b: fmt(b and b / 2**30, ".2f")  # noqa: E731
  return (str(r["M"]), f"{r['d_model']}x{r['d_ff']}", r["distribution"],
          f"{r['active_per_token']:.1f}", f"{r['dense_ms']:.3f}", r["host_mode"],
          f"{r['speedup']:.2f}", f"{r['sparse_ms']:.3f}", f"{r['speedup_sparse']:.2f}",
          f"{r['speedup_defer']:.2f}", fmt(r.get("speedup_defer_read"), ".2f"),
          fmt(r.get("speedup_defer_lagged"), ".2f"),
          f"{r['speedup_mode_dense']:.2f}", f"{r['speedup_device']:.2f}",
          fmt(r.get("kernel_speedup_sparse"), ".2f"), gib(r["dense_peak_bytes"]),
          fmt(r["peak_ratio"], ".2f"), f"{r['grad_rel_err']:.1e}",
          f"{max(r['grad_rel_errs_raw'].values()):.1e}/"
          f"{max(r['dense_grad_rel_errs_raw'].values()):.1e}", str(r["overflow_rows"]),
          "yes" if r["dense_fallback"] else "no")


def summary(records: list[dict]) -> dict:
  worst = min(records, key=lambda r: r["speedup"])
  name = lambda r: (f"{r['distribution']} {r['target_active']:g}/token M={r['M']} "  # noqa: E731
                    f"{r['d_model']}x{r['d_ff']}")
  worst_device = min(records, key=lambda r: r["speedup_device"])
  return dict(cases=len(records), min_speedup=worst["speedup"], min_speedup_case=name(worst),
              min_speedup_device=worst_device["speedup_device"],
              min_speedup_device_case=name(worst_device),
              host_sparse_share=float(np.mean([r["host_mode"] != "dense" for r in records])),
              dense_fallback_share=float(np.mean([r["dense_fallback"] for r in records])),
              max_grad_rel_err=max(r["grad_rel_err"] for r in records),
              max_grad_rel_err_raw=max(max(r["grad_rel_errs_raw"].values()) for r in records),
              max_dense_grad_rel_err_raw=max(max(r["dense_grad_rel_errs_raw"].values())
                                             for r in records))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ffn_cases.add_grid_args(ap)
  ap.add_argument("--capacity", type=int, default=32, help="SparseFFNConfig.twell_capacity")
  ap.add_argument("--impl", help="the op's implementation (default: the accelerated one)")
  ap.add_argument("--train-backward", choices=ops.base.TRAIN_BACKWARDS,
                  default=ops.SparseFFNConfig.train_backward,
                  help="SparseFFNConfig.train_backward of every sparse candidate")
  ap.add_argument("--compare-backward", nargs="?", const="other", default=None,
                  choices=("other",) + ops.base.TRAIN_BACKWARDS,
                  help="also time defer with another train_backward (candidate defer_alt; "
                       "without a value: the first other than --train-backward)")
  ap.add_argument("--no-cupti", action="store_true", help="wall clock only")
  ap.add_argument("--out", default="experiments/results/bench_ffn_train.json")
  ap.add_argument("--rederive", metavar="JSON",
                  help="no timing: recompute a stored run's headline with the current host pick")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = ap.parse_args(argv)
  command = command_line("experiments/bench_ffn_train.py", argv)
  if args.rederive:
    run = rederive(args.rederive, command)
    write_results(args.out, run["header"], run["records"], summary=run["summary"])
    print(benchmarking.format_table(HEAD, [row(r) for r in run["records"]]))
    print(f"min speedup {run['summary']['min_speedup']:.2f} ({run['summary']['min_speedup_case']})"
          f"; wrote {args.out}")
    return run
  settings = ffn_cases.resolve(args)
  ffn_cases.require_platform(args, "bench_ffn_train.py")
  impl = ffn_cases.sparse_implementation(args.impl, args.cpu_smoke)
  use_cupti = not (args.no_cupti or args.cpu_smoke)
  cfg = ops.SparseFFNConfig(twell_capacity=args.capacity, train_backward=args.train_backward)
  header = dict(benchmarking.run_header(command), implementation=impl, settings=settings,
                config=dataclasses.asdict(cfg), l1_coeff=L1_COEFF, cupti=use_cupti)
  print(f"device {header['device']}  jax {header['jax']}  implementation {impl}  {settings}")
  def compile_case(case):
    p = case.problem(args.seq_len)
    cot = jnp.zeros(p.x.shape, jnp.float32)  # shapes only: nothing is computed on it
    return compile_steps((p.x, p.w_gate, p.w_up, p.w_down, cot), impl, cfg,
                         compare_backward=args.compare_backward)

  records = ffn_cases.run_grid(
      args, settings, header, compile_fns=compile_case,
      wall_case=lambda case, steps: wall_case(case, steps, settings, args),
      cupti_case=lambda case, rec, steps: cupti_case(case, rec, steps, settings, args),
      row=row, summary=summary, use_cupti=use_cupti,
      extra=dict(twell_capacity=cfg.twell_capacity, implementation=impl))
  print(benchmarking.format_table(HEAD, [row(r) for r in records]))
  s = summary(records)
  print(f"min speedup (auto_host's pick) {s['min_speedup']:.2f} ({s['min_speedup_case']}); "
        f"on-device dispatcher min {s['min_speedup_device']:.2f} "
        f"({s['min_speedup_device_case']}); auto_host picks sparse in "
        f"{100 * s['host_sparse_share']:.0f}% of cases; the sparse step fell back to dense in "
        f"{100 * s['dense_fallback_share']:.0f}%; max grad rel err {s['max_grad_rel_err']:.1e} "
        f"(ReLU-tie rows' cotangent zeroed; with them: sparse "
        f"{s['max_grad_rel_err_raw']:.1e}, dense bf16 {s['max_dense_grad_rel_err_raw']:.1e})")
  if args.compare_backward:
    print(benchmarking.format_table(
        ("dist", "act/tok", f"x defer ({args.train_backward})", f"x defer_alt "
         f"({other_backward(args.train_backward, args.compare_backward)})", "alt over defer",
         "alt grad err"),
        [(r["distribution"], f"{r['active_per_token']:.1f}", f"{r['speedup_defer']:.2f}",
          f"{r['speedup_defer_alt']:.2f}", f"{r['alt_over_defer']:.3f}",
          f"{r['alt_grad_rel_err']:.1e}") for r in records]))
  print(f"wrote {args.out}")
  return dict(header=header, records=records, summary=s)


if __name__ == "__main__":
  main()
