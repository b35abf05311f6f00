"""L1 sparsity study on English prose: an L1 sweep, sparsity vs quality, dead neurons, and where
the sparsity lives (layers, positions, surprisal), set beside the paper's claims.

Runs (one model config, the same data, token budget, optimiser and seed):

* ``silu_dense``: the dense SiLU-gated FFN (``model.ffn=silu_dense``), no L1 (the usual baseline);
* ``relu_l1_0``: the paper's ReLU-gated FFN (``model.ffn=relu_sparse``) without L1;
* ``relu_l1_<c>``: the ReLU-gated FFN with L1 coefficient c, by default five values log-spaced
  from 1e-5 to 1e-3 in the released code's normalisation (``train.l1_norm=sum_neurons``: |h|
  summed over the d_ff neurons, averaged over tokens and layers; the released checkpoints use
  2e-5). The paper's formula (``mean``: averaged over neurons too) needs c x d_ff for the same
  penalty; the report lists both.

Every run shares the preset's model, batch, sequence length and learning rate, ``--steps``
(the LR schedule ends there; warm-up min(preset, steps / 5)), data ``--data`` (default
``stdlib-prose``, ~2.2 MB, so the small preset's default 1000 steps of 32 x 512 tokens are ~8
epochs: the report records the epochs and how far validation loss ended above its lowest value),
``data.val_fraction`` ``--val-fraction``, an evaluation every steps / 10, a checkpoint every
steps / 2 (one kept), and ``--set`` overrides.

Each run trains in ``OUT/runs/<name>/`` (checkpoints, metrics.jsonl, curves.png; put OUT under the
git-ignored ``runs/``), is then evaluated on the validation split (``sparse_jax.eval``: loss,
active neurons per token per layer, neurons never active on it, sparsity by position and by
surprisal), and its numbers go to ``RESULTS/runs/<name>.json`` (small; commit these). A run whose
JSON exists with the same settings is skipped; a run with checkpoints resumes (exactly) from the
latest one. With ``--max-minutes`` the sweep starts no run it cannot give useful time, hands the
running one a deadline (it saves a checkpoint and stops), and writes the report of what is done,
so several invocations finish the sweep:

    PYTHONPATH=$PWD python3 experiments/study_l1.py --max-minutes 9     # repeat until complete
    python3 experiments/study_l1.py --report-only                       # report from the JSONs
    python3 experiments/study_l1.py --plan                              # runs and their status

The report (``--results``, default experiments/results/study/): ``study.json`` (device, command,
config, corpus size, token budget, per-run metrics, the claim comparison), ``table.md``, plots
(val loss, active neurons per layer and dead neurons vs the coefficient, sparsity over training,
active neurons vs position and vs surprisal), and ``--doc`` (default docs/study_l1.md), a summary
that sets the numbers beside the paper's claims, written from the numbers.

Settling (``sparse_jax.eval.study_report``): a(t) is the logged training EMA of active neurons per token (``l0_ema_L``, mean over
layers, EMA decay ``train.l0_ema_decay`` per step); its final value is the mean of the last
``SETTLE_TAIL`` (5) logged values; the run settles at the first logged step from which on a(t)
stays within ``SETTLE_TOL`` (10%) relative of that final value.
"""
from __future__ import annotations

import time

_T0 = time.monotonic()  # the --max-minutes budget counts from here (imports included)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import glob  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

from sparse_jax.benchmarking.results import load_json, write_json  # noqa: E402
from sparse_jax.config import Config, apply_overrides, get_config  # noqa: E402
from sparse_jax.eval import study_report  # noqa: E402
from sparse_jax.eval.study_report import run_result  # noqa: E402

DEFAULT_COEFFS = tuple(float(c) for c in np.logspace(-5, -3, 5))
# Steps per run when --steps is not given: small ~90 s on one H200 (its 2000-step run took 182 s
# at ~80 ms/step: 1000 steps ~80 s of training plus compilation and evaluation).
DEFAULT_STEPS = {"tiny": 300, "small": 1000, "base": 250}
# Runs set these per run; --set may not.
_PER_RUN_FIELDS = ("model.ffn", "train.l1_coeff", "train.l1_norm", "train.max_minutes")


