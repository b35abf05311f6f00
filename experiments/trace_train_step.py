"""Where the wall clock of a training step goes beyond its kernels: a device timeline.

CUPTI kernel sums (``bench_train_parts.py``) leave out the time between kernels. This script
traces K back-to-back calls of each step with ``jax.profiler`` and reads the GPU streams of the
trace (``jax.profiler.ProfileData``): per call, the span of device activity, the time some
kernel or copy runs (union of intervals), the idle gaps, which operations the largest gaps come
before, and the host-side events that take longest (what the host does while the device waits).

Steps (forward + backward of ``sum(y * cotangent) + 1e-2 * l1``, as ``bench_ffn_train.py``):
``dense`` (the bf16 dense FFN), ``sparse`` (``mode="sparse"``), ``defer`` (``mode="sparse"``,
``overflow_fallback="defer"``), ``device`` (``mode="auto"``), each as ``jax.value_and_grad``
(with ``jax.grad`` alone XLA drops the forward's output and its conditionals). The wall clock
of the same K calls is measured first without the profiler.

    python3 experiments/trace_train_step.py --out $OUT/trace_train_step.json --xplane-dir $OUT/xplane
    python3 experiments/trace_train_step.py --analyze DIR/*.xplane.pb     # offline, any machine
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_jax import ops  # noqa: E402
from sparse_jax.benchmarking.results import command_line  # noqa: E402
from sparse_jax.ops.dense import bf16_gated_ffn_with_l1  # noqa: E402
from sparse_jax.synthetic import make_ffn_problem  # noqa: E402

L1_COEFF = 1e-2
STEPS = ("dense", "sparse", "defer", "device")


def loss_fns() -> dict:
  def dense(x, wg, wu, wd, cot):
    y, l1 = bf16_gated_ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y.astype(jnp.float32) * cot) + L1_COEFF * l1

  def op(mode, fallback="cond"):
    cfg = ops.SparseFFNConfig(mode=mode, overflow_fallback=fallback)

    def loss(x, wg, wu, wd, cot):
      y, st = ops.gated_sparse_ffn(x, wg, wu, wd, implementation="pallas", config=cfg)
      return jnp.sum(y.astype(jnp.float32) * cot) + L1_COEFF * st.l1
    return loss
  return dict(dense=dense, sparse=op("sparse"), defer=op("sparse", "defer"), device=op("auto"))


def _intervals(events) -> np.ndarray:
  a = np.asarray([(e[1], e[1] + e[2]) for e in events], np.float64)
  return a[np.argsort(a[:, 0])] if len(a) else np.zeros((0, 2))


def analyze_xplane(path: str, calls: int, top: int = 12) -> dict:
  """Device timeline of a trace of ``calls`` back-to-back calls: span, busy (union of stream
  event intervals), gaps, the operations the largest gaps precede, the longest host events."""
  from jax.profiler import ProfileData
  pd = ProfileData.from_file(path)
  dev, host = [], collections.Counter()
  host_n = collections.Counter()
  lines = {}
  for plane in pd.planes:
    if plane.name.startswith("/device:GPU"):
      for line in plane.lines:
        evs = [(e.name, e.start_ns, e.duration_ns) for e in line.events]
        lines[f"{plane.name} {line.name}"] = len(evs)
        if line.name.startswith("Stream"):
          dev += evs
    elif plane.name.startswith("/host:CPU"):
      for line in plane.lines:
        for e in line.events:
          host[e.name] += e.duration_ns
          host_n[e.name] += 1
  if not dev:
    return dict(error="no GPU stream events in the trace", lines=lines)
  iv = _intervals(dev)
  busy, gaps, gap_before = 0.0, [], collections.Counter()
  gap_n = collections.Counter()
  order = sorted(dev, key=lambda e: e[1])
  cur_s, cur_e = iv[0]
  for (name, s, d) in order[1:]:
    e = s + d
    if s > cur_e:
      busy += cur_e - cur_s
      gaps.append(s - cur_e)
      gap_before[name] += s - cur_e
      gap_n[name] += 1
      cur_s, cur_e = s, e
    else:
      cur_e = max(cur_e, e)
  busy += cur_e - cur_s
  span = iv[:, 1].max() - iv[0, 0]
  g = np.asarray(gaps) if gaps else np.zeros(1)
  kernel_ns = collections.Counter()
  for (name, s, d) in dev:
    kernel_ns[name] += d
  per = lambda ns: ns / calls / 1e6  # noqa: E731  ns over the trace -> ms per call
  return dict(
      calls=calls, span_ms=per(span), busy_ms=per(busy), idle_ms=per(span - busy),
      device_events_per_call=len(dev) / calls,
      # A device-to-host copy inside a step is a conditional's predicate (ConditionalThunk):
      # the host then waits for the device, so it cannot queue work ahead.
      d2h_copies_per_call=sum("MemcpyD2H" in e[0] for e in dev) / calls,
      gaps_per_call=len(gaps) / calls,
      gap_us_median=float(np.median(g) / 1e3), gap_us_p90=float(np.percentile(g, 90) / 1e3),
      gaps_over_10us_per_call=float((g > 1e4).sum() / calls),
      idle_before_ms={n: per(v) for n, v in gap_before.most_common(top)},
      idle_before_count={n: gap_n[n] / calls for n, _ in gap_before.most_common(top)},
      device_ms={n: per(v) for n, v in kernel_ns.most_common(top)},
      host_ms={n: per(v) for n, v in host.most_common(top)},
      host_count={n: host_n[n] / calls for n, _ in host.most_common(top)},
      lines=lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--m", type=int, default=16384)
  ap.add_argument("--shape", default="2048x5632")
  ap.add_argument("--dist", default="skewed")
  ap.add_argument("--active", type=float, default=28.0)
  ap.add_argument("--calls", type=int, default=20)
  ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
  ap.add_argument("--xplane-dir", default=None, help="where the traces go (kept)")
  ap.add_argument("--analyze", nargs="+", default=None, metavar="XPLANE",
                  help="only analyze saved traces (name: <step>.xplane.pb under a dir)")
  ap.add_argument("--out", default="experiments/results/trace_train_step.json")
  args = ap.parse_args(argv)
  if args.analyze:
    for p in args.analyze:
      print(p, json.dumps(analyze_xplane(p, args.calls), indent=1))
    return
  if jax.default_backend() != "gpu":
    raise SystemExit("trace_train_step traces the Pallas GPU kernels: run it on a GPU")
  d_model, d_ff = (int(v) for v in args.shape.split("x"))
  p = make_ffn_problem(jax.random.key(0), args.m, d_model, d_ff, active_per_token=args.active,
                       distribution=args.dist)
  cot = jax.random.normal(jax.random.key(1), p.x.shape, jnp.float32)
  a = (p.x, p.w_gate, p.w_up, p.w_down, cot)
  fns = loss_fns()
  xdir = args.xplane_dir or os.path.join("/tmp", "trace_train_step")
  rec = dict(device=jax.devices()[0].device_kind, command=command_line(), M=args.m,
             shape=args.shape, distribution=args.dist, active=args.active, calls=args.calls,
             steps={})
  for name in args.steps:
    step = jax.jit(jax.value_and_grad(fns[name], argnums=(0, 1, 2, 3)))
    jax.block_until_ready(step(*a))
    walls = []
    for _ in range(5):
      t0 = time.perf_counter()
      outs = [step(*a) for _ in range(args.calls)]
      t1 = time.perf_counter()
      jax.block_until_ready(outs)
      walls.append(((t1 - t0) * 1e3 / args.calls, (time.perf_counter() - t0) * 1e3 / args.calls))
      del outs
    d = os.path.join(xdir, name)
    with jax.profiler.trace(d):
      outs = [step(*a) for _ in range(args.calls)]
      jax.block_until_ready(outs)
    del outs
    path = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1]
    r = analyze_xplane(path, args.calls)
    r["wall_ms"] = float(np.median([w[1] for w in walls]))
    r["host_dispatch_ms"] = float(np.median([w[0] for w in walls]))
    r["xplane"] = path
    rec["steps"][name] = r
    print(f"{name:7s} wall {r['wall_ms']:.3f} ms (host dispatch {r['host_dispatch_ms']:.3f}) | "
          f"traced span {r.get('span_ms', 0):.3f} busy {r.get('busy_ms', 0):.3f} "
          f"idle {r.get('idle_ms', 0):.3f} | gaps/call {r.get('gaps_per_call', 0):.0f} "
          f"median {r.get('gap_us_median', 0):.1f} us p90 {r.get('gap_us_p90', 0):.1f} us | "
          f"D2H copies/call {r.get('d2h_copies_per_call', 0):.1f}")
    for k in ("idle_before_ms", "host_ms"):
      print("   ", k, ", ".join(f"{n[:40]} {v:.3f}" for n, v in list(r.get(k, {}).items())[:8]))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(rec, f, indent=1)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
