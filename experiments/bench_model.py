"""End-to-end model benchmark: dense vs sparse whole models, throughput, energy and peak memory.

For each config (``--configs``, default 0.5b,1b,1.5b,2b) and mode (``--modes``):

* ``forward``: prefill, the full forward of ``batch x seq`` tokens to the logits (the paper's
  inference benchmark: batch 64 x 2048), parameters stored in the compute dtype (bf16);
* ``train``: one full training step, ``sparse_jax.train.train_step`` (forward, backward with the
  L1 term, AdamW update; fp32 master weights, the preset's remat), on ``batch x seq`` tokens;

it times the **dense** model (``model.ffn=relu_dense`` with the bf16 dense FFN of the FFN
benchmarks, ``ops.dense.bf16_gated_ffn_with_l1``: matmul outputs in bf16 as a bf16 model computes
them; ``--dense-baseline model`` keeps the model's own relu_dense FFN, whose hidden activations are
f32) and the **sparse** model (``model.ffn=relu_sparse``, ``ffn_impl=pallas``: the Pallas TwELL
kernels with the on-device dense/sparse dispatch), with the same weights.

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

Memory estimate (bytes; P parameters, M = batch x seq tokens, V vocab, D d_model, F d_ff, L
layers; ``estimate_peak_bytes``): train = 16 P (fp32 params, grads, AdamW m and v) + 2 P (bf16
weight copies) + 12 M V (fp32 logits, their gradient, the loss's softmax) + 2 M D L (block inputs
kept by remat) + M (12 F + 24 D) (one block's recomputed activations and gradients); forward = 2 P
(bf16 params) + 4 M V (fp32 logits) + M (6 F + 12 D). With the defaults (forward batch 64, train
batch 16, seq 2048):

    config  params   forward b64   train b16   train b32
    0.5b    0.51 B     34.4 GB      33.4 GB     57.7 GB
    1b      1.03 B     35.5 GB      44.0 GB     69.6 GB
    1.5b    1.54 B     36.5 GB      54.6 GB     81.5 GB
    2b      2.05 B     37.5 GB      65.2 GB     93.5 GB

so the defaults fit an H200 (139 GB, children may use 95% of it) with room for what the estimate
leaves out (XLA's fusion temporaries, cuDNN workspaces), and also an H100 (80 GB). The 2b training
state alone (fp32 master weights + AdamW) is 16 x 2.05 B = 33 GB. The compiled
``memory_analysis`` is checked against the device's ``bytes_limit`` before a run, so a batch that
cannot fit is reported without an OOM.

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
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from sparse_jax.config import ModelConfig, apply_overrides, get_config  # noqa: E402 (pure Python)

MODES = ("forward", "train")
VARIANTS = ("dense", "sparse")
DEFAULT_CONFIGS = ("0.5b", "1b", "1.5b", "2b")
DEFAULT_BATCH = {"forward": 64, "train": 16}
FROZEN_WARMUP = 10**9
QUICK = dict(configs="tiny", seq=64, batch="2", calib_batch=8, min_seconds=0.3, windows=2,
             warmup=1)

# PAPER.md, "Reported results (H100)". The energy figures are listed with the 2B results; their
# ratio (0.829) matches the inference speedup (1.207), so they are compared with forward rows.
PAPER_REFERENCE = {
    "device": "NVIDIA H100 (the paper's own measurements, PAPER.md)",
    "forward": {"2b": {"tokens_per_ms_dense": 87.8, "tokens_per_ms_sparse": 106.0,
                       "speedup": 1.205, "mj_per_token_dense": 7.85,
                       "mj_per_token_sparse": 6.51}},
    "train": {"2b": {"speedup": 1.219},
              "1b": {"peak_gb_dense": 44.5, "peak_gb_sparse": 33.1, "peak_ratio": 33.1 / 44.5}},
    "notes": "inference = full forward of batch 64 x 2048 tokens; energy from NVML power "
             "integrated over time; sparsity of trained models (1.5B: ~29 of 5632 active, "
             "99.5%); the training batch of the memory figure is not given",
}


# ------------------------------------------------------------------------------ estimates


def param_count(m: ModelConfig) -> int:
  """Parameters of a decoder config (tied embeddings), without building it."""
  hd = m.attn_head_dim
  attn = m.d_model * hd * (2 * m.n_heads + 2 * m.kv_heads)
  ffn = (3 if m.ffn != "relu_nongated_sparse" else 2) * m.d_ff * m.d_model
  return m.vocab_size * m.d_model + m.n_layers * (attn + ffn + 2 * m.d_model) + m.d_model


def estimate_peak_bytes(m: ModelConfig, mode: str, batch: int, seq: int) -> int:
  """Rough peak device memory of one timed call (module docstring); XLA's own figure is
  recorded next to it."""
  p, tokens = param_count(m), batch * seq
  v, d, f, n = m.vocab_size, m.d_model, m.d_ff, m.n_layers
  if mode == "forward":
    return 2 * p + 4 * tokens * v + tokens * (6 * f + 12 * d)
  kept = 2 * tokens * d * n if m.remat else tokens * n * (12 * f + 24 * d)
  return 18 * p + 12 * tokens * v + kept + tokens * (12 * f + 24 * d)


def resolved_model_config(config: str, overrides: list[str]) -> ModelConfig:
  cfg = apply_overrides(get_config(config), overrides)
  m = cfg.model
  if m.vocab_size is None:  # the byte tokenizer's 259 ids, padded to a multiple of 128
    from sparse_jax.data import load_tokenizer
    m = m.resolve_vocab(load_tokenizer(cfg.data.tokenizer).vocab_size)
  return m


# ------------------------------------------------------------------------------ energy


class EnergyMeter:
  """Energy of the GPU JAX uses, from NVML: the total-energy counter, else sampled power."""

  def __init__(self, device):
    self.handle, self.error, self.method, self.nvml_name = None, None, None, None
    if device.platform != "gpu":
      self.error = f"no NVML on {device.platform}"
      return
    try:
      import pynvml
    except ImportError:
      self.error = "pynvml not installed (pip install nvidia-ml-py): no energy figures"
      print(f"warning: {self.error}", flush=True)
      return
    self.nvml = pynvml
    try:
      pynvml.nvmlInit()
      self.handle = self._handle_for(device)
      name = pynvml.nvmlDeviceGetName(self.handle)
      self.nvml_name = name.decode() if isinstance(name, bytes) else name
    except pynvml.NVMLError as e:
      self.error, self.handle = f"NVML: {e}", None
      print(f"warning: {self.error}", flush=True)
      return
    try:
      pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
      self.method = "nvml_total_energy_counter"
    except pynvml.NVMLError:
      self.method = "nvml_power_samples_10ms"

  def _handle_for(self, device):
    """The NVML handle of JAX's device: by PCI bus id if JAX exposes it, else through
    CUDA_VISIBLE_DEVICES (indices or UUIDs), else the CUDA ordinal."""
    nv = self.nvml
    bus = getattr(device, "pci_bus_id", None)
    if bus:
      return nv.nvmlDeviceGetHandleByPciBusId(bus)
    ordinal = getattr(device, "local_hardware_id", None)
    ordinal = device.id if ordinal is None else ordinal
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if v.strip()]
    if visible and ordinal < len(visible):
      entry = visible[ordinal]
      if entry.isdigit():
        return nv.nvmlDeviceGetHandleByIndex(int(entry))
      return nv.nvmlDeviceGetHandleByUUID(entry)
    return nv.nvmlDeviceGetHandleByIndex(ordinal)

  def start(self) -> None:
    if self.handle is None:
      return
    self._t0 = time.perf_counter()
    if self.method == "nvml_total_energy_counter":
      self._e0 = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
      return
    self._samples, self._stop = [], threading.Event()

    def sample():
      while not self._stop.is_set():
        self._samples.append((time.perf_counter(),
                              self.nvml.nvmlDeviceGetPowerUsage(self.handle)))  # mW
        time.sleep(0.01)

    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()

  def stop(self) -> dict:
    """{"energy_mj", "seconds", "avg_power_w", "energy_method"} of the region since start()."""
    if self.handle is None:
      return dict(energy_mj=None, avg_power_w=None, energy_method=None, energy_error=self.error)
    t1 = time.perf_counter()
    seconds = t1 - self._t0
    if self.method == "nvml_total_energy_counter":
      mj = float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self._e0)
    else:
      self._stop.set()
      self._thread.join()
      ts = np.array([t for t, _ in self._samples])
      watts = np.array([p for _, p in self._samples]) / 1e3
      trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
      mj = float(trapezoid(watts, ts) * 1e3) if len(ts) > 1 else None
    return dict(energy_mj=mj, seconds=seconds, energy_method=self.method,
                avg_power_w=None if mj is None else mj / 1e3 / seconds)


# ------------------------------------------------------------------------------ the job


@functools.cache
def _bf16_dense_ffn_class():
  """FFN whose __call__ is the FFN benchmarks' bf16 dense FFN (matmul outputs in bf16), with the
  model's statistics; same parameters as relu_dense."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sparse_jax.nn import ffn as ffn_mod
  from sparse_jax.ops.dense import bf16_gated_ffn_with_l1

  class BF16DenseFFN(ffn_mod.FFN):

    def __call__(self, x_BxLxD):
      dt = self.compute_dtype
      x = x_BxLxD.astype(dt)
      x_MxD = x.reshape(-1, x.shape[-1])
      wg, wu, wd = (w[...].astype(dt) for w in (self.w_gate_FxD, self.w_up_FxD, self.w_down_FxD))
      y, _ = bf16_gated_ffn_with_l1(x_MxD, wg, wu, wd)
      if ffn_mod._capturing(self):
        dot = lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())))
        h = jax.nn.relu(dot(x_MxD, wg)) * dot(x_MxD, wu)  # the same products: XLA shares them
        self.sow(nnx.Intermediate, ffn_mod.STATS_NAME, ffn_mod.dense_stats(h))
      return y.reshape(x.shape).astype(jnp.dtype(dt))

  return BF16DenseFFN


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
  kind = "relu_dense" if variant == "dense" else "relu_sparse"
  if level.get("checkpoint"):
    loaded = load_checkpoint(level["checkpoint"], compute_dtype="bfloat16")
    if loaded.cfg.model.ffn not in ("relu_sparse", "relu_dense"):
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
  if variant == "dense" and spec["dense_baseline"] == "bf16":
    cls = _bf16_dense_ffn_class()
    for block in model.blocks:
      block.ffn.__class__ = cls
  return model, cfg, calibration


