"""Decode-regime FFN, dense vs the decode kernels, wall clock side by side, as generation runs it.

Generation calls each layer's FFN once per step with B tokens (B = the batch). This times one
decode step's FFNs: ``--layers`` layers with their own weights (so the weights stream from HBM as
in a model: one layer's gate fits in the 50 MB L2, a stack of layers does not), scanned inside
one jitted call, B tokens per layer with the activity drawn per distribution
(``sparse_jax.synthetic``). Candidates, timed alternately in this process
(``sparse_jax.benchmarking.timing.side_by_side``, median of rounds):

  dense        ``ops.dense.ffn_as_model``: the bf16 dense FFN a dense model runs (the baseline)
  kernel       the Pallas backend's inference primal with ``decode_path="kernel"``: the decode
               kernels of ``pallas_kernels/twell_decode.py`` (statistics unused, dropped by XLA)
  dense_path   the same with ``decode_path="dense"`` (the default before the kernels): should
               read ~1.0x

Floor (bytes per layer, bf16, HBM ~4.8 TB/s): dense ``3 |W|``; kernel ``|Wg| + f_tile (|Wu| +
|Wd|)``, f_tile = the fraction of 64-neuron tiles where some token of the batch fires (reported
per case, with its predicted ratio ``3 / (1 + 2 f_tile)``).

    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 experiments/bench_decode_ffn.py \\
        --out experiments/results/bench_decode_ffn_h200.json
    python experiments/bench_decode_ffn.py --cpu-smoke --out /tmp/bench_decode_ffn.json
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

LAYOUTS = ("unrolled", "stacked", "scan")  # sparse_jax.benchmarking.ffn_cases.LAYER_LAYOUTS


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shape", nargs="+", default=["2048x5632"],
                  help="d_model x d_ff per case (default the 2b model's FFN)")
  ap.add_argument("--batches", default="1,8,16,32,64,128,256",
                  help="tokens per decode step (comma-separated)")
  ap.add_argument("--dist", nargs="+", default=["skewed", "uniform", "zipf", "clustered",
                                                "heavy_tail"])
  ap.add_argument("--active", nargs="+", type=float, default=[28.0],
                  help="active neurons per token (28 of 5632: 99.5%% sparsity)")
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--layout", choices=LAYOUTS, default="unrolled",
                  help="unrolled: each layer's weights a separate array, the layers a Python "
                       "loop (what an unrolled model runs); stacked: stacked weights, a Python "
                       "loop indexing them statically (what the Generator's decode step runs); "
                       "scan: stacked weights under lax.map (what a layer-scanned model runs: "
                       "XLA copies each layer's slices before a GEMM reads them)")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--cpu-smoke", action="store_true",
                  help="tiny shapes, kernels in interpret mode on the CPU (numbers mean nothing)")
  ap.add_argument("--out", default=None)
  return ap.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.cpu_smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax.numpy as jnp
  import numpy as np
  from tqdm import tqdm

  from pallas_kernels import common, twell_decode
  from sparse_jax.benchmarking import ffn_cases, results, timing
  from sparse_jax.ops import SparseFFNConfig, pallas_backend
  from sparse_jax.ops.dense import ffn_as_model
  assert LAYOUTS == ffn_cases.LAYER_LAYOUTS

  if args.cpu_smoke:
    common._interpret = True  # noqa: SLF001 (the process-wide switch, as the env variable sets it)
    args.shape, args.batches, args.layers, args.rounds = ["256x512"], "1,16", 2, 2
    args.dist, args.active = args.dist[:2], [6.0]
  elif not results.gpu_platform_expected():
    print("no GPU: run with --cpu-smoke for a smoke run", file=sys.stderr)
    return 2
  header = results.run_header()
  batches = [int(b) for b in args.batches.split(",") if b]
  records = []

  def step_fn(path):
    if path == "dense":
      f = lambda x, wg, wu, wd: ffn_as_model(x, wg, wu, wd)[0]
    else:
      cfg = SparseFFNConfig(decode_path=path.removesuffix("_path"),
                            decode_max_tokens=max(batches))
      f = lambda x, wg, wu, wd: pallas_backend.gated_ffn(x, wg, wu, wd, cfg)[0]

    return ffn_cases.over_layers(f, args.layout)

  fns = {p: step_fn(p) for p in ("dense", "kernel", "dense_path")}
  cases = [(s, b, dist, a) for s in args.shape for b in batches for dist in args.dist
           for a in args.active]
  for shape, b, dist, active in tqdm(cases, desc="decode FFN cases", file=sys.stderr):
    d, n = ffn_cases.parse_shape(shape)
    probs = ffn_cases.decode_problems(args.seed + 1000 * b, args.layers, b, d, n, active=active,
                                      distribution=dist)
    ins = ffn_cases.layer_inputs(probs, args.layout)
    g = np.stack([np.asarray(p.x.astype(jnp.float32) @ p.w_gate.astype(jnp.float32).T)
                  for p in probs])
    fired = g > 0
    tiles = fired.reshape(args.layers, b, n // twell_decode.NEURON_TILE, -1).any(axis=(1, 3))
    f_tile = float(tiles.mean())
    ys = {p: fn(*ins) for p, fn in fns.items()}
    errs = {p: ffn_cases.rel_err_f32(ys[p][0], probs[0], np.arange(b)) for p in ys}
    t = timing.side_by_side(fns, ins, rounds=args.rounds, calls_per_round=None, baseline="dense")
    rec = dict(d_model=d, d_ff=n, batch=b, distribution=dist, active_per_token=active,
               layout=args.layout, xla_flags=os.environ.get("XLA_FLAGS", ""),
               measured_active_per_token=float(fired.sum(axis=2).mean()),
               union_per_layer=float(fired.any(axis=1).sum(axis=1).mean()),
               tile_fraction=f_tile, predicted_ratio=3.0 / (1.0 + 2.0 * f_tile),
               layers=args.layers, rel_err=errs,
               ms_per_layer={p: c["median_ms"] / args.layers for p, c in t["candidates"].items()},
               speedup=t["speedup"], speedup_paired=t["speedup_paired"], timing=t)
    records.append(rec)
    tqdm.write(f"{shape} B={b:4d} {dist:10s} a={active:5.1f} tiles {f_tile:5.1%} "
               f"dense {rec['ms_per_layer']['dense']*1e3:7.1f} us  kernel "
               f"{rec['ms_per_layer']['kernel']*1e3:7.1f} us  -> {t['speedup']['kernel']:.2f}x "
               f"(pred {rec['predicted_ratio']:.2f}x; dense_path {t['speedup']['dense_path']:.2f}x)"
               f"  err {errs['kernel']:.1e}", file=sys.stderr)
    if args.out:
      results.write_results(args.out, header, records)
  head = ("shape", "B", "dist", "act", "tiles", "dense us", "kernel us", "speedup", "pred",
          "dense_path", "err")
  rows = [(f"{r['d_model']}x{r['d_ff']}", str(r["batch"]), r["distribution"],
           f"{r['active_per_token']:.0f}", f"{r['tile_fraction']:.1%}",
           f"{r['ms_per_layer']['dense'] * 1e3:.1f}", f"{r['ms_per_layer']['kernel'] * 1e3:.1f}",
           f"{r['speedup']['kernel']:.2f}x", f"{r['predicted_ratio']:.2f}x",
           f"{r['speedup']['dense_path']:.2f}x", f"{r['rel_err']['kernel']:.1e}")
          for r in records]
  print(results.format_table(head, rows))
  if args.out:
    results.write_results(args.out, header, records)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
