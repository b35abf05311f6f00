"""Training throughput on 1 device and on N devices, and the scaling efficiency between them.

Weak scaling: every device gets the same batch (``--per-device-batch`` sequences per micro-batch,
``--grad-accum`` micro-batches per step), so the global batch grows with N, and

    efficiency = tokens/s on N devices / (N x tokens/s on 1 device).

The 1-device run is plain single-device training (no mesh); the N-device run trains on the mesh
``--mesh`` (default ``data:-1``: data parallel over all N; ``fsdp:-1`` for FSDP) through the same
sharded steps as ``sparse-jax train``. Each run compiles and warms up for ``--warmup`` steps
(untimed), then times ``--repeats`` windows of ``--steps`` optimiser steps (the device work is
awaited at the end of each window) and reports the median window. Batches are random token ids
(``--data synthetic``, no download) or the stdlib corpus (``--data stdlib``). A fresh model is ~50%
active at init, so its sparse FFN takes the exact dense fallback; ``--init-from RUN_DIR`` starts
from a trained checkpoint of the same model to time the sparse regime, or ``--calibrate-sparsity S``
sets the gates of the fresh model (``sparse_jax.calibrate``, skewed profile, on random token ids)
so that a fraction 1 - S of the neurons fires, and freezes the learning rate near 0 (a warmup of
10**9 steps) so that the sparsity stays put while the timed steps still compute the full update.
The measured active neurons per token and the dense-path share are recorded with the throughput.

    PYTHONPATH=$PWD python3 experiments/scale.py --config 0.5b --steps 10 \\
        --out experiments/results/scale_0.5b_h200x2.json         # all local GPUs vs one
    python experiments/scale.py --config tiny --cpu-devices 8 --steps 3 --warmup 1 --repeats 1 \\
        --per-device-batch 2 --out /tmp/scale_smoke.json          # CPU smoke run, 8 fake devices
    PYTHONPATH=$PWD python3 experiments/scale.py --config 0.5b --calibrate-sparsity 0.995 \\
        --out experiments/results/scale_0.5b_sparse_h200x2.json  # the sparse regime, untrained

The JSON (``--out``; default ``experiments/results/scale_<config>_<device>x<N>.json``) holds the
command, the devices, the settings and one record per device count; it is rewritten after each
run, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import shlex
import statistics
import sys
import time

import numpy as np

from sparse_jax.config import PRESETS, Config, apply_overrides, get_config


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="0.5b", choices=list(PRESETS), help="preset (default 0.5b)")
  p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                 metavar="SECTION.FIELD=VALUE", help="config overrides, as for sparse-jax train")
  p.add_argument("--steps", type=int, default=10, help="timed optimiser steps per window")
  p.add_argument("--warmup", type=int, default=3,
                 help="untimed steps first, at least 1 (compilation)")
  p.add_argument("--repeats", type=int, default=3, help="timed windows (the median is reported)")
  p.add_argument("--per-device-batch", type=int,
                 help="sequences per device per micro-batch (default: the config's "
                      "batch_size / grad_accum)")
  p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
  p.add_argument("--devices", type=int, help="N, the devices of the scaled run (default: all)")
  p.add_argument("--mesh", default="data:-1", help="mesh of the N-device run (default data:-1)")
  p.add_argument("--data", choices=("synthetic", "stdlib"), default="synthetic")
  p.add_argument("--init-from", metavar="RUN_DIR",
                 help="start from this run's latest checkpoint (same model settings)")
  p.add_argument("--calibrate-sparsity", type=float, metavar="S",
                 help="calibrate the fresh model's gates to sparsity S (e.g. 0.995: 0.5%% of the "
                      "neurons active) and freeze the learning rate near 0")
  p.add_argument("--calib-sequences", type=int, default=16,
                 help="random sequences (of data.seq_len tokens) for --calibrate-sparsity "
                      "(default 16; half fit the gates, half check them)")
  p.add_argument("--cpu-devices", type=int,
                 help="run on this many simulated CPU devices (smoke runs without a GPU)")
  p.add_argument("--out", help="result JSON path")
  args = p.parse_args(argv)
  for name in ("steps", "warmup", "repeats", "per_device_batch", "grad_accum", "devices",
               "cpu_devices"):
    value = getattr(args, name)
    if value is not None and value < 1:
      p.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
  if args.calibrate_sparsity is not None:
    if not 0.0 < args.calibrate_sparsity < 1.0:
      p.error(f"--calibrate-sparsity must be in (0, 1), got {args.calibrate_sparsity}")
    if args.init_from:
      p.error("--calibrate-sparsity and --init-from exclude each other")
    if args.calib_sequences < 2:
      p.error(f"--calib-sequences must be at least 2, got {args.calib_sequences}")
  return args


def _use_cpu_devices(n: int) -> None:
  """Simulated CPU devices: possible only before JAX initialises its backends."""
  import jax
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    pass  # already running: fine if it is on the devices asked for
  if jax.default_backend() != "cpu" or jax.device_count() != n:
    raise ValueError(f"--cpu-devices {n}: JAX is already running on {jax.device_count()} "
                     f"{jax.default_backend()} devices")


def run_config(cfg: Config, n: int, per_device_batch: int, grad_accum: int) -> Config:
  """``cfg`` with the global batch of ``n`` devices; evaluation and checkpoints are not used."""
  return apply_overrides(cfg, [f"train.batch_size={n * per_device_batch * grad_accum}",
                               f"train.grad_accum={grad_accum}"])


def batch_source(cfg: Config, kind: str):
  """Endless [grad_accum, micro_batch, seq_len + 1] int32 host batches."""
  from sparse_jax.data import Batches, build_corpus, load_tokenizer
  tcfg, seq = cfg.train, cfg.data.seq_len
  shape = (tcfg.grad_accum, tcfg.batch_size // tcfg.grad_accum, seq + 1)
  if kind == "synthetic":
    rng = np.random.default_rng(cfg.data.seed)
    while True:
      yield rng.integers(0, cfg.model.vocab_size, size=shape, dtype=np.int32)
  corpus = build_corpus(cfg.data, load_tokenizer(cfg.data.tokenizer), progress=False)
  batches = Batches(corpus.train_tokens, seq, tcfg.batch_size, cfg.data.seed)
  while True:
    yield batches.next().reshape(shape).astype(np.int32)


def _restore_run(run_dir: str, cfg: Config, template):
  from sparse_jax.train import Checkpointer
  ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=1_000_000)
  try:
    saved, now = Config.from_dict(ckpt.read_config()).model, cfg.model
    diff = {f.name: (getattr(saved, f.name), getattr(now, f.name))
            for f in dataclasses.fields(now) if getattr(saved, f.name) != getattr(now, f.name)}
    if diff:
      raise ValueError(f"--init-from {run_dir}: the checkpoint's model settings differ "
                       f"(checkpoint, now): {diff}")
    return ckpt.restore(template)[0]
  finally:
    ckpt.close()


FROZEN_WARMUP = 10**9  # lr warmup steps under --calibrate-sparsity: lr ~ 0, the gates stay put


def calibrated_params(cfg: Config, sparsity: float, sequences: int):
  """(host parameters, Calibration) of the fresh model of ``cfg`` (the seed of ``init_state``)
  with its gates calibrated so that a fraction 1 - ``sparsity`` of the neurons fires."""
  import jax
  from flax import nnx

  from sparse_jax.calibrate import calibrate_gates
  from sparse_jax.nn import Transformer

  if cfg.model.ffn not in ("relu_sparse", "relu_nongated_sparse"):
    raise ValueError(f"--calibrate-sparsity: model.ffn is {cfg.model.ffn!r}, not a sparse FFN")
  model = Transformer(cfg.model, rngs=nnx.Rngs(params=cfg.train.seed))
  tokens = np.random.default_rng(1000 + cfg.train.seed).integers(
      0, cfg.model.vocab_size, size=(sequences, cfg.data.seq_len), dtype=np.int32)
  calibration = calibrate_gates(model, tokens, target_active_fraction=1.0 - sparsity,
                                profile="skewed", seed=cfg.train.seed)
  params = jax.device_get(nnx.state(model, nnx.Param))
  del model
  gc.collect()
  return params, calibration


def _state_from(cfg: Config, mesh, params):
  """``init_state`` with the given (host) parameters in place of the fresh ones."""
  import functools

  import jax

  from sparse_jax import parallel
  from sparse_jax.train.step import _split_model, _state_around, state_shardings

  graphdef, fresh = _split_model(cfg, mesh)  # a mesh-built FFN has the same state paths
  if jax.tree.structure(fresh) != jax.tree.structure(params):
    raise ValueError("calibrated parameters do not match the model's parameter tree")
  del fresh
  if mesh is None:
    return graphdef, _state_around(jax.device_put(params), cfg)
  params = parallel.place(params, parallel.tree_shardings(params, mesh))
  state = jax.jit(functools.partial(_state_around, cfg=cfg), donate_argnums=0,
                  out_shardings=state_shardings(cfg, mesh))(params)
  return graphdef, state


def measure(cfg: Config, devices: list, mesh_spec: str, args, params=None) -> dict:
  """Throughput of ``cfg`` trained on ``devices`` (one: no mesh), from ``params`` (host
  parameters, e.g. calibrated) if given, else from a fresh model."""
  import jax

  from sparse_jax import parallel
  from sparse_jax.train.loop import step_config
  from sparse_jax.train.dispatch import static_graphdef
  from sparse_jax.train.step import init_state, step_functions

  mesh = None if len(devices) == 1 else parallel.make_mesh(mesh_spec, devices)
  if mesh is not None:
    parallel.check_batch(cfg.train.batch_size // cfg.train.grad_accum, mesh)
  with jax.default_device(devices[0]):
    if params is not None:
      graphdef, state = _state_from(cfg, mesh, params)
    else:
      graphdef, state = init_state(cfg, mesh)
    if args.init_from:
      state = _restore_run(args.init_from, cfg, state)
    train = step_functions(static_graphdef(cfg, graphdef, state.params), step_config(cfg), mesh)[0]
    batches = batch_source(cfg, args.data)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
      state, metrics = train(state, next(batches))
    jax.block_until_ready(state)
    warmup_s = time.perf_counter() - t0
    windows = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = train(state, next(batches))
      jax.block_until_ready(state)
      windows.append(time.perf_counter() - t0)
  metrics = jax.device_get(metrics)
  del state
  gc.collect()
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  seconds = statistics.median(windows)
  tokens_per_s = args.steps * tokens_per_step / seconds
  return dict(
      devices=len(devices), mesh="single device" if mesh is None else parallel.describe(mesh),
      global_batch=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
      tokens_per_step=tokens_per_step, ms_per_step=1e3 * seconds / args.steps,
      tokens_per_s=tokens_per_s, tokens_per_s_per_device=tokens_per_s / len(devices),
      window_s=windows, warmup_s=warmup_s, final_loss=float(metrics["loss"]),
      active_per_token=float(np.mean(metrics["l0_L"])),
      dense_fallback_share=float(np.mean(metrics["dense_fallback_L"])))


def format_table(records: list[dict], efficiency: float | None) -> str:
  head = ("devices", "mesh", "global batch", "tokens/step", "ms/step", "tokens/s",
          "tokens/s/device", "active/token", "dense share")
  rows = [(str(r["devices"]), r["mesh"], str(r["global_batch"]), f"{r['tokens_per_step']:,}",
           f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s']:,.0f}",
           f"{r['tokens_per_s_per_device']:,.0f}", f"{r['active_per_token']:.1f}",
           f"{r['dense_fallback_share']:.2f}") for r in records]
  widths = [max(len(x) for x in col) for col in zip(head, *rows)]
  line = lambda cells: " | ".join(c.rjust(w) for c, w in zip(cells, widths))
  out = [line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]
  if efficiency is not None:
    n = records[-1]["devices"]
    out.append(f"scaling efficiency 1 -> {n} devices: {100 * efficiency:.1f}% "
               f"(tokens/s on {n} / ({n} x tokens/s on 1))")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.cpu_devices:
    _use_cpu_devices(args.cpu_devices)
  import jax

  from sparse_jax.train import resolve_config

  all_devices = jax.local_devices()
  n = args.devices or len(all_devices)
  if n > len(all_devices):
    raise ValueError(f"--devices {n}: only {len(all_devices)} local devices")
  if n > 1:
    from sparse_jax.parallel import mesh_shape
    mesh_shape(args.mesh, n)  # a bad --mesh fails before any measurement
  cfg, _ = resolve_config(apply_overrides(get_config(args.config), args.overrides))
  params = calibration = None
  if args.calibrate_sparsity is not None:
    cfg = apply_overrides(cfg, [f"train.warmup_steps={FROZEN_WARMUP}"])
    print(f"calibrating the gates to sparsity {args.calibrate_sparsity} ...", flush=True)
    params, calibration = calibrated_params(cfg, args.calibrate_sparsity, args.calib_sequences)
  per_device = args.per_device_batch or cfg.train.batch_size // cfg.train.grad_accum
  kind = getattr(all_devices[0], "device_kind", all_devices[0].platform)
  out = args.out or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      f"scale_{args.config}_{re.sub(r'[^a-z0-9]+', '_', kind.lower()).strip('_')}x{n}.json")
  result = dict(
      command=shlex.join(["python", "experiments/scale.py", *argv]),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      jax=jax.__version__, platform=all_devices[0].platform, device_kind=kind,
      devices=[str(d) for d in all_devices[:n]], xla_flags=os.environ.get("XLA_FLAGS", ""),
      config=args.config, overrides=args.overrides, per_device_batch=per_device,
      grad_accum=args.grad_accum, seq_len=cfg.data.seq_len,
      compute_dtype=cfg.model.compute_dtype, ffn=cfg.model.ffn, ffn_impl=cfg.model.ffn_impl,
      data=args.data, init_from=args.init_from, steps=args.steps, warmup=args.warmup,
      repeats=args.repeats, model=dataclasses.asdict(cfg.model),
      warmup_steps=cfg.train.warmup_steps, calibrate_sparsity=args.calibrate_sparsity,
      records=[], efficiency=None)
  if calibration is not None:
    check = calibration.check_active_fraction_L
    result.update(
        calib_sequences=args.calib_sequences, calib_profile=calibration.profile,
        calib_check_active_fraction=float(np.mean(check)),
        calib_check_active_fraction_L=[float(x) for x in check],
        calib_check_active_per_token=float(np.mean(check)) * cfg.model.d_ff)
  for count in sorted({1, n}):
    print(f"measuring {count} device(s) ...", flush=True)
    run_cfg = run_config(cfg, count, per_device, args.grad_accum)
    result["records"].append(measure(run_cfg, all_devices[:count], args.mesh, args, params))
    if count > 1:
      one = result["records"][0]["tokens_per_s"]
      result["efficiency"] = result["records"][-1]["tokens_per_s"] / (count * one)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
  print(format_table(result["records"], result["efficiency"]))
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"scale.py: error: {e}")