def _timed(call, *, warmup: int, windows: int, min_seconds: float, meter):
  """Warm-up calls, then ``windows`` windows of n back-to-back calls (n from one timed call so
  that all windows last about ``min_seconds``); energy over the windows."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(call())
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  one = time.perf_counter() - t0
  n = max(2, math.ceil(min_seconds / windows / max(one, 1e-6)))
  meter.start()
  window_s = []
  for _ in range(windows):
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
      out = None  # the previous output is released (after its computation) before the next
      out = call()
    jax.block_until_ready(out)
    window_s.append(time.perf_counter() - t0)
  energy = meter.stop()
  return dict(calls_per_window=n, window_s=window_s, s_per_call=statistics.median(window_s) / n,
              **energy)


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return dict(peak_bytes=None)
  parts = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
           ("argument", "output", "temp", "alias", "generated_code")}
  return dict(peak_bytes=parts["argument"] + parts["output"] + parts["temp"] - parts["alias"],
              memory_analysis=parts)


def _allocator_stats(device) -> dict:
  stats = device.memory_stats() or {}
  return dict(peak_bytes_in_use=stats.get("peak_bytes_in_use"),
              bytes_limit=stats.get("bytes_limit"))


def _summarise_activity(act: dict, d_ff: int) -> dict:
  return dict(sparsity_measured_walk=float(1.0 - np.mean(act["active_fraction_L"])),
              walk_active_per_token_L=[round(float(v), 3) for v in act["active_per_token_L"]],
              walk_p50_L=act["p50_L"].tolist(), walk_p99_L=act["p99_L"].tolist(),
              walk_max_L=[int(v) for v in act["max_L"]])


def run_job(spec: dict) -> dict:
  """One (config, mode, variant) over every sparsity level: build, calibrate, compile once, time,
  measure. Errors are caught per level and returned, so one failure costs one row."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sparse_jax.calibrate import measure_activity
  from sparse_jax.train import init_tracker, make_optimizer
  from sparse_jax.train.loop import step_config
  from sparse_jax.train.step import TrainState, train_step

  t_job = time.perf_counter()
  device = jax.devices()[0]
  mode, variant = spec["mode"], spec["variant"]
  result = dict(config=spec["config"], mode=mode, variant=variant, batch=spec["batch"],
                seq=spec["seq"], device=_device_name(device), jax=jax.__version__,
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
      rec.update(_summarise_activity(measure_activity(model, walk_tokens), m.d_ff))
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
        rec.update(_memory(compiled))
        _check_fits(rec, device)
        timing = _timed(lambda: compiled(params, inputs), warmup=spec["warmup"],
                        windows=spec["windows"], min_seconds=spec["min_seconds"], meter=meter)
        rec.update(_allocator_stats(device))
        # A cross-process check that both models compute the same function: the next-token
        # loss of the first sequences, from one more call's logits.
        rec["final_loss"] = float(_jitted()["head_loss"](compiled(params, inputs), inputs))
        if variant == "sparse" and spec["op_stats"]:
          stats = _jitted()["forward_stats"](params, inputs, graphdef=graphdef)
          rec.update(_op_stats(stats.l0, stats.dense_fallback, stats.overflow_rows, m.d_ff))
        del params, inputs
      else:
        scfg = step_config(cfg)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=make_optimizer(scfg.train).init(params),
                           tracker=init_tracker(m.n_layers, m.d_ff),
                           rng=jax.random.key_data(jax.random.key(spec["seed"])))
        del params
        batch = jnp.asarray(tokens[None])
        if compiled is None:
          t0 = time.perf_counter()
          compiled = train_step.lower(state, batch, graphdef=graphdef, cfg=scfg).compile()
          compile_s = time.perf_counter() - t0
        rec.update(_memory(compiled))
        _check_fits(rec, device)
        box = {"state": state}
        del state

        def step():
          box["state"], metrics = compiled(box["state"], batch)
          return metrics

        timing = _timed(step, warmup=spec["warmup"], windows=spec["windows"],
                        min_seconds=spec["min_seconds"], meter=meter)
        rec.update(_allocator_stats(device))
        metrics = jax.device_get(step())
        rec.update(_op_stats(metrics["l0_L"], metrics["dense_fallback_L"],
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
      rec["error"] = f"{type(e).__name__}: {_short(str(e))}"
      print(f"  {spec['config']} {mode} {variant} {level}: {rec['error']}", flush=True)
    result["levels"].append(rec)
    gc.collect()
  result["job_s"] = time.perf_counter() - t_job
  return result


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


def _op_stats(l0_L, fallback_L, overflow_L, d_ff) -> dict:
  l0 = np.asarray(l0_L, np.float64)
  return dict(sparsity_measured=float(1.0 - l0.mean() / d_ff),
              op_active_per_token_L=[round(float(v), 3) for v in l0],
              dense_fallback_L=[float(v) for v in np.asarray(fallback_L, np.float64)],
              dense_fallback_share=float(np.mean(np.asarray(fallback_L, np.float64))),
              overflow_rows_L=[int(v) for v in np.asarray(overflow_L)])


def _check_fits(rec: dict, device) -> None:
  limit = _allocator_stats(device)["bytes_limit"]
  if limit and rec.get("peak_bytes") and rec["peak_bytes"] > limit:
    raise MemoryError(f"the compiled step needs {rec['peak_bytes'] / 1e9:.1f} GB, the device "
                      f"allows {limit / 1e9:.1f} GB: use a smaller --batch")


def _short(text: str, n: int = 600) -> str:
  text = " ".join(text.split())
  return text if len(text) <= n else text[:n] + " ..."


def _device_name(device) -> str:
  return f"{device.platform}:{getattr(device, 'device_kind', device.platform)}"


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
  p.add_argument("--profile", choices=("skewed", "uniform"), default="skewed")
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
  p.add_argument("--dense-baseline", choices=("bf16", "model"), default="bf16",
                 help="bf16: the bf16 dense FFN of the FFN benchmarks (default); model: the "
                      "model's relu_dense FFN (f32 hidden activations)")
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
                         dense_baseline=args.dense_baseline, ffn_impl=None))
  return jobs


