"""Tunes the decode kernels' config (pallas_kernels/twell_decode.py) and checks the dense baseline
in the decode regime, wall clock side by side, 8 layers of separate weights (HBM-resident).

Candidates per batch size B: the dense FFN as ``ops.dense.ffn_as_model`` computes it (a dense
model's FFN; an earlier version of this script also timed plain bf16 dots and 8-row padding,
which ``ffn_as_model`` now does: tune_decode_h200.json), and the decode kernels under
each ``--configs`` entry ``tile_k:stages:down_tiles[:narrow][:sN]`` (``narrow``:
``DecodeConfig.narrow_partials``; ``sN``: ``gate_split=N``, the gate streamed by N CTAs per tile). ``kernel_gateonly``
is the default config with a threshold no gate reaches: the gate stream, an idle down kernel and
the glue, i.e. the kernels' cost before any up/down byte. ``--cupti`` adds each candidate's
per-kernel breakdown (CUPTI, one call; GPU only): how the time per layer splits between the gate
kernel, the down kernel and XLA's glue (pad, partial sums, casts), against the wall clock.

    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 experiments/tune_decode.py \\
        --out experiments/results/tune_decode_h200.json
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shape", default="2048x5632")
  ap.add_argument("--batches", default="1,8,64")
  ap.add_argument("--dist", default="skewed")
  ap.add_argument("--active", type=float, default=28.0)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--configs", nargs="+",
                  default=["256:4:11", "256:4:11:narrow", "128:4:11", "256:4:22:narrow"])
  ap.add_argument("--cupti", action="store_true",
                  help="also a per-kernel CUPTI breakdown of each candidate (GPU only)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  import jax.numpy as jnp

  from pallas_kernels import twell_decode as td
  from sparse_jax.benchmarking import ffn_cases, results, timing
  from sparse_jax.ops.dense import ffn_as_model

  d, n = ffn_cases.parse_shape(args.shape)
  records = []
  for b in (int(v) for v in args.batches.split(",")):
    m_pad = td.pad_tokens(b)
    probs = ffn_cases.decode_problems(b, args.layers, b, d, n, active=args.active,
                                      distribution=args.dist)
    ins = ffn_cases.layer_inputs(probs, "unrolled")
    unrolled = lambda f: ffn_cases.over_layers(f, "unrolled")  # noqa: E731

    fns = {"dense": unrolled(lambda *a: ffn_as_model(*a)[0])}

    def kernels(cfg=None, threshold=0.0):
      """The decode kernels under ``cfg`` (None: the default) on one layer's unpadded x."""
      def f(x, g, u, dn):
        xp = jnp.pad(x, ((0, m_pad - x.shape[0]), (0, 0)))
        return td.decode_ffn(xp, g, u, dn, threshold=threshold, config=cfg)[0][:x.shape[0]]
      return unrolled(f)

    fns["kernel_gateonly"] = kernels(threshold=GATE_ONLY)
    for spec in args.configs:
      cfg = parse_config(spec)
      if max(cfg.gate_smem_bytes(m_pad), cfg.down_smem_bytes(m_pad)) > td.SMEM_LIMIT:
        continue
      if cfg.gate_split > 1:  # the split gate stream alone
        fns[f"kernel_gateonly_{spec}"] = kernels(cfg, threshold=GATE_ONLY)
      fns[f"kernel_{spec}"] = kernels(cfg)
    ok = {}
    for name, f in list(fns.items()):
      try:
        y = f(*ins)
        ok[name] = (None if name.startswith("kernel_gateonly")
                    else ffn_cases.rel_err_f32(y[0], probs[0], jnp.arange(b)))
      except Exception as e:  # a config that does not compile is reported, not fatal
        print(f"B={b} {name}: {results.short_error(e, 300)}", file=sys.stderr)
        fns.pop(name)
    t = timing.side_by_side(fns, ins, rounds=args.rounds, calls_per_round=None, baseline="dense")
    breakdown = {name: kernel_breakdown(f, ins, args.layers) for name, f in fns.items()
                 if args.cupti}
    for name, c in t["candidates"].items():
      records.append(dict(batch=b, candidate=name, us_per_layer=c["median_ms"] * 1e3 / args.layers,
                          speedup_vs_dense=t["speedup"].get(name, 1.0), rel_err=ok.get(name),
                          **({"kernels_us_per_layer": breakdown[name]} if name in breakdown
                             else {})))
      if name in breakdown:
        print(f"  B={b} {name}: {c['median_ms'] * 1e3 / args.layers:.1f} us/layer wall; kernels "
              + ", ".join(f"{k} {v:.2f}" for k, v in breakdown[name].items()), flush=True)
    best = min(t["candidates"], key=lambda k: t["candidates"][k]["median_ms"])
    print(f"B={b}: " + "  ".join(f"{k} {v['median_ms'] * 1e3 / args.layers:.1f}us"
                                for k, v in t["candidates"].items()) + f"  best {best}",
          flush=True)
    if args.out:
      results.write_results(args.out, results.run_header(), records)
  return 0


def parse_config(spec: str):
  """``tile_k:stages:down_tiles[:narrow][:sN]`` -> ``DecodeConfig``."""
  from pallas_kernels import twell_decode as td
  parts = spec.split(":")
  flags = parts[3:]
  bad = [f for f in flags if f != "narrow" and not (f[:1] == "s" and f[1:].isdigit())]
  if len(parts) < 3 or bad:
    raise ValueError(f"config {spec!r}: expected tile_k:stages:down_tiles[:narrow][:sN]")
  tk, st, dt = (int(v) for v in parts[:3])
  split = next((int(f[1:]) for f in flags if f.startswith("s")), 1)
  return td.DecodeConfig(tile_k=tk, max_concurrent_steps=st, down_tiles_per_cta=dt,
                         narrow_partials="narrow" in flags, gate_split=split)


MOSAIC = "anonymous_mosaic_gpu_kernel"
GATE_ONLY = 1e30  # a threshold no gate reaches: the gate stream, an idle down kernel and the glue


def kernel_breakdown(f, ins, layers: int) -> dict[str, float]:
  """{kernel name: us per layer} of one call of ``f`` (CUPTI; the names as XLA gives them, summed
  over the call's layers), plus "total" (all kernels) per layer. Mosaic kernels are all named
  alike: they are told apart by their place in the layer's launch order ("mosaic#1" = the first
  decode kernel of each layer, ...)."""
  from sparse_jax.benchmarking import cupti_breakdown
  kernels = cupti_breakdown(f, *ins)
  n_mosaic = sum(name == MOSAIC for name, _ in kernels)
  per_layer = max(n_mosaic // layers, 1)
  per: dict[str, float] = {}
  i = 0
  for name, ms in kernels:
    if name == MOSAIC:
      name, i = f"mosaic#{i % per_layer + 1}", i + 1
    per[name] = per.get(name, 0.0) + ms * 1e3 / layers
  per = dict(sorted(per.items(), key=lambda kv: -kv[1]))
  per["total"] = sum(per.values())
  return per


if __name__ == "__main__":
  sys.exit(main())
