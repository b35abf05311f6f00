"""Does a ``lax.cond`` make the host wait for the device? Per call of a small step with and
without a conditional, under different XLA compiler options: host dispatch time vs wall time of
back-to-back calls (equal means the host waited inside every call) and the device-to-host copies
the trace shows (a ConditionalThunk copies its predicate to the host).

Candidates: ``plain`` (elementwise + GEMM chain, no conditional), ``cond_xla`` (the same with a
``lax.cond`` on a device predicate whose branches hold XLA ops only), ``sparse_step`` (the sparse
FFN training step, ``mode="sparse"``, paper shape, M=16384).

    python3 experiments/cond_sync_probe.py --out $OUT/cond_sync_probe.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_jax.benchmarking.results import command_line  # noqa: E402

CB_ALL = ("FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONDITIONAL,WHILE")
OPTIONS = {
    "default": {},
    "cb_conditional": {"xla_gpu_enable_command_buffer": CB_ALL},
    "cb_conditional_min1": {"xla_gpu_enable_command_buffer": CB_ALL,
                            "xla_gpu_graph_min_graph_size": 1},
}


def small_steps():
  def chain(a, b):
    for _ in range(8):
      a = jnp.tanh(a @ b)
    return a

  def plain(a, b):
    return chain(a, b)

  def cond_xla(a, b):
    y = chain(a, b)
    return jax.lax.cond(jnp.sum(y) > 1e30, lambda v: v * 2.0, lambda v: v, y)
  k1, k2 = jax.random.split(jax.random.key(0))
  args = (jax.random.normal(k1, (2048, 2048), jnp.bfloat16),
          jax.random.normal(k2, (2048, 2048), jnp.bfloat16) / 45.0)
  return dict(plain=plain, cond_xla=cond_xla), args


def sparse_step():
  from sparse_jax import ops
  from sparse_jax.synthetic import make_ffn_problem
  p = make_ffn_problem(jax.random.key(0), 16384, 2048, 5632, active_per_token=28.0,
                       distribution="skewed")
  cot = jax.random.normal(jax.random.key(1), p.x.shape, jnp.float32)
  cfg = ops.SparseFFNConfig(mode="sparse")

  def loss(x, wg, wu, wd, cot):
    y, st = ops.gated_sparse_ffn(x, wg, wu, wd, implementation="pallas", config=cfg)
    return jnp.sum(y.astype(jnp.float32) * cot) + 1e-2 * st.l1
  return jax.grad(loss, argnums=(0, 1, 2, 3)), (p.x, p.w_gate, p.w_up, p.w_down, cot)


def d2h_copies(f, args, calls: int, where: str) -> float | None:
  from jax.profiler import ProfileData
  with jax.profiler.trace(where):
    jax.block_until_ready([f(*args) for _ in range(calls)])
  paths = sorted(glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    return None
  n = 0
  for plane in ProfileData.from_file(paths[-1]).planes:
    if plane.name.startswith("/device:GPU"):
      for line in plane.lines:
        if line.name.startswith("Stream"):
          n += sum("MemcpyD2H" in e.name for e in line.events)
  return n / calls


def measure(f, args, calls: int) -> dict:
  jax.block_until_ready(f(*args))
  host, wall = [], []
  for _ in range(5):
    t0 = time.perf_counter()
    outs = [f(*args) for _ in range(calls)]
    t1 = time.perf_counter()
    jax.block_until_ready(outs)
    host.append((t1 - t0) * 1e3 / calls)
    wall.append((time.perf_counter() - t0) * 1e3 / calls)
    del outs
  return dict(host_dispatch_ms=float(np.median(host)), wall_ms=float(np.median(wall)))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--calls", type=int, default=20)
  ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
  ap.add_argument("--no-sparse-step", action="store_true")
  ap.add_argument("--out", default="experiments/results/cond_sync_probe.json")
  args = ap.parse_args(argv)
  fns, small_args = small_steps()
  cands = {k: (f, small_args) for k, f in fns.items()}
  if not args.no_sparse_step:
    cands["sparse_step"] = sparse_step()
  rec = dict(device=jax.devices()[0].device_kind, command=command_line(), rows=[])
  for opt in args.options:
    for name, (f, a) in cands.items():
      try:
        comp = jax.jit(f).lower(*a).compile(OPTIONS[opt] or None)
      except Exception as e:  # an option this XLA does not know
        rec["rows"].append(dict(options=opt, step=name, error=f"{type(e).__name__}: {e}"[:300]))
        print(f"{opt:20s} {name:12s} error {e}"[:200])
        continue
      r = dict(options=opt, step=name, **measure(comp, a, args.calls))
      r["d2h_copies_per_call"] = d2h_copies(comp, a, args.calls, f"/tmp/cond_probe/{opt}_{name}")
      rec["rows"].append(r)
      print(f"{opt:20s} {name:12s} wall {r['wall_ms']:.3f} ms  host dispatch "
            f"{r['host_dispatch_ms']:.3f} ms  D2H copies/call {r['d2h_copies_per_call']}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(rec, fh, indent=1)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