def _run_child(spec: dict, timeout: float | None) -> dict:
  """The job in a fresh Python process; its stdout/stderr pass through."""
  with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
    spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
    with open(spec_path, "w") as f:
      json.dump(spec, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [x for x in env.get("PYTHONPATH", "").split(
        os.pathsep) if x])
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    cmd = [sys.executable, os.path.abspath(__file__), "--job", spec_path]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True)
    try:
      code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, 9)  # the child's own process group (start_new_session)
      proc.wait()
      return dict(error=f"killed at the --max-minutes budget after {timeout:.0f} s")
    if os.path.exists(out_path):
      with open(out_path) as f:
        return json.load(f)
    return dict(error=f"the job's process exited with code {code} without a result (a crash; "
                      "see its output above)")


def _job_main(spec_path: str) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  spec = _resolve_impl(spec)
  result = run_job(spec)
  with open(os.path.join(os.path.dirname(spec_path), "result.json"), "w") as f:
    json.dump(result, f)


def _resolve_impl(spec: dict) -> dict:
  model_cfg = resolved_model_config(spec["config"], spec["overrides"]) \
      if not spec["config"].startswith("checkpoint:") else None
  d_model = model_cfg.d_model if model_cfg is not None else 2048
  impl, label = resolve_sparse_impl(spec["sparse_impl"], d_model)
  return {**spec, "ffn_impl": impl, "sparse_impl_label": label}


