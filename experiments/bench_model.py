"""End-to-end model benchmark: dense vs sparse whole models, throughput, energy and peak memory.

For each config (``--configs``, default 0.5b,1b,1.5b,2b) and mode (``--modes``):

* ``forward``: prefill, the full forward of ``batch x seq`` tokens to the logits (the paper's
  inference benchmark: batch 64 x 2048), parameters stored in the compute dtype (bf16);
* ``train``: one full training step, ``sparse_jax.train.train_step`` (forward, backward with the
  L1 term, AdamW update; fp32 master weights, the preset's remat), on ``batch x seq`` tokens;

it times the **dense** model (``model.ffn=relu_dense_bf16``: the dense FFN as a bf16 model
computes it, every matmul output in bf16, built from the config like any other run) and the **sparse** model (``model.ffn=relu_sparse``,
``ffn_impl=pallas``: the Pallas TwELL kernels with the on-device dense/sparse dispatch), with the
same weights (both FFN kinds have the same parameters; the same seed and calibration give the
same values, or ``--checkpoint`` loads them into either kind).

Sparsity. ``--checkpoint DIR`` (a run directory or a Hugging Face Llama directory) benchmarks a
trained model as it is. Otherwise a fresh model is calibrated (``sparse_jax.calibrate``): a
constant residual channel plus per-neuron gate thresholds in the weights (no biases, no kernel
change), set layer by layer on a calibration batch so that the mean active fraction is
``1 - sparsity`` (``--sparsity 0.995,0.99``: ~28 and ~56 of 5632 neurons per token) with the FFN
benchmark's per-neuron profile (``--profile skewed``: 30% dead neurons, log-uniform rates, a
per-token scale). The achieved activity is measured, never assumed: ``sparsity_measured`` is the
sparse op's own count on the timed batch (forward: a separate stats pass; train: the last timed
step's metrics); ``sparsity_measured_walk`` counts it on other tokens from the dense FFN, per layer
with the per-token tail (p50/p99/max). ``dense_fallback_share`` is the share of layers whose
dispatcher took the dense path (it does when the probe estimate exceeds
``SparseFFNConfig.max_active_fraction``, ~1%: the 0.99 rows sit near that line).

Training dispatch. By default (``train.dispatch=auto``, which is ``auto_host`` for a sparse FFN) and
with ``--set train.dispatch=auto_host [train.hot_cold=true]`` the sparse model's step is the run
loop's host dispatcher's; ``--set train.dispatch=device`` times the on-device dispatcher,
``--set train.dispatch=sparse|dense`` one static mode for every layer. With the host dispatcher
``--settle-steps`` steps run first with a decision after each (per-layer sparse/dense
with hysteresis and, with hot_cold, each sparse layer's hot/cold split and neuron reordering),
then the step of the pattern it settled on is compiled and timed (``dispatch_pattern``). The
dense model always runs its plain step.

Timing is wall clock: jit and compile once (``lower().compile()``, whose ``memory_analysis`` gives
the peak), warm up, then ``--windows`` windows of back-to-back calls (``block_until_ready`` at each
window's end, outputs released as the next call is queued) lasting ``--min-seconds`` in all; the
median window gives tokens/ms. CUPTI kernel timing cannot be used: the sparse path's dispatch is a
device-side ``lax.cond`` whose kernels CUPTI does not see. Energy: NVML's total-energy counter
(``nvmlDeviceGetTotalEnergyConsumption``, mJ) read around the timed windows, or, where the counter
is unsupported, ``nvmlDeviceGetPowerUsage`` sampled every 10 ms by a thread and integrated
(``energy_method`` says which); mJ per token = energy / tokens, the whole board of the GPU that JAX
uses. Peak memory: ``peak_bytes_*`` is XLA's compiled ``memory_analysis`` of the timed function
(argument + output + temp - alias bytes: what that step needs), ``peak_bytes_in_use_*`` the device
allocator's ``memory_stats()['peak_bytes_in_use']`` of the process that ran it (parameters,
calibration and the timed calls; each model runs in its own process on a GPU, so this is per model).

Isolation and budget. On a GPU each (config, mode, model) job runs in a child process
(``--isolate``): memory is freed between jobs, an OOM or a crash costs one row (recorded as
``error_dense`` / ``error_sparse``), and the allocator peak is per job. Children get
``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` unless it is set. ``--max-minutes`` is a wall budget for
the invocation: a job that would not fit (judged by the last job of that config and mode) is
skipped and a running child is killed at the budget; the JSON is rewritten after every job and
merged with what ``--out`` already holds (a row is replaced by a new measurement of the same
config, mode, sparsity, batch, seq and settings, unless the new one is incomplete and the old one
is not), so configs can run in separate invocations. ``--dry-run`` prints the plan and the memory
estimates without running anything.

The memory estimate (``estimate_peak_bytes``, formulas and a table in
``sparse_jax.benchmarking.model_rows``) shows the defaults fit an H200 and an H100. The compiled
``memory_analysis`` is checked against the device's ``bytes_limit`` before a run, so a batch that
cannot fit is reported without an OOM. Shared plumbing (energy meter, timed windows, memory
analysis, result files and their merging) lives in ``sparse_jax.benchmarking``.

    # on the GPU: one (config, mode) per invocation fits a 9-minute cap; results merge
    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 experiments/bench_model.py --configs 2b \\
        --modes forward --max-minutes 8 --out experiments/results/bench_model_h200.json
    # CPU smoke run (XLA reference as the sparse path; numbers mean nothing)
    python experiments/bench_model.py --quick --out /tmp/bench_model.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import shlex
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# Pure Python (no JAX initialised here: the parent must not take GPU memory from its children).
from sparse_jax.benchmarking import (EnergyMeter, allocator_stats, check_fits,  # noqa: E402
                                     compiled_memory, device_name, gpu_platform_expected,
                                     run_in_child, timed_windows)
from sparse_jax.benchmarking.model_rows import (MODES, VARIANTS, estimate_peak_bytes,  # noqa: E402
                                                activity_fields, format_rows, make_rows,
                                                merge_results, op_stats_fields,
                                                param_count, plot, row_key)
from sparse_jax.benchmarking.results import child_result_path, short_error  # noqa: E402
from sparse_jax.config import ModelConfig, apply_overrides, get_config  # noqa: E402
from sparse_jax.synthetic import NEURON_PROFILES as PROFILES  # noqa: E402
DEFAULT_CONFIGS = ("0.5b", "1b", "1.5b", "2b")
DEFAULT_BATCH = {"forward": 64, "train": 16}
FROZEN_WARMUP = 10**9
# The dense model's FFN kind (recorded in every row; rows of earlier runs whose baseline was a
# bf16-output FFN class swapped into the model say "bf16" and stay separate rows).
DENSE_BASELINE = "relu_dense_bf16"
QUICK = dict(configs="tiny", seq=64, batch="2", calib_batch=8, min_seconds=0.3, windows=2,
             warmup=1)


def resolved_model_config(config: str, overrides: list[str]) -> ModelConfig:
  cfg = apply_overrides(get_config(config), overrides)
  m = cfg.model
  if m.vocab_size is None:  # the byte tokenizer's 259 ids, padded to a multiple of 128
    from sparse_jax.data import load_tokenizer
    m = m.resolve_vocab(load_tokenizer(cfg.data.tokenizer).vocab_size)
  return m


# ------------------------------------------------------------------------------ the job

def resolve_sparse_impl(requested: str, d_model: int) -> tuple[str, str]:
  """(model.ffn_impl, label). auto: the Pallas kernels on a GPU; elsewhere Pallas in interpret
  mode if SPARSE_JAX_PALLAS_INTERPRET=1 and d_model is a multiple of 256, else the XLA
  reference."""
  import jax
  on_gpu = jax.devices()[0].platform == "gpu"
  interpret = os.environ.get("SPARSE_JAX_PALLAS_INTERPRET", "") == "1"
  if requested == "xla":
    return "xla", "xla"
  if requested == "pallas" or on_gpu:
    return "pallas", "pallas" if on_gpu else "pallas-interpret"
  if interpret and d_model % 256 == 0:
    return "pallas", "pallas-interpret"
  return "xla", "xla"


def _token_batch(spec: dict, vocab: int, tokenizer: str, n: int, length: int, seed: int):
  if spec["data"] == "synthetic":
    return np.random.default_rng(seed).integers(0, vocab, size=(n, length), dtype=np.int32)
  from sparse_jax.config import DataConfig
  from sparse_jax.data import Batches, build_corpus, load_tokenizer
  dcfg = DataConfig(source=spec["data"], tokenizer=tokenizer, seq_len=length - 1, seed=seed)
  corpus = build_corpus(dcfg, load_tokenizer(tokenizer), progress=False)
  return Batches(corpus.train_tokens, length - 1, n, seed).next().astype(np.int32)


def _build(spec: dict, variant: str, level: dict):
  """(model, Config, calibration or None) for one sparsity level."""
  from flax import nnx

  from sparse_jax.checkpoints import load_model as load_checkpoint, rebuild
  from sparse_jax.nn import Transformer
  from sparse_jax.train import resolve_config

  impl = spec["ffn_impl"]
  kind = DENSE_BASELINE if variant == "dense" else "relu_sparse"
  if level.get("checkpoint"):
    loaded = load_checkpoint(level["checkpoint"], compute_dtype="bfloat16")
    if loaded.cfg.model.ffn not in ("relu_sparse", "relu_dense", DENSE_BASELINE):
      raise ValueError(f"the checkpoint's FFN is {loaded.cfg.model.ffn!r}: the benchmark compares "
                       "relu_dense with relu_sparse")
    model, cfg = rebuild(loaded.model, loaded.cfg, ffn=kind,
                         ffn_impl=impl if variant == "sparse" else None)
  else:
    cfg, _ = resolve_config(apply_overrides(get_config(spec["config"]), spec["overrides"]))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, ffn=kind, ffn_impl=impl if variant == "sparse" else cfg.model.ffn_impl))
    model = Transformer(cfg.model, rngs=nnx.Rngs(params=spec["seed"]))
  # The learning rate warms up over FROZEN_WARMUP steps: the timed steps compute the full AdamW
  # update, but (lr ~ 0) leave the calibrated weights, hence the measured sparsity, unchanged.
  cfg = apply_overrides(cfg, [f"data.seq_len={spec['seq']}", f"train.batch_size={spec['batch']}",
                              "train.grad_accum=1", f"train.warmup_steps={FROZEN_WARMUP}"])
  calibration = None
  if level.get("target") is not None:
    from sparse_jax.calibrate import calibrate_gates
    tokens = _token_batch(spec, cfg.model.vocab_size, cfg.data.tokenizer, spec["calib_batch"],
                          spec["seq"], seed=1000 + spec["seed"])
    calibration = calibrate_gates(model, tokens, target_active_fraction=1.0 - level["target"],
                                  profile=spec["profile"], seed=spec["seed"])
  return model, cfg, calibration


def run_job(spec: dict) -> dict:
  """One (config, mode, variant) over every sparsity level: build, calibrate, compile once, time,
  measure. Errors are caught per level and returned, so one failure costs one row."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sparse_jax.calibrate import measure_activity
  from sparse_jax.train import init_tracker, make_optimizer
  from sparse_jax.train.dispatch import resolve_kind, static_graphdef
  from sparse_jax.train.loop import step_config
  from sparse_jax.train.step import TrainState, train_step

  t_job = time.perf_counter()
  device = jax.devices()[0]
  mode, variant = spec["mode"], spec["variant"]
  result = dict(config=spec["config"], mode=mode, variant=variant, batch=spec["batch"],
                seq=spec["seq"], device=device_name(device), jax=jax.__version__,
                ffn_impl=spec["ffn_impl"], levels=[])
  meter = EnergyMeter(device)
  result["nvml_device"] = meter.nvml_name
  compiled, compile_s = None, None
  for level in spec["levels"]:
    rec = dict(level)
    try:
      t0 = time.perf_counter()
      model, cfg, calibration = _build(spec, variant, level)
      rec["build_calibrate_s"] = time.perf_counter() - t0
      # every setting the step ran with, defaults included (they change between versions)
      rec["resolved_config"] = {k: v for k, v in cfg.to_dict().items() if k in ("model", "train")}
      m = cfg.model
      rec.update(d_ff=m.d_ff, n_layers=m.n_layers, params=param_count(m),
                 model=dict(ffn=m.ffn, ffn_impl=m.ffn_impl, compute_dtype=m.compute_dtype,
                            remat=m.remat, vocab_size=m.vocab_size, d_model=m.d_model,
                            attention_impl=m.attention_impl))
      if calibration is not None:
        rec.update(calib_fit_active_fraction_L=calibration.fit_active_fraction_L.tolist(),
                   calib_check_active_fraction_L=calibration.check_active_fraction_L.tolist(),
                   calib_alpha_L=calibration.alpha_L.tolist(),
                   calib_settings=dict(profile=calibration.profile,
                                       constant=calibration.constant,
                                       attn_out_scale=calibration.attn_out_scale,
                                       token_scale_sigma=calibration.token_scale_sigma,
                                       calib_sequences=spec["calib_batch"]))
      b, length = spec["batch"], spec["seq"]
      tokens = _token_batch(spec, m.vocab_size, cfg.data.tokenizer, b, length + 1,
                            seed=2000 + spec["seed"])
      # Activity on tokens the calibration never saw (the timed batch), from the dense FFN.
      walk_tokens = tokens[:min(b, spec["calib_batch"]), :length]
      rec.update(activity_fields(measure_activity(model, walk_tokens), m.d_ff))
      graphdef, params = nnx.split(model, nnx.Param)
      del model
      if mode == "forward":
        cdt = jnp.dtype(m.compute_dtype)
        params = jax.tree.map(lambda p: p.astype(cdt), params)  # inference weights: bf16
        inputs = jnp.asarray(tokens[:, :length])

        def forward(p, t):
          return nnx.merge(graphdef, p)(t)

        if compiled is None:
          t0 = time.perf_counter()
          compiled = jax.jit(forward).lower(params, inputs).compile()
          compile_s = time.perf_counter() - t0
        rec.update(compiled_memory(compiled))
        check_fits(rec.get("peak_bytes"), device)
        timing = timed_windows(lambda: compiled(params, inputs), warmup=spec["warmup"],
                        windows=spec["windows"], min_seconds=spec["min_seconds"], meter=meter)
        rec.update(allocator_stats(device))
        # A cross-process check that both models compute the same function: the next-token
        # loss of the first sequences, from one more call's logits.
        rec["final_loss"] = float(_jitted()["head_loss"](compiled(params, inputs), inputs))
        if variant == "sparse" and spec["op_stats"]:
          stats = _jitted()["forward_stats"](params, inputs, graphdef=graphdef)
          rec.update(op_stats_fields(stats.l0, stats.dense_fallback, stats.overflow_rows, m.d_ff))
        del params, inputs
      else:
        scfg = step_config(cfg)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=make_optimizer(scfg.train).init(params),
                           tracker=init_tracker(m.n_layers, m.d_ff),
                           rng=jax.random.key_data(jax.random.key(spec["seed"])))
        del params
        batch = jnp.asarray(tokens[None])
        settle = variant == "sparse" and resolve_kind(cfg) == "auto_host"
        if settle:
          # The host dispatcher decides per level (the pattern depends on the sparsity): its
          # steps run first, then the step of the pattern it settled on is timed.
          state, compiled, compile_s, settled = settle_host_dispatch(
              cfg, graphdef, state, batch, scfg, spec["settle_steps"])
          rec.update(settled)
        elif compiled is None:
          step_gd = (graphdef if variant == "dense" else  # the dense model has no dispatch
                     static_graphdef(cfg, graphdef, state.params))  # train.dispatch=sparse|dense
          t0 = time.perf_counter()
          compiled = train_step.lower(state, batch, graphdef=step_gd, cfg=scfg).compile()
          compile_s = time.perf_counter() - t0
        rec.update(compiled_memory(compiled))
        check_fits(rec.get("peak_bytes"), device)
        box = {"state": state}
        del state

        def step():
          box["state"], metrics = compiled(box["state"], batch)
          return metrics

        timing = timed_windows(step, warmup=spec["warmup"], windows=spec["windows"],
                        min_seconds=spec["min_seconds"], meter=meter)
        rec.update(allocator_stats(device))
        metrics = jax.device_get(step())
        rec.update(op_stats_fields(metrics["l0_L"], metrics["dense_fallback_L"],
                             metrics["overflow_rows_L"], m.d_ff))
        rec["final_loss"] = float(metrics["loss"])
        del box, batch
      tokens_per_call = b * length
      rec.update(timing, compile_s=compile_s, tokens_per_call=tokens_per_call,
                 tokens_per_ms=tokens_per_call / (timing["s_per_call"] * 1e3),
                 mj_per_token=(None if timing.get("energy_mj") is None else
                               timing["energy_mj"] / (tokens_per_call * timing["calls_per_window"]
                                                      * spec["windows"])))
    except Exception as e:  # noqa: BLE001 (an OOM or a kernel failure costs this level only)
      rec["error"] = short_error(e)
      print(f"  {spec['config']} {mode} {variant} {level}: {rec['error']}", flush=True)
    result["levels"].append(rec)
    gc.collect()
  result["job_s"] = time.perf_counter() - t_job
  return result


