"""Tunes the decode kernels' config (pallas_kernels/twell_decode.py) and checks the dense baseline
in the decode regime, wall clock side by side, 8 layers of separate weights (HBM-resident).

Candidates per batch size B: the dense FFN as ``ops.dense.ffn_as_model`` computes it (f32
accumulation asked for at small M), the same with the rows padded to 8 (``dense_pad8``: XLA then
calls cuBLAS at M = 1 too), plain bf16 dots (``dense_bf16dot``), and the decode kernels under
each ``--configs`` entry ``tile_k:stages:down_tiles``.

    PYTHONPATH=$PWD JAX_PLATFORMS=cuda python3 experiments/tune_decode.py \\
        --out experiments/results/tune_decode_h200.json
"""
from __future__ import annotations

import argparse
import dataclasses
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
                  default=["128:4:11", "128:6:11", "128:8:11", "256:4:11", "64:8:11",
                           "128:4:6", "128:4:22"])
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from jax import lax

  from pallas_kernels import twell_decode as td
  from sparse_jax.benchmarking import ffn_cases, results, timing
  from sparse_jax.ops.dense import ffn_as_model
  from sparse_jax.synthetic import make_ffn_problem

  d, n = ffn_cases.parse_shape(args.shape)
  records = []
  for b in (int(v) for v in args.batches.split(",")):
    keys = jax.random.split(jax.random.key(b), args.layers)
    probs = [make_ffn_problem(k, max(b, 256), d, n, active_per_token=args.active,
                              distribution=args.dist) for k in keys]
    probs = [dataclasses.replace(p, x=p.x[:b]) for p in probs]
    ins = tuple([getattr(p, nm) for p in probs] for nm in ("x", "w_gate", "w_up", "w_down"))

    def unrolled(f):
      return jax.jit(lambda xs, gs, us, ds: jnp.stack([f(*a) for a in zip(xs, gs, us, ds)]))

    def pad8(x, g, u, dn):
      xp = jnp.pad(x, ((0, (-x.shape[0]) % 8), (0, 0)))
      return ffn_as_model(xp, g, u, dn)[0][:x.shape[0]]

    def bf16dot(x, g, u, dn):
      dot = lambda a, b_, dims: lax.dot_general(a, b_, (dims, ((), ())))
      h = jnp.maximum(dot(x, g, ((1,), (1,))), 0) * dot(x, u, ((1,), (1,)))
      return dot(h, dn, ((1,), (0,)))

    fns = {"dense": unrolled(lambda *a: ffn_as_model(*a)[0]), "dense_pad8": unrolled(pad8),
           "dense_bf16dot": unrolled(bf16dot)}
    m_pad = td.pad_tokens(b)
    for spec in args.configs:
      tk, st, dt = (int(v) for v in spec.split(":"))
      cfg = td.DecodeConfig(tile_k=tk, max_concurrent_steps=st, down_tiles_per_cta=dt)
      if cfg.gate_smem_bytes(m_pad) > 227 * 1024 or cfg.down_smem_bytes(m_pad) > 227 * 1024:
        continue

      def kern(x, g, u, dn, cfg=cfg):
        xp = jnp.pad(x, ((0, m_pad - x.shape[0]), (0, 0)))
        return td.decode_ffn(xp, g, u, dn, config=cfg)[0][:x.shape[0]]
      fns[f"kernel_{spec}"] = unrolled(kern)
    ok = {}
    for name, f in list(fns.items()):
      try:
        y = f(*ins)
        ok[name] = ffn_cases.rel_err_f32(y[0], probs[0], jnp.arange(b))
      except Exception as e:  # a config that does not compile is reported, not fatal
        print(f"B={b} {name}: {results.short_error(e, 300)}", file=sys.stderr)
        fns.pop(name)
    t = timing.side_by_side(fns, ins, rounds=args.rounds, calls_per_round=None, baseline="dense")
    for name, c in t["candidates"].items():
      records.append(dict(batch=b, candidate=name, us_per_layer=c["median_ms"] * 1e3 / args.layers,
                          speedup_vs_dense=t["speedup"].get(name, 1.0), rel_err=ok.get(name)))
    best = min(t["candidates"], key=lambda k: t["candidates"][k]["median_ms"])
    print(f"B={b}: " + "  ".join(f"{k} {v['median_ms'] * 1e3 / args.layers:.1f}us"
                                for k, v in t["candidates"].items()) + f"  best {best}",
          flush=True)
    if args.out:
      results.write_results(args.out, results.run_header(), records)
  return 0


if __name__ == "__main__":
  sys.exit(main())