def _row_key(r: dict) -> tuple:
  return (r.get("device"), r["config"], r["mode"], r.get("sparsity_target"), r.get("profile"),
          r.get("batch"), r.get("seq"), r.get("dense_baseline"), r.get("sparse_impl"),
          tuple(r.get("overrides") or ()), r.get("data"))


# Row fields that come from the sparse job (besides the *_sparse ones).
SPARSE_KEYS = ("sparsity_measured", "op_active_per_token_L", "dense_fallback_L",
               "dense_fallback_share", "overflow_rows_L", "sparsity_measured_walk",
               "walk_active_per_token_L", "walk_p50_L", "walk_p99_L", "walk_max_L",
               "calib_alpha_L", "calib_fit_active_fraction_L", "calib_check_active_fraction_L",
               "calib_settings")


def _measured(row: dict, v: str) -> bool:
  return row.get(f"tokens_per_ms_{v}") is not None


def _variant_fields(lv: dict, v: str) -> dict:
  """The row fields of one successful level of the ``v`` job."""
  out = {f"tokens_per_ms_{v}": lv["tokens_per_ms"], f"ms_per_call_{v}": lv["s_per_call"] * 1e3,
         f"window_s_{v}": lv["window_s"], f"calls_per_window_{v}": lv["calls_per_window"],
         f"mj_per_token_{v}": lv.get("mj_per_token"), f"avg_power_w_{v}": lv.get("avg_power_w"),
         f"energy_method_{v}": lv.get("energy_method"), f"energy_error_{v}": lv.get("energy_error"),
         f"peak_bytes_{v}": lv.get("peak_bytes"),
         f"memory_analysis_{v}": lv.get("memory_analysis"),
         f"peak_bytes_in_use_{v}": lv.get("peak_bytes_in_use"),
         f"compile_s_{v}": lv.get("compile_s"),
         f"build_calibrate_s_{v}": lv.get("build_calibrate_s"),
         f"sparsity_measured_walk_{v}": lv.get("sparsity_measured_walk")}
  if "final_loss" in lv:
    out[f"final_loss_{v}"] = lv["final_loss"]
  if v == "dense":
    # The dense model's own count of active neurons (train: the timed step's statistics).
    out["sparsity_measured_dense"] = lv.get("sparsity_measured")
  else:
    out.update({k: lv[k] for k in SPARSE_KEYS if k in lv})
  return out