def settle_host_dispatch(cfg, graphdef, state, batch, scfg, steps: int):
  """``train.dispatch=auto_host`` (and ``train.hot_cold``): runs ``steps`` training steps on
  ``batch`` with the run loop's ``Dispatcher`` deciding after every one (its hysteresis and, with
  hot_cold, the neuron reorderings of params, moments and tracker), as ``train`` does every
  ``dispatch_every`` steps. Each pattern's step is compiled once, ahead of time, and the settled
  pattern's compiled step is the one timed (it is compiled here if the last decision chose a
  pattern not run yet). Returns (state, the settled pattern's compiled step, its compile seconds,
  fields for the row: the pattern after each step, the settled one, each pattern's compile time).
  Progress goes to stdout as it happens (a job killed at its time budget shows how far it got)."""
  import jax

  from sparse_jax.train.dispatch import Dispatcher
  from sparse_jax.train.step import no_hold, train_step

  if steps < 1:
    raise ValueError(f"--settle-steps must be at least 1 with train.dispatch=auto_host, got {steps}")
  # The loop's step: with the ``hold`` of a step queued behind an unread one (none here).
  hold = no_hold()
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                       (state, batch, hold))
  compile_s: dict[str, float] = {}

  def make_step(gd):
    t0 = time.perf_counter()
    compiled = train_step.lower(*specs, graphdef=gd, cfg=scfg).compile()
    code = disp.code()  # the pattern whose step is asked for (the dispatcher's current one)
    compile_s[code] = time.perf_counter() - t0
    print(f"   settle: compiled the step of {code} in {compile_s[code]:.1f} s", flush=True)
    def step(s, b, h=None):
      return compiled(s, b, hold if h is None else h)
    step.memory_analysis = compiled.memory_analysis  # the timed step's peak (compiled_memory)
    return step

  tokens = int(np.prod(batch.shape[1:])) - batch.shape[1]  # inputs: each sequence but its last
  disp = Dispatcher(cfg, graphdef, state.params, make_step, tokens_per_call=tokens,
                    tokens_per_step=tokens)
  disp.every = 1  # a decision after every settling step
  codes = []
  for i in range(1, steps + 1):
    t0 = time.perf_counter()
    state, metrics = disp(state, batch)
    jax.block_until_ready(metrics)
    ran = disp.code()
    disp.after_step(i, metrics)
    state = disp.refresh(state)
    codes.append(disp.code())
    print(f"   settle step {i}: ran {ran} in {time.perf_counter() - t0:.1f} s, next {codes[-1]}",
          flush=True)
  compiled = disp.step_fn()
  return state, compiled, compile_s[disp.code()], dict(
      dispatch_pattern=disp.code(), dispatch_settling=codes,
      dispatch_hot_cold=bool(cfg.train.hot_cold), dispatch_compile_s=compile_s)


