"""Where a generation decode step goes, dense vs sparse: every kernel of one step (CUPTI), grouped
by kind, against the step's wall clock.

Generation of a 2b model at small batch is far from its weight-byte floor (dense 3.4-4.9 ms per
step against ~0.86 ms of weights on an H200; pallas_kernels/NOTES_decode.md): this shows which
kernels a step runs and how long each takes, and how much of the wall clock is not kernel time
(launch gaps, host work). One decode step of the Generator (``Generator.decode_step_program``:
the decode loop's own step body, the prompts' prefill in its cache) is timed on the wall clock
(back-to-back calls) and broken down with CUPTI, for the dense twin and the sparse model, with
the same calibrated weights as ``bench_decode.py``.

    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 experiments/profile_decode.py --config 2b \\
        --batch 1 --out experiments/results/profile_decode_2b_b1_h200.json
    python experiments/profile_decode.py --cpu-smoke --out /tmp/profile_decode.json
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default="2b")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--prompt-len", type=int, default=128)
  ap.add_argument("--new-tokens", type=int, default=16, help="the cache holds prompt + this")
  ap.add_argument("--sparsity", type=float, default=0.995, help="calibrated gate sparsity")
  ap.add_argument("--profile", choices=("skewed", "uniform"), default="skewed")
  ap.add_argument("--calib-batch", type=int, default=4)
  ap.add_argument("--calib-seq", type=int, default=512)
  ap.add_argument("--decode-path", choices=("kernel", "dense"), default="kernel",
                  help="what the sparse model's FFNs run at the decode step")
  ap.add_argument("--layers", choices=("unrolled", "scan"), default="unrolled",
                  help="the Generator's layer layout (its default: unrolled)")
  ap.add_argument("--unroll-decode", action="store_true",
                  help="with --layers scan: the decode step over static slices of the stacked "
                       "layers (Generator(unroll_decode=True)) instead of the layer scan")
  ap.add_argument("--calls", type=int, default=50, help="back-to-back calls of the wall clock")
  ap.add_argument("--top", type=int, default=20, help="kernel groups listed per model")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--cpu-smoke", action="store_true",
                  help="tiny config on the CPU: wall clock only (no CUPTI), numbers mean nothing")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  if args.cpu_smoke:
    args.config, args.prompt_len, args.new_tokens, args.calib_seq, args.calls = (
        "tiny", 8, 4, 32, 3)
  return args


def kernel_kind(name: str) -> str:
  """A coarse kind of a CUPTI kernel name (XLA fusions keep their fusion kind)."""
  low = name.lower()
  if "mosaic" in low or low.startswith("main_kernel") or "pallas" in low:
    return "pallas"
  if "gemm" in low or "xmma" in low or "cutlass" in low or "cublas" in low or "gemv" in low:
    return "gemm"
  if "memcpy" in low or "memset" in low:
    return "copy"
  if "fusion" in low:  # XLA's fusion kinds: loop_*, input_* (reductions), ...
    return low.split("_")[0] + "_fusion"
  return "other"


def group(kernels: list[tuple[str, float]]) -> list[dict]:
  """Kernels grouped by name less its numeric suffixes: calls, total and mean microseconds."""
  acc = collections.OrderedDict()
  for name, ms in kernels:
    base = re.sub(r"([._]\d+)+$", "", name)
    g = acc.setdefault(base, dict(name=base, kind=kernel_kind(name), calls=0, us=0.0))
    g["calls"] += 1
    g["us"] += ms * 1e3
  out = sorted(acc.values(), key=lambda g: -g["us"])
  for g in out:
    g["us_per_call"] = g["us"] / g["calls"]
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.cpu_smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np

  from experiments.bench_decode import build_models
  from sparse_jax.benchmarking import cupti_breakdown, results
  from sparse_jax.benchmarking.timing import wall_ms_per_call
  from sparse_jax.nn.generate import Generator

  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.cpu_smoke:
    print("no GPU: run with --cpu-smoke for a smoke run", file=sys.stderr)
    return 2
  build_args = argparse.Namespace(init_from=None, overrides=[], seed=args.seed,
                                  sparsity=args.sparsity, calib_batch=args.calib_batch,
                                  calib_seq=args.calib_seq, profile=args.profile)
  sparse, dense, cfg, n_ids, _ = build_models(build_args, args.config)
  rng = np.random.default_rng(args.seed)
  prompts = rng.integers(0, n_ids, size=(args.batch, args.prompt_len), dtype=np.int32)
  n_layers = cfg.model.n_layers
  header = results.run_header()
  records = []
  for name, model, path in (("dense", dense, "model"), ("sparse", sparse, args.decode_path)):
    gen = Generator(model, scan_layers=args.layers == "scan", decode_path=path,
                    unroll_decode=args.unroll_decode)
    f, a = gen.decode_step_program(prompts, max_new_tokens=args.new_tokens,
                                   step=args.new_tokens // 2)
    dispatch_ms, wall_ms = wall_ms_per_call(f, *a, calls=args.calls)
    kernels = cupti_breakdown(f, *a) if on_gpu else []
    groups = group(kernels)
    kernel_ms = sum(ms for _, ms in kernels)
    kinds = collections.Counter()
    for g in groups:
      kinds[g["kind"]] += g["us"]
    rec = dict(model=name, decode_path=gen.decode_path, layers=args.layers,
               unroll_decode=args.unroll_decode,
               batch=args.batch, prompt_len=args.prompt_len, n_layers=n_layers,
               wall_ms=wall_ms, dispatch_ms=dispatch_ms, kernel_ms=kernel_ms,
               kernels=len(kernels), kernels_per_layer=len(kernels) / n_layers,
               gap_ms=wall_ms - kernel_ms if kernels else None,
               us_by_kind=dict(kinds.most_common()), groups=groups)
    records.append(rec)
    print(f"--- {name}: wall {wall_ms:.3f} ms/step, kernels {kernel_ms:.3f} ms "
          f"({len(kernels)} launches, {len(kernels) / n_layers:.1f} per layer), "
          f"host dispatch {dispatch_ms:.3f} ms")
    if kinds:
      print("    by kind: " + ", ".join(f"{k} {v:.0f} us" for k, v in kinds.most_common()))
    head = ("kernel", "kind", "calls", "us total", "us/call")
    rows = [(g["name"][:60], g["kind"], str(g["calls"]), f"{g['us']:.1f}",
             f"{g['us_per_call']:.2f}") for g in groups[:args.top]]
    if rows:
      print(results.format_table(head, rows))
    if args.out:
      results.write_results(args.out, header, records)
  if len(records) == 2:
    d, s = records
    print(f"step: dense {d['wall_ms']:.3f} ms, sparse {s['wall_ms']:.3f} ms -> "
          f"{d['wall_ms'] / s['wall_ms']:.2f}x")
  if args.out:
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