def _derive(row: dict) -> dict:
  """Ratios and fallbacks computed from the measured fields."""
  if row.get("sparsity_measured") is None:
    row["sparsity_measured"] = row.get("sparsity_measured_walk_sparse",
                                       row.get("sparsity_measured_walk_dense"))
  for k in ("tokens_per_ms", "mj_per_token", "peak_bytes"):
    for v in VARIANTS:
      row.setdefault(f"{k}_{v}", None)
  ratio = lambda a, b: a / b if a and b else None
  row["speedup"] = ratio(row["tokens_per_ms_sparse"], row["tokens_per_ms_dense"])
  row["peak_ratio"] = ratio(row["peak_bytes_sparse"], row["peak_bytes_dense"])
  row["energy_ratio"] = ratio(row["mj_per_token_sparse"], row["mj_per_token_dense"])
  # Same weights and tokens: the losses of the two models agree up to bf16 rounding.
  ld, ls = row.get("final_loss_dense"), row.get("final_loss_sparse")
  row["final_loss_rel_diff"] = abs(ls - ld) / abs(ld) if ld and ls is not None else None
  return row


def make_rows(jobs_done: list[tuple[dict, dict]], run: dict) -> list[dict]:
  """One row per (config, mode, sparsity level) from its dense and sparse job results."""
  rows: dict[tuple, dict] = {}
  for spec, res in jobs_done:
    levels = res.get("levels") or [dict(lv, error=res.get("error", "no result"))
                                   for lv in spec["levels"]]
    v = spec["variant"]
    for lv in levels:
      target = lv.get("target")
      row = rows.setdefault((spec["config"], spec["mode"], target), dict(
          device=res.get("device") or run.get("device"), jax=res.get("jax") or run.get("jax"),
          command=run["command"], date=run["date"], config=spec["config"], mode=spec["mode"],
          sparsity_target=target, profile=spec["profile"] if target is not None else None,
          batch=spec["batch"], seq=spec["seq"], tokens_per_call=spec["batch"] * spec["seq"],
          dense_baseline=spec["dense_baseline"], overrides=spec["overrides"],
          data=spec["data"], sparse_impl=spec.get("sparse_impl_label"),
          nvml_device=res.get("nvml_device"), measured_in={}))
      row["device"] = row["device"] or res.get("device")
      if lv.get("params") is not None:
        row.update(params=lv["params"], n_layers=lv.get("n_layers"), d_ff=lv.get("d_ff"),
                   model={k: x for k, x in lv.get("model", {}).items()
                          if k not in ("ffn", "ffn_impl")})
      if "error" in lv:
        row[f"error_{v}"] = lv["error"]
        continue
      row.update(_variant_fields(lv, v))
      row["measured_in"][v] = dict(command=run["command"], date=run["date"])
  out = []
  for row in rows.values():
    paper = PAPER_REFERENCE.get(row["mode"], {}).get(row["config"])
    if paper:
      row["paper"] = paper
    out.append(_derive(row))
  return out