def _write(path: str, obj) -> None:
  write_json(path, obj, indent=1, allow_nan=False)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  name: str
  ffn: str
  l1_coeff: float


def run_name(coeff: float) -> str:
  return "relu_l1_0" if coeff == 0 else f"relu_l1_{coeff:.2e}"


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__,
      epilog="Example (GPU, resumable across invocations): PYTHONPATH=$PWD python "
             "experiments/study_l1.py --config small --max-minutes 9. CPU smoke run: python "
             "experiments/study_l1.py --config tiny --steps 20 --coeffs 0 1e-3 --out /tmp/s "
             "--results /tmp/s/results --doc /tmp/s/study.md",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="small", choices=("tiny", "small", "base"),
                 help="model preset; its batch size, sequence length and learning rate are "
                      "used (default small)")
  p.add_argument("--steps", type=int,
                 help="optimiser steps per run, the token budget = steps x batch x seq_len "
                      "(default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items())
                      + "; small ~90 s per run on one H200)")
  p.add_argument("--coeffs", type=float, nargs="+", default=[0.0, *DEFAULT_COEFFS],
                 metavar="C", help="L1 coefficients of the ReLU runs in the released code's "
                                   "normalisation (sum over the d_ff neurons); 0 = no L1 "
                                   "(default: 0 and 1e-5 ... 1e-3, five log-spaced values)")
  p.add_argument("--no-silu", action="store_true", help="leave out the dense SiLU-gated baseline")
  p.add_argument("--data", default="stdlib-prose",
                 help="data.source (default stdlib-prose: standard-library docstrings and "
                      "pydoc topics)")
  p.add_argument("--val-fraction", type=float, default=0.05,
                 help="data.val_fraction: share of the corpus held out for validation "
                      "(default 0.05)")
  p.add_argument("--batch-size", type=int,
                 help="train.batch_size (sequences per step; default: the preset's)")
  p.add_argument("--eval-batches", type=int, default=16,
                 help="validation batches (of the preset's micro-batch) for the in-training and "
                      "final evaluations, at most what the validation split holds "
                      "(default 16)")
  p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                 metavar="SECTION.FIELD=VALUE",
                 help="further config overrides for every run (not model.ffn / train.l1_*)")
  p.add_argument("--out", help="run directories go to OUT/runs/<name>/ (checkpoints; keep it "
                               "under the git-ignored runs/; default runs/study_l1_<config>)")
  p.add_argument("--results", default="experiments/results/study",
                 help="report directory: study.json, table.md, plots, runs/<name>.json "
                      "(default experiments/results/study)")
  p.add_argument("--doc", default="docs/study_l1.md",
                 help="the generated summary, Markdown (default docs/study_l1.md)")
  p.add_argument("--max-minutes", type=float,
                 help="wall-clock budget of this invocation: no run starts without "
                      "--reserve-s + --min-train-s left; the running one stops (saved) in time")
  p.add_argument("--reserve-s", type=float, default=60.0,
                 help="seconds kept for a run's set-up, final evaluation and the report "
                      "(default 60)")
  p.add_argument("--min-train-s", type=float, default=20.0,
                 help="do not start (or resume) a run with less training time than this "
                      "left (default 20)")
  p.add_argument("--max-runs", type=int, help="train at most this many runs in this invocation")
  p.add_argument("--stop-at", type=int, help=argparse.SUPPRESS)  # tests: interrupt at this step
  p.add_argument("--fresh", action="store_true",
                 help="delete this study's run directories and per-run JSONs first")
  p.add_argument("--report-only", action="store_true",
                 help="only write the report from RESULTS/runs/*.json (no JAX, no training)")
  p.add_argument("--no-report", action="store_true", help="train only; no report at the end")
  p.add_argument("--plan", action="store_true", help="print the runs and their status, then exit")
  p.add_argument("--no-progress", action="store_true", help="no per-step progress bars")
  args = p.parse_args(argv)
  for name in ("steps", "eval_batches", "batch_size", "max_runs", "stop_at"):
    v = getattr(args, name)
    if v is not None and v < 1:
      p.error(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
  if any(c < 0 or not math.isfinite(c) for c in args.coeffs):
    p.error(f"--coeffs must be finite and non-negative, got {args.coeffs}")
  if len(set(args.coeffs)) != len(args.coeffs):
    p.error(f"--coeffs has repeated values: {args.coeffs}")
  if args.max_minutes is not None and args.max_minutes <= 0:
    p.error("--max-minutes must be positive")
  for item in args.overrides:
    if item.split("=", 1)[0].strip() in _PER_RUN_FIELDS:
      p.error(f"--set {item}: the study sets {', '.join(_PER_RUN_FIELDS)} per run")
  args.out = args.out or f"runs/study_l1_{args.config}"
  args.steps = args.steps or DEFAULT_STEPS[args.config]
  return args


# --------------------------------------------------------------------------- configs


def study_config(args) -> Config:
  """The settings every run shares (the preset, the study's data and cadences, --set)."""
  cfg = get_config(args.config)
  t, steps = cfg.train, args.steps
  over = [f"data.source={args.data}", f"data.val_fraction={args.val_fraction}",
          f"train.steps={steps}",
          f"train.warmup_steps={min(t.warmup_steps, max(1, steps // 5))}",
          f"train.log_every={max(1, min(t.log_every, steps // 20))}",
          f"train.eval_every={max(1, steps // 10)}", f"train.eval_batches={args.eval_batches}",
          f"train.ckpt_every={max(1, steps // 2)}", "train.keep_checkpoints=1"]
  if args.batch_size:
    over.append(f"train.batch_size={args.batch_size}")
  cfg = apply_overrides(cfg, over + list(args.overrides))
  return apply_overrides(cfg, ["train.l1_norm=sum_neurons"])


def plan_runs(args) -> list[RunSpec]:
  runs = [] if args.no_silu else [RunSpec("silu_dense", "silu_dense", 0.0)]
  runs += [RunSpec(run_name(c), "relu_sparse", c) for c in sorted(args.coeffs)]
  return runs


def run_config(base: Config, spec: RunSpec) -> Config:
  return dataclasses.replace(
      base, name=base.name, model=dataclasses.replace(base.model, ffn=spec.ffn),
      train=dataclasses.replace(base.train, l1_coeff=spec.l1_coeff, max_minutes=None))


def _resolved(cfg: Config) -> dict:
  from sparse_jax.data import load_tokenizer
  d = cfg.to_dict()
  d["model"]["vocab_size"] = cfg.model.resolve_vocab(
      load_tokenizer(cfg.data.tokenizer).vocab_size).vocab_size
  return d


def _config_diff(saved: dict, now: dict) -> dict:
  """{"section.field": (saved, now)} over the fields that define a run (budget excluded)."""
  out = {}
  for section in ("model", "data", "train"):
    for k, v in now[section].items():
      if k != "max_minutes" and saved.get(section, {}).get(k) != v:
        out[f"{section}.{k}"] = (saved.get(section, {}).get(k), v)
  return out



def corpus_info(cfg: Config) -> tuple[dict, object]:
  """(size of the study's corpus, the Corpus itself)."""
  from sparse_jax.data import build_corpus, iter_documents, load_tokenizer
  from sparse_jax.data.sources import STDLIB_PROSE, stdlib_prose_documents
  tok = load_tokenizer(cfg.data.tokenizer)
  corpus = build_corpus(cfg.data, tok, progress=False)
  docs = list(iter_documents(cfg.data))
  info = dict(source=cfg.data.source, python=platform.python_version(),
              tokenizer=cfg.data.tokenizer, documents=len(docs),
              bytes=sum(len(d.encode("utf-8")) for d in docs),
              train_tokens=int(len(corpus.train_tokens)),
              val_tokens=int(len(corpus.val_tokens)), val_fraction=cfg.data.val_fraction)
  if cfg.data.source == STDLIB_PROSE:
    parts: dict[str, dict] = {}
    for (kind, text), _ in zip(stdlib_prose_documents(), docs):
      part = parts.setdefault(kind, dict(documents=0, bytes=0))
      part["documents"] += 1
      part["bytes"] += len(text.encode("utf-8"))
    info["parts"] = parts
  return info, corpus


def _device() -> str:
  import jax
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', d.platform)} x{jax.device_count()}"


def _records(path: str) -> list[dict]:
  from sparse_jax.train.metrics import read_records
  return read_records(path)


# --------------------------------------------------------------------------- the sweep


def _latest_checkpoint(run_dir: str) -> int | None:
  ck = os.path.join(run_dir, "checkpoints")
  steps = [int(n) for n in os.listdir(ck) if n.isdigit()] if os.path.isdir(ck) else []
  return max(steps) if steps else None


def run_status(spec: RunSpec, cfg_dict: dict, args) -> tuple[str, int | None]:
  """("done" | "partial" | "pending", latest checkpoint step); errors on other settings."""
  path = os.path.join(args.results, "runs", f"{spec.name}.json")
  run_dir = os.path.join(args.out, "runs", spec.name)
  found = path if os.path.exists(path) else os.path.join(run_dir, "result.json")
  done = load_json(found)  # the copy beside the checkpoints serves a fresh results folder
  if done is not None:
    diff = _config_diff(done["config"], cfg_dict)
    if diff:
      raise SystemExit(f"{found} holds a run with other settings (saved, now): {diff}; use "
                       "another --results and --out, or --fresh")
    if found != path:
      _write(path, done)
    return "done", done["steps"]
  step = _latest_checkpoint(run_dir)
  saved = load_json(os.path.join(run_dir, "config.json"))
  if step is not None and saved is not None:
    diff = _config_diff(saved, cfg_dict)
    if diff:
      raise SystemExit(f"{run_dir} holds a run with other settings (saved, now): {diff}; use "
                       "another --out or --fresh")
  return ("partial" if step is not None else "pending"), step


def _row(res: dict) -> str:
  s = res["settle"]["step"]
  return (f"{res['name']:<20} {res['steps']:>6} {res['val_ce']:>8.4f} {res['val_ppl']:>8.3f} "
          f"{res['mean_active']:>9.1f} {res['sparsity_pct']:>8.2f} {res['dead_pct']:>7.1f} "
          f"{'-' if s is None else s:>7} {res['train_wall_s']:>7.0f}")


_HEADER = (f"{'run':<20} {'steps':>6} {'val CE':>8} {'ppl':>8} {'active/tok':>9} {'sparse%':>8} "
           f"{'dead%':>7} {'settle':>7} {'wall s':>7}")


def sweep(args) -> dict[str, str]:
  """Trains and evaluates the pending runs; returns {run: what happened in this invocation}."""
  budget = None if args.max_minutes is None else 60 * args.max_minutes
  left = lambda: math.inf if budget is None else budget - (time.monotonic() - _T0)  # noqa: E731
  base = study_config(args)
  runs = plan_runs(args)
  cfgs = {s.name: run_config(base, s) for s in runs}
  dicts = {s.name: _resolved(cfgs[s.name]) for s in runs}
  if args.fresh:
    for s in runs:
      shutil.rmtree(os.path.join(args.out, "runs", s.name), ignore_errors=True)
      path = os.path.join(args.results, "runs", f"{s.name}.json")
      if os.path.exists(path):
        os.remove(path)
  status = {s.name: run_status(s, dicts[s.name], args) for s in runs}
  corpus, tokens = corpus_info(base)
  tcfg = base.train
  budget_tokens = tcfg.steps * tcfg.batch_size * base.data.seq_len
  print(f"L1 study: config {base.name}, {len(runs)} runs of {tcfg.steps} steps x "
        f"{tcfg.batch_size} x {base.data.seq_len} = {budget_tokens:,} tokens "
        f"({budget_tokens / corpus['train_tokens']:.2f} epochs of the training split)")
  print(f"corpus {corpus['source']}: {corpus['documents']} documents, {corpus['bytes']:,} bytes; "
        f"{corpus['train_tokens']:,} train / {corpus['val_tokens']:,} validation tokens "
        f"(tokenizer {corpus['tokenizer']}, Python {corpus['python']})")
  for s in runs:
    st, step = status[s.name]
    print(f"  {s.name:<20} {s.ffn:<12} L1 {s.l1_coeff:<9.3g} {st}"
          + (f" (checkpoint at step {step})" if st == "partial" else ""))
  actions = {s.name: "skipped (done)" for s in runs if status[s.name][0] == "done"}
  if args.plan:
    return actions
  from sparse_jax.data import validation_batches
  from sparse_jax.eval import evaluate_lm
  from sparse_jax.train import load_model, train
  micro = tcfg.batch_size // tcfg.grad_accum
  val = validation_batches(tokens.val_tokens, base.data.seq_len, micro, args.eval_batches)
  command = "python experiments/study_l1.py " + shlex.join(args.argv)
  print(_HEADER)
  trained = 0
  for s in runs:
    if status[s.name][0] == "done":
      continue
    if args.max_runs is not None and trained >= args.max_runs:
      print(f"--max-runs {args.max_runs}: stopping before {s.name}")
      break
    if left() < args.reserve_s + args.min_train_s:
      print(f"time budget: {left():.0f} s left, stopping before {s.name}; rerun the same "
            "command to continue")
      break
    cfg = cfgs[s.name]
    if budget is not None:
      cfg = dataclasses.replace(cfg, train=dataclasses.replace(
          cfg.train, max_minutes=(left() - args.reserve_s) / 60))
    run_dir = os.path.join(args.out, "runs", s.name)
    resumed_from = status[s.name][1]
    t0 = time.monotonic()
    summary = train(cfg, run_dir, stop_at=args.stop_at, progress=not args.no_progress)
    trained += 1
    wall_path = os.path.join(run_dir, "study_wall.json")
    walls = (load_json(wall_path) or {}).get("train_wall_s", []) + [time.monotonic() - t0]
    _write(wall_path, dict(train_wall_s=walls))
    if summary["steps"] < tcfg.steps:
      actions[s.name] = f"partial (step {summary['steps']}, {summary['stop_reason']})"
      print(f"{s.name}: stopped at step {summary['steps']} of {tcfg.steps} "
            f"({summary['stop_reason']}); rerun the same command to resume it")
      break
    model, _, step = load_model(run_dir)
    if step != summary["steps"]:
      raise RuntimeError(f"{run_dir}: the latest checkpoint is step {step}, the run ended at "
                         f"{summary['steps']}")
    lm = evaluate_lm(model, val, progress=False).result()
    del model
    gc.collect()  # the finished run's device buffers, before the next run allocates its own
    res = run_result(s, dicts[s.name], summary, lm, _records(os.path.join(run_dir,
                                                                          "metrics.jsonl")),
                     dict(train_wall_s=float(sum(walls)), invocations=len(walls),
                          planned=[x.name for x in runs],
                          device=_device(), command=command, corpus=corpus,
                          date=datetime.datetime.now(datetime.timezone.utc)
                          .isoformat(timespec="seconds")))
    _write(os.path.join(run_dir, "result.json"), res)
    _write(os.path.join(args.results, "runs", f"{s.name}.json"), res)
    actions[s.name] = ("trained" if resumed_from is None
                       else f"resumed from step {resumed_from}")
    print(_row(res), flush=True)
  return actions



def report(args) -> dict | None:
  """Writes study.json, table.md, the plots and the doc from RESULTS/runs/*.json."""
  paths = sorted(glob.glob(os.path.join(args.results, "runs", "*.json")))
  results = study_report.order([load_json(p) for p in paths])
  if not results:
    print(f"no finished runs in {args.results}/runs/: nothing to report")
    return None
  # The sweep that wrote the newest JSON names the runs it plans.
  planned = max(results, key=lambda r: r["date"]).get("planned") or [
      s.name for s in plan_runs(args)]
  r0 = results[0]
  for r in results[1:]:
    diff = {k: v for k, v in _config_diff(r0["config"], r["config"]).items()
            if k not in ("model.ffn", "train.l1_coeff")}
    if diff:
      raise SystemExit(f"{args.results}/runs: {r['name']} and {r0['name']} differ in more than "
                       f"the FFN and L1 coefficient: {diff}")
  study = study_report.build_study(results, results_dir=args.results, planned=planned)
  return study_report.write_report(study, results, results_dir=args.results, doc=args.doc)


def run(argv: list[str]) -> dict:
  """The script's work; returns {"actions": {run: what happened}, "study": report or None}."""
  args = parse_args(argv)
  args.argv = argv
  actions = {}
  if not args.report_only:
    actions = sweep(args)
    if args.plan:
      return dict(actions=actions, study=None)
  study = None if args.no_report else report(args)
  return dict(actions=actions, study=study)


def main(argv: list[str] | None = None) -> int:
  run(sys.argv[1:] if argv is None else argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
