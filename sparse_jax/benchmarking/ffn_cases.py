"""The case grid of the FFN benchmarks (``experiments/bench_ffn.py``, ``bench_ffn_train.py``):
shapes x token counts x activity distributions x densities, the command-line flags that choose
it (with ``--quick`` and ``--cpu-smoke`` presets), and the shared measurements (error against
float32, the per-token activity of a problem).

Every case of one (shape, M) has the same argument shapes, so each timed function compiles once
per (shape, M) and is reused for every distribution and density.
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.synthetic import DISTRIBUTIONS, FFNProblem, make_ffn_problem

DENSITIES = (11.0, 28.0, 56.0, 168.0, 560.0)   # active neurons per token (of d_ff 5632)
PAPER_SHAPE = "2048x5632"                     # the paper's 2B FFN: d_model x d_ff
OTHER_SHAPES = ("1024x8192", "4096x11008", "4096x14336")
# --cpu-smoke: the XLA implementation at a tiny size, so the script's whole path runs anywhere.
SMOKE = dict(shape=["128x1024"], m=[512], active=[8.0, 28.0], rounds=2, calls_per_round=2,
             err_rows=256)
QUICK = dict(rounds=5, calls_per_round=5, cupti_iterations=3, err_rows=1024)
FULL = dict(rounds=15, calls_per_round=10, cupti_iterations=10, err_rows=2048)


@dataclasses.dataclass(frozen=True)
class Case:
  m: int
  d_model: int
  d_ff: int
  distribution: str
  active: float
  seed: int

  def problem(self, seq_len: int) -> FFNProblem:
    return make_ffn_problem(jax.random.key(self.seed), self.m, self.d_model, self.d_ff,
                            active_per_token=self.active, distribution=self.distribution,
                            seq_len=seq_len)

  def fields(self) -> dict:
    return dict(M=self.m, d_model=self.d_model, d_ff=self.d_ff, distribution=self.distribution,
                target_active=self.active)


def parse_shape(text: str) -> tuple[int, int]:
  try:
    d_model, d_ff = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--shape {text!r}: expected D_MODELxD_FF, e.g. 2048x5632")
  if d_model < 2 or d_ff < 1:
    raise argparse.ArgumentTypeError(f"--shape {text!r}: d_model >= 2 and d_ff >= 1")
  return d_model, d_ff


def add_grid_args(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--shape", nargs="+", type=parse_shape, default=None, metavar="DxF",
                  help=f"d_model x d_ff (default {PAPER_SHAPE}, the paper's 2B FFN; others: "
                       f"{' '.join(OTHER_SHAPES)})")
  ap.add_argument("--m", type=int, nargs="+", default=None, help="tokens per call (default 16384)")
  ap.add_argument("--dist", nargs="+", default=list(DISTRIBUTIONS), choices=DISTRIBUTIONS,
                  help="activity distributions (sparse_jax.synthetic; default all)")
  ap.add_argument("--active", type=float, nargs="+", default=None,
                  help="target active neurons per token (default 11 28 56 168 560, for d_ff "
                       "5632; other d_ff scale them by d_ff / 5632)")
  ap.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (dense_starts)")
  ap.add_argument("--rounds", type=int, help="side-by-side rounds (median reported)")
  ap.add_argument("--calls-per-round", type=int, help="back-to-back calls per candidate turn")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--quick", action="store_true",
                  help="fewer rounds and CUPTI iterations: the whole grid at M=16384 in ~2-3 "
                       "minutes on an H200")
  ap.add_argument("--cpu-smoke", action="store_true",
                  help="run the whole script on the CPU with the XLA implementation at a tiny "
                       "size (numbers mean nothing; checks that it runs end to end)")


def resolve(args) -> dict:
  """Timing settings (rounds, calls_per_round, cupti_iterations, err_rows) from the presets and
  explicit flags; fills ``args.shape``, ``args.m``, ``args.active`` defaults."""
  settings = dict(FULL)
  if args.quick:
    settings.update(QUICK)
  if args.cpu_smoke:
    settings.update({k: v for k, v in SMOKE.items() if k in settings})
    for k in ("shape", "m", "active"):
      if getattr(args, k) is None:
        setattr(args, k, SMOKE[k])
  args.shape = [parse_shape(s) if isinstance(s, str) else s for s in (args.shape or [PAPER_SHAPE])]
  args.m = args.m or [16384]
  for k in ("rounds", "calls_per_round"):
    if getattr(args, k) is not None:
      if getattr(args, k) < 1:
        raise SystemExit(f"--{k.replace('_', '-')} must be positive")
      settings[k] = getattr(args, k)
  if any(m < 1 for m in args.m):
    raise SystemExit(f"--m must be positive, got {args.m}")
  return settings


def cases_for(args, m: int, d_model: int, d_ff: int) -> list[Case]:
  """The distribution x density cases of one (shape, M); densities default to the paper-shape
  list scaled to this d_ff. Every case draws the same random inputs and weights (one seed): the
  cases differ only in the gate thresholds and per-token scales that set their activity."""
  active = args.active or [round(a * d_ff / 5632, 1) for a in DENSITIES]
  out = []
  for dist in args.dist:
    for a in active:
      if not 0 < a <= d_ff:
        raise SystemExit(f"--active {a}: must be in (0, d_ff={d_ff}]")
      out.append(Case(m, d_model, d_ff, dist, float(a), seed=args.seed))
  return out


def rel_err_f32(y, p: FFNProblem, rows: np.ndarray) -> float:
  """||y - y_f32|| / ||y_f32|| over ``rows``, y_f32 the FFN in float32 at highest precision."""
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  x = f32(p.x[rows])
  hp = jax.lax.Precision.HIGHEST
  h = (jnp.maximum(jnp.dot(x, f32(p.w_gate).T, precision=hp), 0)
       * jnp.dot(x, f32(p.w_up).T, precision=hp))
  ref = jnp.dot(h, f32(p.w_down), precision=hp)
  return float(jnp.linalg.norm(f32(y[rows]) - ref) / jnp.linalg.norm(ref))


def error_rows(m: int, n: int) -> np.ndarray:
  """``n`` rows spread over [0, m), the first row (a sequence start) included."""
  return np.unique(np.linspace(0, m - 1, min(m, n)).astype(np.int32))


def activity_fields(p: FFNProblem) -> dict:
  """The per-token activity the problem gives the op: mean, p50, p99, max active neurons."""
  counts = np.asarray(p.active_counts())
  return dict(active_per_token=float(counts.mean()), active_p50=float(np.percentile(counts, 50)),
              active_p99=float(np.percentile(counts, 99)), active_max=int(counts.max()))


def sparse_implementation(requested: str | None, cpu_smoke: bool) -> str:
  """The op backend to benchmark: ``xla`` for --cpu-smoke, else the requested one, else the
  first non-XLA implementation the op offers."""
  if cpu_smoke:
    return "xla"
  if requested:
    return requested
  from sparse_jax import ops
  listed = getattr(ops, "available_implementations", lambda: ["xla", "pallas"])()
  names = [n for n in listed if n != "xla"]
  if not names:
    raise SystemExit("no accelerated implementation of the sparse FFN is available here")
  return names[0]


def require_platform(args, script: str) -> None:
  if not args.cpu_smoke and jax.devices()[0].platform != "gpu":
    raise SystemExit(f"{script} needs a GPU (it times Mosaic GPU kernels); --cpu-smoke runs it "
                     "on the CPU with the XLA implementation")


def run_grid(args, settings: dict, header: dict, *, compile_fns, wall_case, cupti_case, row,
             summary, use_cupti: bool, extra: dict) -> list[dict]:
  """Every case of the grid: per (shape, M) ``compile_fns(first case) -> (fns, seconds)`` once,
  then ``wall_case(case, fns) -> record`` for each case (a table row printed, the JSON at
  ``args.out`` rewritten after each); CUPTI (``cupti_case(case, record, fns)``, in place) only
  after every wall-clock measurement of the run, since an attached CUPTI can inflate wall times.
  """
  from sparse_jax.benchmarking.results import write_results
  records, done = [], []
  for d_model, d_ff in args.shape:
    for m in args.m:
      cases = cases_for(args, m, d_model, d_ff)
      fns, compile_s = compile_fns(cases[0])
      print(f"M={m} {d_model}x{d_ff}: compiled in {compile_s:.0f} s", flush=True)
      for case in cases:
        rec = dict(wall_case(case, fns), compile_s=compile_s, **extra)
        done.append((case, rec, fns))
        records.append(rec)
        print("  " + " | ".join(row(rec)), flush=True)
        write_results(args.out, header, records, summary=summary(records))
  if use_cupti:
    for case, rec, fns in done:
      cupti_case(case, rec, fns)
    write_results(args.out, header, records, summary=summary(records))
  return records


# ------------------------------------------------------------------------------ decode regime

DECODE_DRAW_TOKENS = 256  # decode problems are drawn at this many tokens, then cut to B


def decode_problems(seed: int, layers: int, b: int, d_model: int, d_ff: int, *, active: float,
                    distribution: str) -> list[FFNProblem]:
  """One problem per layer (own weights, so a stack of layers streams from HBM as in a model)
  with B tokens: drawn at ``max(B, DECODE_DRAW_TOKENS)`` tokens, where the generator's per-token
  activity holds, then the first B kept (``experiments/bench_decode_ffn.py``, ``tune_decode.py``)."""
  keys = jax.random.split(jax.random.key(seed), layers)
  probs = [make_ffn_problem(k, max(b, DECODE_DRAW_TOKENS), d_model, d_ff,
                            active_per_token=active, distribution=distribution) for k in keys]
  return [dataclasses.replace(p, x=p.x[:b]) for p in probs]


LAYER_LAYOUTS = ("unrolled", "stacked", "scan")


def layer_inputs(probs: list[FFNProblem], layout: str) -> tuple:
  """(x, w_gate, w_up, w_down) of every layer: lists of arrays ("unrolled") or stacked arrays."""
  if layout not in LAYER_LAYOUTS:
    raise ValueError(f"layout must be one of {LAYER_LAYOUTS}, got {layout!r}")
  names = ("x", "w_gate", "w_up", "w_down")
  if layout == "unrolled":
    return tuple([getattr(p, nm) for p in probs] for nm in names)
  return tuple(jnp.stack([getattr(p, nm) for p in probs]) for nm in names)


def over_layers(f, layout: str):
  """A jitted call of ``f(x, wg, wu, wd)`` on every layer of ``layer_inputs(..., layout)``:
  "unrolled" a Python loop over separate arrays, "stacked" a Python loop over static slices of
  the stacks, "scan" ``lax.map`` over the stacks (XLA copies a layer's slices before a Triton
  GEMM fusion reads them; Pallas kernels read them in place)."""
  if layout == "scan":
    return jax.jit(lambda *ws: jax.lax.map(lambda a: f(*a), ws))
  if layout == "stacked":
    return jax.jit(lambda *ws: jnp.stack([f(*(w[i] for w in ws)) for i in range(ws[0].shape[0])]))
  if layout == "unrolled":
    return jax.jit(lambda *ws: jnp.stack([f(*a) for a in zip(*ws)]))
  raise ValueError(f"layout must be one of {LAYER_LAYOUTS}, got {layout!r}")