def _combine(new: dict, old: dict) -> dict:
  """``new`` with the side(s) it lacks taken from ``old`` (same key: device, config, mode,
  sparsity, batch, seq, settings), so the two models of a row may come from two invocations."""
  row = dict(new)
  for v in VARIANTS:
    if _measured(row, v) or not _measured(old, v):
      continue
    if row.get(f"error_{v}"):
      row["rerun_errors"] = {**row.get("rerun_errors", {}), v: row[f"error_{v}"]}
    for k in list(row):
      if k.endswith(f"_{v}") or (v == "sparse" and k in SPARSE_KEYS):
        del row[k]
    row.update({k: x for k, x in old.items() if (k.endswith(f"_{v}") and k != f"error_{v}")
                or (v == "sparse" and k in SPARSE_KEYS)})
    row["measured_in"] = {**row.get("measured_in", {}),
                          v: old.get("measured_in", {}).get(v, dict(command=old.get("command"),
                                                                    date=old.get("date")))}
  return _derive(row)


def merge_results(path: str, run: dict, rows: list[dict]) -> dict:
  """Writes ``rows`` into the JSON at ``path`` (atomically), merged with what it holds."""
  data = dict(benchmark="experiments/bench_model.py", paper=PAPER_REFERENCE,
              definitions=DEFINITIONS, runs=[], records=[])
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    data["runs"] = old.get("runs", [])
    data["records"] = old.get("records", [])
  data["runs"] = [r for r in data["runs"] if r.get("run_id") != run["run_id"]] + [run]
  index = {_row_key(r): i for i, r in enumerate(data["records"])}
  for row in rows:
    i = index.get(_row_key(row))
    if i is None:
      index[_row_key(row)] = len(data["records"])
      data["records"].append(row)
    else:
      data["records"][i] = _combine(row, data["records"][i])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
  os.replace(tmp, path)
  return data


DEFINITIONS = {
    "tokens_per_ms": "batch x seq / (median window wall time / calls per window), in ms",
    "mj_per_token": "NVML energy of the timed windows (whole board) / tokens processed",
    "peak_bytes": "XLA compiled memory_analysis of the timed function: argument + output + "
                  "temp - alias bytes",
    "peak_bytes_in_use": "device allocator peak of the job's process (memory_stats)",
    "sparsity_measured": "1 - mean over layers of the sparse op's active neurons per token / "
                         "d_ff on the timed batch (forward: stats pass; train: last timed step)",
    "sparsity_measured_walk": "the same from the dense FFN, layer by layer, on up to "
                              "calib_batch sequences of the timed batch (not seen in calibration)",
    "dense_fallback_share": "share of layers whose sparse op ran its dense path",
    "speedup": "tokens_per_ms_sparse / tokens_per_ms_dense",
    "final_loss": "next-token cross-entropy on the timed batch (train: the step's loss; "
                  "forward: the first 4 sequences), a check that both models compute the same "
                  "function (final_loss_rel_diff)",
}


