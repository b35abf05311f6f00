"""The language-model loss with and without ``train.loss_chunk``: wall clock side by side, compiled
peak memory and gradient errors of ``jax.value_and_grad`` of ``head_cross_entropy`` over (hidden
states, head), the training step's use of it.

Every chunk size is timed alternately with the unchunked loss (chunk 0: the full fp32 logits, as
the step without ``train.loss_chunk``) in the same process on the same inputs; the headline is
``speedup`` = unchunked median / chunked median. Peak memory is XLA's compiled analysis of each
function. Gradient errors are against a float32 reference of the same loss (float32 operands at
full precision), on the whole batch.

    python3 experiments/bench_loss.py                       # H200: 8 x 2048 tokens, 2048 x 49152
    python3 experiments/bench_loss.py --vocab 128256        # Llama 3's vocabulary
    python3 experiments/bench_loss.py --cpu-smoke           # tiny shapes on the CPU
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--d-model", type=int, default=2048)
  ap.add_argument("--vocab", type=int, default=49152)
  ap.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024],
                  help="positions per chunk to compare with the unchunked loss")
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--cpu-smoke", action="store_true",
                  help="tiny shapes (2 x 64 tokens, 64 x 512), 2 rounds: runs on the CPU")
  ap.add_argument("--out", default="experiments/results/bench_loss.json")
  args = ap.parse_args(argv)
  if args.cpu_smoke:
    args.batch, args.seq, args.d_model, args.vocab, args.rounds = 2, 64, 64, 512, 2
    args.chunks = [c for c in args.chunks if c < args.seq] or [16]
  for c in args.chunks:
    if c <= 0 or args.seq % c:
      raise SystemExit(f"--chunks: {c} must be positive and divide --seq {args.seq}")

  import jax
  import jax.numpy as jnp

  from sparse_jax.benchmarking import compiled_memory
  from sparse_jax.benchmarking.results import (command_line, device_name, fmt, format_table,
                                               write_results)
  from sparse_jax.benchmarking.timing import side_by_side
  from sparse_jax.train.loss import cross_entropy, head_cross_entropy

  if not args.cpu_smoke and jax.devices()[0].platform != "gpu":
    raise SystemExit("bench_loss.py times the GPU; --cpu-smoke runs it on the CPU")
  f32 = jnp.float32
  kx, kw, kt = jax.random.split(jax.random.key(args.seed), 3)
  # Hidden states at the final norm's scale (unit RMS) and a head at its initial scale: logits
  # of order 1, as at the start of training.
  x = jax.random.normal(kx, (args.batch, args.seq, args.d_model), f32).astype(jnp.bfloat16)
  head = jax.random.normal(kw, (args.vocab, args.d_model), f32) * args.d_model ** -0.5
  targets = jax.random.randint(kt, (args.batch, args.seq), 0, args.vocab)

  def loss_and_grads(chunk):
    return jax.jit(jax.value_and_grad(
        lambda x, h, t: head_cross_entropy(x, h, t, chunk=chunk), argnums=(0, 1)))

  def reference(x, h, t):
    logits = jnp.einsum("bld,vd->blv", x.astype(f32), h, precision="highest")
    return cross_entropy(logits, t)

  ref_loss, (ref_dx, ref_dw) = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))(
      x, head, targets)

  def rel(a, b):
    a, b = jnp.asarray(a, f32), jnp.asarray(b, f32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))

  names = {0: "unchunked", **{c: f"chunk_{c}" for c in args.chunks}}
  fns = {names[c]: loss_and_grads(c) for c in names}
  records = []
  for c, name in names.items():
    mem = compiled_memory(fns[name].lower(x, head, targets).compile())
    loss, (dx, dw) = fns[name](x, head, targets)
    records.append(dict(name=name, chunk=c, **mem, loss=float(loss),
                        loss_rel_err=abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
                        dx_rel_err=rel(dx, ref_dx), dhead_rel_err=rel(dw, ref_dw)))
  del ref_dx, ref_dw
  timing = side_by_side(fns, (x, head, targets), rounds=args.rounds, calls_per_round=None,
                        baseline="unchunked")
  rows = []
  for r in records:
    t = timing["candidates"][r["name"]]
    r.update(median_ms=t["median_ms"], iqr_ms=t["iqr_ms"], rounds_ms=t["rounds_ms"],
             speedup=timing.get("speedup", {}).get(r["name"], 1.0),
             speedup_paired=timing.get("speedup_paired", {}).get(r["name"], 1.0))
    temp = (r.get("memory_analysis") or {}).get("temp")
    rows.append((r["name"], fmt(r["median_ms"], ".3f"), fmt(r["speedup"], ".3f"),
                 fmt(None if r["peak_bytes"] is None else r["peak_bytes"] / 1e9, ".3f"),
                 fmt(None if temp is None else temp / 1e9, ".3f"),
                 fmt(r["dx_rel_err"], ".1e"), fmt(r["dhead_rel_err"], ".1e")))
  print(f"loss + gradients, {args.batch} x {args.seq} tokens, d_model {args.d_model}, "
        f"vocab {args.vocab}, {device_name()}")
  print(format_table(("loss", "ms", "x unchunked", "peak GB", "temp GB", "dx err", "dhead err"),
                     rows))
  command = command_line() if argv is None else command_line("experiments/bench_loss.py", argv)
  header = dict(command=command, device=device_name(), jax=jax.__version__,
                batch=args.batch, seq=args.seq, d_model=args.d_model, vocab=args.vocab,
                rounds=args.rounds, calls_per_round=timing["calls_per_round"],
                timer=timing["timer"], reference_loss=float(ref_loss),
                logits_bytes_fp32=args.batch * args.seq * args.vocab * 4)
  write_results(args.out, header, records)
  return dict(header=header, records=records)


if __name__ == "__main__":
  main()
