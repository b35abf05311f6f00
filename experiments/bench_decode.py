"""Generation speed, dense vs sparse FFN, the same weights, timed side by side in one process.

For each config (default 0.5b and 2b) one model is built with calibrated gate sparsity
(``sparse_jax.calibrate``, default 99.5% skewed; ``--init-from RUN`` takes a trained checkpoint as
it is). The dense baseline is the same weights with ``model.ffn=relu_dense`` (the FFN kind, through
``sparse_jax.eval.loading.rebuild``: the parameter arrays are shared). Each case (batch B, prompt
P, N new tokens; default B = 1, 8, 64 at P = 128, N = 128, and a long-context case at P = 2048)
runs greedy generation through ``sparse_jax.nn.generate.Generator`` (its default layout: layers
unrolled over their own bf16 weights; ``--layers scan``: one scanned block over stacked weights,
and then, unless ``--no-best-dense``, the dense model unrolled as well, since under the scan XLA
copies each layer's weight slices before its GEMMs: ``speedup_decode_vs_best_dense`` compares with
the faster dense), alternating dense and sparse calls for ``--rounds`` rounds; the
medians of the prefill and decode wall times are reported, with energy per generated token from NVML
(``EnergyMeter`` of ``experiments/bench_model.py``) and each program's compile time.

The sparse model's decode steps (B tokens per call) run what the Generator picks by batch size
and layout (``--decode-path auto``, the default: the decode kernels of
``pallas_kernels/twell_decode.py`` or the dense FFN, ``Generator.decode_path_for``), the decode
kernels always (``--decode-path kernel``: no capacity, exact), or with ``--decode-path union``
the XLA union path of ``sparse_jax.ops.decode`` when its union capacity pays: U is set per case
from the union of the
batch's active neurons measured on a probe generation of other prompts (the dense twin computes
the same activity), x 1.25, rounded up to 128; a step whose union exceeds U runs dense (exact) and
is counted (``dense_fallback_share``). ``decode_max_tokens`` is set to B, so the prefill (B x P
tokens) runs the batched sparse path.

Floor (2b, bf16, H200 HBM ~4.8 TB/s, bytes per decode step; PERF_FLOORS.md "Decode"): weights
4104 MB dense (38 x (33.5 attention + 69.2 FFN) + 201 LM head). The sparse FFN reads the gate
(23.1 MB) and each union row of Wu and Wd three times (gather read + write, GEMM read; 4 kB a
row): ~26 MB at U = 128 (batch 1), ~33 MB at U = 384 (batch 8), ~61 MB at U = 1536 (batch 64,
above the default union line of d_ff / 4 = 1408, so dense there). The KV cache (full attention,
8 kB per token per layer, the whole cache length S = P + N read every step) adds 38 x B x S x
8 kB: 80 MB at B = 1, 0.64 GB at B = 8, 5.1 GB at B = 64 (S = 256); 0.68 / 5.4 GB at S = 2176
for B = 1 / 8. Whole-step ratios: ~1.64x at B = 1, ~1.42x at B = 8, <= ~1.05x at B = 64
(cache-bound), ~1.52x / ~1.17x at S = 2176 for B = 1 / 8.

    # H200: quick (~3-4 minutes): 0.5b, batch 1 and 8, no long case
    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 experiments/bench_decode.py --configs 0.5b \\
        --batches 1,8 --long-context 0 --rounds 3 \\
        --out experiments/results/bench_decode_quick_h200.json
    # full: one config per invocation, the 2b long-context case apart (each under ~9 minutes; the
    # calibration and the compiles dominate; the JSON is rewritten after every case)
    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 experiments/bench_decode.py --configs 0.5b \\
        --out experiments/results/bench_decode_0.5b_h200.json
    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 experiments/bench_decode.py --configs 2b \\
        --long-context 0 --out experiments/results/bench_decode_2b_h200.json
    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 experiments/bench_decode.py --configs 2b \\
        --batches '' --out experiments/results/bench_decode_2b_long_h200.json
    # CPU smoke run (tiny config; numbers mean nothing)
    python experiments/bench_decode.py --cpu-smoke --out /tmp/bench_decode.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

SMOKE = dict(configs="tiny", batches="1,2", prompt_len=8, new_tokens=6, long_context=24,
             long_batches="1", rounds=2, calib_batch=4, calib_seq=32)
UNION_HEADROOM = 1.25  # on the largest union the probe saw: other prompts, other unions


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--configs", default="0.5b,2b", help="presets, comma-separated")
  p.add_argument("--init-from", help="a trained run (or HF) directory: its weights, no calibration")
  p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                 metavar="SECTION.FIELD=VALUE", help="config overrides, e.g. model.n_layers=4")
  p.add_argument("--sparsity", type=float, default=0.995, help="calibrated gate sparsity")
  p.add_argument("--profile", choices=("skewed", "uniform"), default="skewed")
  p.add_argument("--batches", default="1,8,64", help="batch sizes at --prompt-len")
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--long-context", type=int, default=2048, help="prompt length of the long case "
                 "(0: none)")
  p.add_argument("--long-batches", default="1,8", help="batch sizes of the long case")
  p.add_argument("--rounds", type=int, default=5, help="timed dense/sparse rounds (median)")
  p.add_argument("--calib-batch", type=int, default=16, help="calibration sequences")
  p.add_argument("--calib-seq", type=int, default=2048,
                 help="calibration sequence length (bench_model.py calibrates at 16 x 2048)")
  p.add_argument("--max-union-fraction", type=float,
                 help="SparseFFNConfig.decode_max_union_fraction of the sparse model (default: the "
                      "config's): the union path runs only if U <= this x d_ff")
  p.add_argument("--cublas", action="store_true",
                  help="compile generation with xla_gpu_enable_triton_gemm=False (cuBLAS GEMMs; "
                       "measured slower on the H200, see Generator's compiler_options)")
  p.add_argument("--xla-option", dest="xla_options", nargs="+", action="extend", default=[],
                 metavar="NAME=VALUE",
                 help="XLA compiler options for every generation program (after --cublas), e.g. "
                      "xla_gpu_enable_dynamic_slice_fusion=true")
  p.add_argument("--no-best-dense", dest="best_dense", action="store_false",
                  help="with --layers scan, do not also time the dense model with its layers "
                       "unrolled (separate per-layer weights: no weight-slice copies, the fastest "
                       "dense generation measured) and report speedup_decode_vs_best_dense")
  p.add_argument("--layers", choices=("unrolled", "scan"), default="unrolled",
                 help="the Generator's layer layout for both models (its default: unrolled; "
                      "scan compiles faster but copies each layer's weight slices every step)")
  p.add_argument("--unrolled", dest="layers", action="store_const", const="unrolled",
                 help="the same as --layers unrolled (the default)")
  p.add_argument("--decode-path", choices=("auto", "kernel", "union"), default="auto",
                 help="the sparse model's decode steps: the Generator's own choice by batch size "
                      "and layout (auto), the decode kernels (pallas_kernels/twell_decode.py) "
                      "or the XLA union path")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cpu-smoke", action="store_true", help="tiny config, tiny shapes, any device")
  p.add_argument("--out", default="experiments/results/bench_decode.json")
  args = p.parse_args(argv)
  if args.cpu_smoke:
    defaults = p.parse_args([])
    for k, v in SMOKE.items():  # smoke sizes, unless given on the command line
      if getattr(args, k) == getattr(defaults, k):
        setattr(args, k, v)
  return args


def _ints(s: str) -> list[int]:
  return [int(v) for v in s.split(",") if v.strip()]


def build_models(args, config: str):
  """(sparse model, dense twin sharing its arrays, Config, tokenizer vocabulary, calibration)."""
  from flax import nnx

  from sparse_jax.config import apply_overrides, get_config
  from sparse_jax.eval.loading import load_checkpoint, rebuild
  from sparse_jax.nn import Transformer
  from sparse_jax.train import resolve_config

  calibration = None
  if args.init_from:
    loaded = load_checkpoint(args.init_from, compute_dtype="bfloat16")
    if loaded.cfg.model.ffn not in ("relu_sparse", "relu_dense"):
      raise ValueError(f"--init-from: the checkpoint's FFN is {loaded.cfg.model.ffn!r}; the "
                       "benchmark compares relu_dense with relu_sparse")
    sparse, cfg = rebuild(loaded.model, loaded.cfg, ffn="relu_sparse")
    n_ids = loaded.tokenizer.vocab_size
  else:
    cfg, tokenizer = resolve_config(apply_overrides(get_config(config), args.overrides))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ffn="relu_sparse"))
    sparse = Transformer(cfg.model, rngs=nnx.Rngs(params=args.seed))
    n_ids = tokenizer.vocab_size
    if args.sparsity > 0:
      from sparse_jax.calibrate import calibrate_gates
      tokens = np.random.default_rng(1000 + args.seed).integers(
          0, n_ids, size=(args.calib_batch, args.calib_seq), dtype=np.int32)
      calibration = calibrate_gates(sparse, tokens, target_active_fraction=1.0 - args.sparsity,
                                    profile=args.profile, seed=args.seed)
  dense, _ = rebuild(sparse, cfg, ffn="relu_dense")
  return sparse, dense, cfg, n_ids, calibration


def set_decode_config(model, batch: int, union_capacity: int, max_union_fraction: float | None,
                      path: str = "union"):
  """The sparse FFNs' config for decode steps of ``batch`` tokens: the decode kernels
  (``path="kernel"``) or the union path with union capacity U (static fields: the Generator
  built after this compiles with them). Returns whether the decode steps take that path."""
  from sparse_jax.ops import decode
  if path == "kernel":
    cfg = dataclasses.replace(model.blocks[0].ffn.sparse_config, decode_max_tokens=batch,
                              decode_path="kernel")
    for block in model.blocks:
      block.ffn.sparse_config = cfg
    from pallas_kernels import common
    return (common.hopper_available()
            and decode.kernel_supports(batch, model.cfg.d_model, model.cfg.d_ff) is None)
  cfg = dataclasses.replace(model.blocks[0].ffn.sparse_config, decode_max_tokens=batch,
                            decode_path="union", decode_union_capacity=union_capacity)
  if max_union_fraction is not None:
    cfg = dataclasses.replace(cfg, decode_max_union_fraction=max_union_fraction)
  for block in model.blocks:
    block.ffn.sparse_config = cfg
  return decode.use_decode(batch, model.cfg.d_ff, cfg)


def _median(xs):
  xs = [x for x in xs if x is not None]
  return statistics.median(xs) if xs else None


def run_case(args, sparse, dense_gen, n_ids: int, batch: int, prompt_len: int, meter,
             dense_unrolled_gen=None) -> dict:
  from sparse_jax.nn.generate import Generator
  from sparse_jax.ops import decode

  d_ff = sparse.cfg.d_ff
  rng = np.random.default_rng(args.seed + 7 * batch + prompt_len)
  probe_prompts = rng.integers(0, n_ids, size=(batch, prompt_len), dtype=np.int32)
  prompts = rng.integers(0, n_ids, size=(batch, prompt_len), dtype=np.int32)
  n_new = args.new_tokens
  # The same shape as the timed calls: the probe compiles the dense program they use.
  probe = dense_gen.generate(probe_prompts, max_new_tokens=n_new, n_ids=n_ids)
  union_max = float(probe.step_union_SxL.max())
  # Whole 128-row tiles of gathered weights; tiny smoke models (d_ff of a few hundred) use 16.
  unit = decode.UNION_ROUND if d_ff >= 16 * decode.UNION_ROUND else 16
  u_cap = min(d_ff, unit * math.ceil(UNION_HEADROOM * union_max / unit))
  kind = getattr(args, "decode_path", "union")
  decode_path = set_decode_config(sparse, batch, max(u_cap, 1), args.max_union_fraction,
                                  "kernel" if kind == "auto" else kind)
  # auto: the Generator's own choice; otherwise the decode path set above (set_decode_config).
  sparse_gen = Generator(sparse, scan_layers=args.layers == "scan",
                         decode_path="auto" if kind == "auto" else "model",
                         compiler_options=_compiler_options(args))
  used = (sparse_gen.decode_path_for(batch) or "model") if kind == "auto" else kind
  if used == "dense":
    decode_path = False
  gens = {"dense": dense_gen, "sparse": sparse_gen}
  if dense_unrolled_gen is not None:
    gens["dense_unrolled"] = dense_unrolled_gen
  first = {v: g.generate(prompts, max_new_tokens=n_new, n_ids=n_ids) for v, g in gens.items()}
  # The probe compiled the dense programs of this shape (the first case of a config; later cases
  # of the same shape reuse them).
  compile_s = {v: g.compile_s for v, g in first.items()}
  compile_s["dense"] = probe.compile_s
  runs = {v: [] for v in gens}
  order = list(gens)
  for r in range(args.rounds):
    for v in (order if r % 2 == 0 else order[::-1]):
      meter.start()
      g = gens[v].generate(prompts, max_new_tokens=n_new, n_ids=n_ids)
      energy = meter.stop()
      runs[v].append((g, energy))
  row = dict(batch=batch, prompt_len=prompt_len, new_tokens=n_new, d_ff=d_ff,
             probe_union_max=union_max, union_capacity=u_cap, decode_path=bool(decode_path),
             decode_path_kind=kind,
             decode_path_used=used)
  for v, rs in runs.items():
    gs = [g for g, _ in rs]
    prefill_s = _median([g.prefill_s for g in gs])
    decode_s = _median([g.decode_s for g in gs])
    steps = len(gs[0].step_active_SxL)
    mj = _median([e.get("energy_mj") for _, e in rs])
    row[v] = dict(
        compile_s=compile_s[v], prefill_ms=prefill_s * 1e3, decode_ms=decode_s * 1e3,
        prefill_tokens_per_s=batch * prompt_len / prefill_s,
        decode_tokens_per_s=batch * steps / decode_s,
        end_to_end_tokens_per_s=batch * n_new / (prefill_s + decode_s),
        mj_per_generated_token=None if mj is None else mj / (batch * n_new),
        energy_method=rs[0][1].get("energy_method"), energy_error=rs[0][1].get("energy_error"),
        active_per_token_mean=float(gs[0].step_active_SxL.mean()),
        union_per_step_mean=float(gs[0].step_union_SxL.mean()),
        union_per_step_max=float(gs[0].step_union_SxL.max()),
        dense_fallback_share=float(gs[0].step_dense_fallback_SxL.mean()),
        decode_ms_rounds=[g.decode_s * 1e3 for g in gs])
  same = first["dense"].tokens_BxN == first["sparse"].tokens_BxN
  row["greedy_tokens_equal_share"] = float(same.mean())
  row["speedup_decode"] = row["sparse"]["decode_tokens_per_s"] / row["dense"]["decode_tokens_per_s"]
  row["speedup_end_to_end"] = (row["sparse"]["end_to_end_tokens_per_s"]
                               / row["dense"]["end_to_end_tokens_per_s"])
  if dense_unrolled_gen is not None:
    # Against the fastest dense generation measured in this case: the scanned dense model pays
    # XLA's copies of each layer's weight slices, the unrolled one does not (generate.py).
    best = max(row["dense"]["decode_tokens_per_s"], row["dense_unrolled"]["decode_tokens_per_s"])
    row["speedup_decode_vs_best_dense"] = row["sparse"]["decode_tokens_per_s"] / best
    row["dense_unrolled_tokens_equal_share"] = float(
        (first["dense_unrolled"].tokens_BxN == first["dense"].tokens_BxN).mean())
  return row


def _compiler_options(args) -> dict:
  opts = {"xla_gpu_enable_triton_gemm": False} if args.cublas else {}
  for item in args.xla_options:
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise SystemExit(f"--xla-option wants NAME=VALUE, got {item!r}")
    low = value.lower()
    opts[name] = (low == "true") if low in ("true", "false") else (
        int(value) if value.lstrip("-").isdigit() else value)
  return opts


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.cpu_smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from experiments.bench_model import EnergyMeter
  from sparse_jax.nn.generate import Generator

  device = jax.devices()[0]
  meter = EnergyMeter(device)
  result = dict(
      command=shlex.join([sys.executable, *sys.argv]) if argv is None
      else shlex.join(["experiments/bench_decode.py", *argv]),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      device=f"{device.platform}:{getattr(device, 'device_kind', device.platform)}",
      energy_method=meter.method, energy_error=meter.error, args=vars(args), rows=[])
  cases = [(b, args.prompt_len) for b in _ints(args.batches)]
  if args.long_context:
    cases += [(b, args.long_context) for b in _ints(args.long_batches)]
  for config in args.configs.split(","):
    t0 = time.perf_counter()
    sparse, dense, cfg, n_ids, calibration = build_models(args, config)
    build_s = time.perf_counter() - t0
    dense_gen = Generator(dense, scan_layers=args.layers == "scan",
                          compiler_options=_compiler_options(args))
    dense_unrolled_gen = (Generator(dense, scan_layers=False,
                                    compiler_options=_compiler_options(args))
                          if args.best_dense and args.layers == "scan" else None)
    for batch, prompt_len in cases:
      row = run_case(args, sparse, dense_gen, n_ids, batch, prompt_len, meter,
                     dense_unrolled_gen)
      row.update(config=config, layers=args.layers,
                 compiler_options=dense_gen.compiler_options,
                 init_from=args.init_from, n_layers=cfg.model.n_layers,
                 sparsity_target=None if calibration is None else args.sparsity,
                 profile=None if calibration is None else args.profile, build_s=build_s)
      result["rows"].append(row)
      d, s = row["dense"], row["sparse"]
      print(f"{config:>5} B={batch:<3} P={prompt_len:<5} decode tok/s dense "
            f"{d['decode_tokens_per_s']:9.1f} sparse {s['decode_tokens_per_s']:9.1f} "
            f"({row['speedup_decode']:.2f}x); end-to-end "
            f"{row['speedup_end_to_end']:.2f}x; U={row['union_capacity']} (probe max "
            f"{row['probe_union_max']:.0f}, decode path {row['decode_path_used']}); fallback "
            f"{s['dense_fallback_share']:.3f}; compile dense {d['compile_s']:.1f} s sparse "
            f"{s['compile_s']:.1f} s; same greedy tokens {row['greedy_tokens_equal_share']:.3f}",
            flush=True)
      if "dense_unrolled" in row:
        u = row["dense_unrolled"]
        print(f"{'':>5} dense unrolled {u['decode_tokens_per_s']:9.1f} tok/s (compile "
              f"{u['compile_s']:.1f} s): sparse vs the best dense "
              f"{row['speedup_decode_vs_best_dense']:.2f}x", flush=True)
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    del sparse, dense, dense_gen, dense_unrolled_gen
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