def format_table(rows: list[dict]) -> str:
  head = ("config", "mode", "target", "measured", "batch", "dense tok/ms", "sparse tok/ms",
          "speedup", "dense mJ/tok", "sparse mJ/tok", "peak D GB", "peak S GB", "dense path",
          "note")
  fmt = lambda v, f: "-" if v is None else format(v, f)
  out = []
  for r in rows:
    note = "; ".join(f"{v}: {r[f'error_{v}'][:60]}" for v in VARIANTS if r.get(f"error_{v}"))
    out.append((r["config"], r["mode"], fmt(r["sparsity_target"], ".4g"),
                fmt(r.get("sparsity_measured"), ".4f"), str(r["batch"]),
                fmt(r["tokens_per_ms_dense"], ".1f"), fmt(r["tokens_per_ms_sparse"], ".1f"),
                fmt(r.get("speedup"), ".3f"), fmt(r["mj_per_token_dense"], ".3f"),
                fmt(r["mj_per_token_sparse"], ".3f"),
                fmt(r["peak_bytes_dense"] and r["peak_bytes_dense"] / 1e9, ".1f"),
                fmt(r["peak_bytes_sparse"] and r["peak_bytes_sparse"] / 1e9, ".1f"),
                fmt(r.get("dense_fallback_share"), ".2f"), note))
  widths = [max(len(x) for x in col) for col in zip(head, *out)]
  line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))
  return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in out])


def plot(data: dict, path: str, device: str | None) -> str | None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in data["records"] if r.get("speedup") is not None and r.get("params")
          and (device is None or r.get("device") == device)]
  if not rows:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, mode in zip(axes, MODES):
    series: dict = {}
    for r in rows:
      if r["mode"] == mode:
        label = (f"sparsity {r['sparsity_target']}" if r["sparsity_target"] is not None
                 else "checkpoint") + f", batch {r['batch']}"
        series.setdefault(label, []).append((r["params"] / 1e9, r["speedup"], r["config"]))
    for label, pts in sorted(series.items()):
      pts.sort()
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
      for x, y, config in pts:
        ax.annotate(config, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for config, ref in PAPER_REFERENCE.get(mode, {}).items():
      if "speedup" in ref:
        p = param_count(get_config(config).model) / 1e9
        ax.plot([p], [ref["speedup"]], "k*", ms=12, label=f"paper {config} (H100)")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_title(f"{mode}: sparse / dense tokens per ms")
    ax.set_xlabel("parameters (B)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel("speedup")
  fig.suptitle(f"bench_model: {device or 'all devices'}")
  fig.tight_layout()
  png = os.path.splitext(path)[0] + ".png"
  fig.savefig(png, dpi=120)
  plt.close(fig)
  return png


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
  isolate = args.isolate == "yes" or (args.isolate == "auto" and _gpu_platform_expected())
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
      res = _run_child(spec, remaining)
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
  keys = {_row_key(r) for r in rows}
  print(format_table([r for r in data["records"] if _row_key(r) in keys]))  # merged rows
  png = plot(data, args.out, run["device"])
  if run["skipped"]:
    print(f"skipped at the budget: {', '.join(run['skipped'])}: run them in another invocation "
          "with the same --out (results merge)")
  print(f"wrote {args.out}" + (f" and {png}" if png else "") +
        f" in {time.perf_counter() - t_start:.0f} s")
  return data


def _fmt_mj(v) -> str:
  return "-" if v is None else f"{v:.3f}"


def _gpu_platform_expected() -> bool:
  """Whether JAX will run on a GPU, decided without initialising a backend in this process
  (the parent must not take GPU memory from its children)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").lower()
  if platforms:
    return any(p in platforms for p in ("cuda", "gpu", "rocm"))
  import importlib.util
  for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
               "jax_plugins.xla_cuda13"):
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except ModuleNotFoundError:
      pass
  return False


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"bench_model.py: error: {e}")
