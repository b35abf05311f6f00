"""Where a whole training step's peak memory goes, dense vs sparse: compiles (does not run) the
run loop's train step (``sparse_jax.train.step``) of a preset for abstract inputs, prints XLA's
memory analysis of each, and with ``--dump`` has XLA write its buffer assignment (the live
buffers at the peak) for offline reading.

The 2b training step with remat measured a larger compiled peak sparse than dense (47.9 vs 43.6
GB, ``results/bench_model_2b_train_defer_h200.json``) while 0.5b was even (21.2 vs 21.1): this
compiles the same step at several depths to see whether the difference grows per layer.

    python3 experiments/probe_train_memory.py --config 2b --layers 4 12 --dump $OUT/dump \
        --out $OUT/probe_train_memory.json    # GPU, compile only, ~2 min
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="2b")
  ap.add_argument("--layers", type=int, nargs="+", default=[4, 12])
  ap.add_argument("--models", nargs="+", default=["dense", "sparse"], choices=("dense", "sparse"))
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--set", dest="overrides", nargs="+", default=[],
                  help="config overrides for both models (e.g. model.remat=false)")
  ap.add_argument("--dump", help="XLA dump directory (buffer assignment of each step)")
  ap.add_argument("--out", default="experiments/results/probe_train_memory.json")
  args = ap.parse_args(argv)
  if args.dump:  # before jax initialises its backend
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (f"{flags} --xla_dump_to={args.dump} --xla_dump_hlo_pass_re=^$ "
                               "--xla_dump_hlo_module_re=.*train_step.*").strip()

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sparse_jax.benchmarking import compiled_memory
  from sparse_jax.benchmarking.results import command_line, write_results
  from sparse_jax.config import apply_overrides, get_config
  from sparse_jax.train.dispatch import LayerOp, graphdef_for
  from sparse_jax.train.loop import step_config
  from sparse_jax.nn import Transformer
  from sparse_jax.train.step import _state_around, no_hold, train_step

  records = []
  for n_layers in args.layers:
    for kind in args.models:
      ffn = "relu_dense_bf16" if kind == "dense" else "relu_sparse"
      cfg = apply_overrides(get_config(args.config), [
          f"model.n_layers={n_layers}", f"model.ffn={ffn}", "model.vocab_size=49152",
          f"train.batch_size={args.batch}", "train.grad_accum=1", f"data.seq_len={args.seq}",
          *args.overrides])
      scfg = step_config(cfg)
      graphdef, params = nnx.split(nnx.eval_shape(
          lambda: Transformer(cfg.model, rngs=nnx.Rngs(params=0))), nnx.Param)
      if kind == "sparse":  # the pattern auto_host settles on at 99.5%: every layer sparse
        graphdef = graphdef_for(graphdef, params, tuple(LayerOp("sparse")
                                                        for _ in range(n_layers)),
                                cfg.train.overflow_fallback)
      state = jax.eval_shape(lambda p: _state_around(p, cfg), params)
      batch = jax.ShapeDtypeStruct((1, args.batch, args.seq + 1), jnp.int32)
      t0 = time.perf_counter()
      compiled = train_step.lower(state, batch, no_hold(), graphdef=graphdef, cfg=scfg).compile()
      mem = compiled_memory(compiled)
      rec = dict(layers=n_layers, model=kind, compile_s=time.perf_counter() - t0, **mem)
      records.append(rec)
      print(f"{n_layers:3d} layers {kind:6s}: peak {mem['peak_bytes'] / 1e9:7.2f} GB "
            f"(temp {mem['memory_analysis']['temp'] / 1e9:.2f}, argument "
            f"{mem['memory_analysis']['argument'] / 1e9:.2f}) compiled in {rec['compile_s']:.0f} s",
            flush=True)
  by = {(r["layers"], r["model"]): r for r in records}
  for n in args.layers if len(args.models) == 2 else []:
    d, s = by[(n, "dense")], by[(n, "sparse")]
    print(f"{n:3d} layers: sparse - dense temp "
          f"{(s['memory_analysis']['temp'] - d['memory_analysis']['temp']) / 1e9:+.2f} GB")
  write_results(args.out, dict(command=command_line(), device=str(jax.devices()[0]),
                               jax=jax.__version__, config=args.config, batch=args.batch,
                               seq=args.seq, overrides=args.overrides), records)


if __name__ == "__main__":
  main()