@functools.cache
def _jitted() -> dict:
  """Helpers compiled once per process (graphdef static: equal across sparsity levels)."""
  import jax
  from flax import nnx

  from sparse_jax.nn import forward_with_stats
  from sparse_jax.train import cross_entropy

  def forward_stats(params, tokens, graphdef):
    return forward_with_stats(nnx.merge(graphdef, params), tokens)[1]  # logits unused: dropped

  def head_loss(logits_BxLxV, tokens_BxL):
    n = min(4, tokens_BxL.shape[0])
    return cross_entropy(logits_BxLxV[:n, :-1], tokens_BxL[:n, 1:])

  return dict(forward_stats=jax.jit(forward_stats, static_argnames="graphdef"),
              head_loss=jax.jit(head_loss))


# ------------------------------------------------------------------------------ the parent


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="See the module docstring for the method.")
  p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                 help="comma-separated presets (default 0.5b,1b,1.5b,2b)")
  p.add_argument("--modes", default=",".join(MODES), help="forward,train (default both)")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help="dense,sparse (default both; one side completes a row measured earlier)")
  p.add_argument("--sparsity", default="0.995,0.99",
                 help="target sparsities of the calibrated gates (default 0.995,0.99)")
  p.add_argument("--profile", choices=PROFILES, default="skewed",
                 help="per-neuron firing profile of the calibrated gates (sparse_jax.synthetic)")
  p.add_argument("--checkpoint", help="benchmark this trained model (run or HF directory) "
                                      "instead of calibrated ones; --configs is ignored")
  p.add_argument("--data", default="synthetic",
                 help="token source: synthetic (random ids) or a data.source for the corpus "
                      "loader (stdlib, files, globs), tokenized with the model's tokenizer")
  p.add_argument("--batch", help="sequences per call: N for both modes or forward=N,train=M "
                                 "(default forward=64,train=16)")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--calib-batch", type=int, default=16,
                 help="calibration sequences (half fit, half check; default 16)")
  p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                 metavar="SECTION.FIELD=VALUE", help="config overrides, as for sparse-jax train")
  p.add_argument("--sparse-impl", choices=("auto", "pallas", "xla"), default="auto",
                 help="auto: pallas on a GPU, the XLA reference elsewhere (Pallas interpret "
                      "mode with SPARSE_JAX_PALLAS_INTERPRET=1 where the shapes allow)")
  p.add_argument("--settle-steps", type=int, default=3,
                 help="with --set train.dispatch=auto_host: steps the host dispatcher decides "
                      "after (each) before the settled pattern's step is timed")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
  p.add_argument("--windows", type=int, default=3, help="timed windows (median reported)")
  p.add_argument("--min-seconds", type=float, default=6.0,
                 help="total timed seconds per measurement (energy counter resolution)")
  p.add_argument("--no-op-stats", dest="op_stats", action="store_false",
                 help="skip the sparse forward's statistics pass (one compile less)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                 help="one child process per job (auto: on a GPU)")
  p.add_argument("--max-minutes", type=float, help="wall budget of this invocation")
  p.add_argument("--quick", action="store_true",
                 help="CPU smoke run: tiny config, seq 64, batch 2, short timing")
  p.add_argument("--dry-run", action="store_true", help="print the plan and estimates only")
  p.add_argument("--out", default="experiments/results/bench_model.json")
  p.add_argument("--job", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    defaults = {a.dest: a.default for a in p._actions}
    for k, v in QUICK.items():
      if getattr(args, k) == defaults.get(k):
        setattr(args, k, v)
  return args


def _parse_batch(text: str | None) -> dict:
  batch = dict(DEFAULT_BATCH)
  if not text:
    return batch
  for item in text.split(","):
    name, sep, value = item.partition("=")
    if not sep:
      batch = {k: int(name) for k in MODES}
      continue
    if name.strip() not in MODES:
      raise ValueError(f"--batch {text!r}: {name!r} is not a mode ({', '.join(MODES)})")
    batch[name.strip()] = int(value)
  if any(v < 1 for v in batch.values()):
    raise ValueError(f"--batch {text!r}: sizes must be positive")
  return batch


def plan_jobs(args) -> list[dict]:
  modes = [x.strip() for x in args.modes.split(",") if x.strip()]
  for mode in modes:
    if mode not in MODES:
      raise ValueError(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
  batch = _parse_batch(args.batch)
  variants = [x.strip() for x in args.variants.split(",") if x.strip()]
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
  if args.checkpoint:
    configs = [f"checkpoint:{os.path.abspath(args.checkpoint)}"]
    levels = [dict(target=None, checkpoint=os.path.abspath(args.checkpoint))]
  else:
    configs = [x.strip() for x in args.configs.split(",") if x.strip()]
    for c in configs:
      get_config(c)  # a bad name fails before anything runs
    targets = [float(x) for x in args.sparsity.split(",") if x.strip()]
    for t in targets:
      if not 0.0 < t < 1.0:
        raise ValueError(f"--sparsity: {t} must be in (0, 1)")
    levels = [dict(target=t) for t in targets]
  if args.calib_batch < 2:
    raise ValueError("--calib-batch must be at least 2 (half fits, half checks)")
  jobs = []
  for config in configs:
    for mode in modes:
      for variant in variants:
        jobs.append(dict(config=config, overrides=list(args.overrides), mode=mode,
                         variant=variant, levels=levels, profile=args.profile,
                         batch=batch[mode], seq=args.seq, calib_batch=args.calib_batch,
                         seed=args.seed, warmup=args.warmup, windows=args.windows,
                         min_seconds=args.min_seconds, op_stats=args.op_stats,
                         data=args.data, sparse_impl=args.sparse_impl,
                         settle_steps=args.settle_steps,
                         dense_baseline=DENSE_BASELINE, ffn_impl=None))
  return jobs


def _job_main(spec_path: str) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  spec = _resolve_impl(spec)
  result = run_job(spec)
  with open(child_result_path(spec_path), "w") as f:
    json.dump(result, f)


def _resolve_impl(spec: dict) -> dict:
  model_cfg = resolved_model_config(spec["config"], spec["overrides"]) \
      if not spec["config"].startswith("checkpoint:") else None
  d_model = model_cfg.d_model if model_cfg is not None else 2048
  impl, label = resolve_sparse_impl(spec["sparse_impl"], d_model)
  return {**spec, "ffn_impl": impl, "sparse_impl_label": label}


def main(argv=None) -> dict | None:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.job:
    _job_main(args.job)
    return None
  t_start = time.perf_counter()
  jobs = plan_jobs(args)
  pairs = list(dict.fromkeys((j["config"], j["mode"]) for j in jobs))
  print(f"{len(jobs)} jobs ({args.variants} of each): " + ", ".join(
      f"{c} {m}" for c, m in pairs), flush=True)
  for j in [next(j for j in jobs if (j["config"], j["mode"]) == pair) for pair in pairs]:
    if j["config"].startswith("checkpoint:"):
      continue
    m = resolved_model_config(j["config"], j["overrides"])
    print(f"  {j['config']:5} {j['mode']:7} batch {j['batch']:3} x {j['seq']}: "
          f"{param_count(m) / 1e6:.1f} M params, estimated peak "
          f"{estimate_peak_bytes(m, j['mode'], j['batch'], j['seq']) / 1e9:.2f} GB", flush=True)
  if args.dry_run:
    return None
  isolate = args.isolate == "yes" or (args.isolate == "auto" and gpu_platform_expected())
  run = dict(run_id=f"{os.getpid()}-{time.time():.0f}",
             command=shlex.join(["python", "experiments/bench_model.py", *argv]),
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             isolate=isolate, max_minutes=args.max_minutes, device=None, jax=None,
             xla_flags=os.environ.get("XLA_FLAGS", ""), skipped=[])
  budget = None if args.max_minutes is None else args.max_minutes * 60
  done: list[tuple[dict, dict]] = []
  last_duration: dict[tuple, float] = {}
  data = None
  for spec in jobs:
    elapsed = time.perf_counter() - t_start
    remaining = None if budget is None else budget - elapsed
    key = (spec["config"], spec["mode"])
    if remaining is not None and (remaining <= 5 or remaining < last_duration.get(key, 0)):
      run["skipped"].append(f"{spec['config']}/{spec['mode']}/{spec['variant']}")
      done.append((spec, dict(error="skipped: --max-minutes budget")))
      continue
    print(f"== {spec['config']} {spec['mode']} {spec['variant']} (batch {spec['batch']} x "
          f"{spec['seq']}) at {elapsed:.0f} s", flush=True)
    t0 = time.perf_counter()
    if isolate:
      res = run_in_child(__file__, spec, remaining, repo=REPO)
    else:
      spec = _resolve_impl(spec)
      res = run_job(spec)
      import jax
      jax.clear_caches()
      gc.collect()
    last_duration[key] = time.perf_counter() - t0
    res.setdefault("sparse_impl_label", spec.get("sparse_impl_label"))
    run["device"] = run["device"] or res.get("device")
    run["jax"] = run["jax"] or res.get("jax")
    done.append((spec, res))
    for lv in res.get("levels", []):
      if "error" not in lv:
        print(f"   target {lv.get('target')}: {lv['tokens_per_ms']:.2f} tokens/ms, "
              f"{_fmt_mj(lv.get('mj_per_token'))} mJ/token, peak "
              f"{(lv.get('peak_bytes') or 0) / 1e9:.2f} GB, measured sparsity "
              f"{lv.get('sparsity_measured', lv.get('sparsity_measured_walk')):.4f} "
              f"(compile {lv.get('compile_s') or 0:.0f} s)", flush=True)
    data = merge_results(args.out, run, make_rows(done, run))
  if data is None and not done:
    print("nothing to run")
    return None
  rows = make_rows(done, run)
  data = merge_results(args.out, run, rows)
  keys = {row_key(r) for r in rows}
  print(format_rows([r for r in data["records"] if row_key(r) in keys]))  # merged rows
  png = plot(data, args.out, run["device"])
  if run["skipped"]:
    print(f"skipped at the budget: {', '.join(run['skipped'])}: run them in another invocation "
          "with the same --out (results merge)")
  print(f"wrote {args.out}" + (f" and {png}" if png else "") +
        f" in {time.perf_counter() - t_start:.0f} s")
  return data


def _fmt_mj(v) -> str:
  return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"bench_model.py: error: {e}")
