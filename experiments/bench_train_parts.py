"""Where the sparse training step's time goes: CUPTI kernel time of each stage of the Pallas
training path, timed one by one outside the dispatcher's lax.cond (CUPTI cannot see kernels
inside XLA's device-side conditionals), next to the bf16 dense FFN's forward + backward.

Stages: forward (gate kernel -> TwELL, fused up/down storing R), entry lists (compaction and
sort by neuron), backward kernel (dX, dU, dR), weight gradients (gather of slot values, sparse
weight-gradient kernel, partial-row reduction): the token-major backward. ``neuron_major``: the
whole neuron-major backward (``pallas_backend.sparse_backward``: the pass by neuron, the per-entry
glue and slot scatter, dx_kernel, the x-only weight-gradient pass), with its per-kernel breakdown
(``neuron_major_kernels``); ``token_major`` and ``neuron_major_fused`` are the same function in
the other orders, for the side-by-side sums; ``fused_piece<P>`` the fused order with task pieces
of P entries for its pass (``--fused-pieces``); ``forward_balanced`` / ``backward_auto_balanced``
the forward and the default order's backward with work-balanced CTA token ranges
(``FusedConfig`` / ``BackwardConfig.balanced``) next to ``forward`` / ``backward_auto``. The whole step (``step_*``) runs
``SparseFFNConfig``'s default order.

    PYTHONPATH=$PWD python3 experiments/bench_train_parts.py --out experiments/results/train_parts.json
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from sparse_jax import benchmarking
from pallas_kernels import common, twell_backward, twell_ffn, twell_gate, twell_wgrad
from sparse_jax import ops
from sparse_jax.ops import pallas_backend
from sparse_jax.ops.dense import bf16_gated_ffn_with_l1
from sparse_jax.synthetic import make_ffn_problem

F32 = jnp.float32


def stages(p, dy, cfg_capacity=32, bwd_cfg=twell_backward.DEFAULT_CONFIG,
           wgrad_cfg=twell_wgrad.DEFAULT_CONFIG, fused_pieces=()):
  m = p.x.shape[0]
  n_pad = p.w_gate.shape[0]
  e_cap = pallas_backend.entry_capacity(ops.SparseFFNConfig(), m, n_pad, cfg_capacity)

  def fwd_fn(fused_cfg=None):
    @jax.jit
    def fwd(x, wg, wu, wd):
      tw = twell_gate.gate_twell(x, wg, capacity=cfg_capacity)
      y, l1, r = twell_ffn.fused_up_down(x, wg, wu, wd, tw, return_r=True, config=fused_cfg)
      return y, l1, r, tw
    return fwd

  fwd = fwd_fn()

  @jax.jit
  def lists_fn(tw):
    return twell_wgrad.entry_lists(tw, jnp.ones((m,), bool), e_cap)

  @jax.jit
  def bwd(x, dy, wg, wu, wd, tw, r):
    return twell_backward.backward_kernel(x, dy, wg, wu, wd, tw, r, jnp.float32(1e-6),
                                          config=bwd_cfg)

  @jax.jit
  def wgrad(lists, du, dr, tw, r, x, dy):
    c = lists.gather([du, dr, tw.values_MxTxC, r])
    coefs = jnp.stack([c[0], c[1], common.round_bf16(c[2] * c[3])])
    return twell_wgrad.sparse_weight_gradients(lists, coefs, x, dy, n_x=2,
                                               out_dtype=jnp.bfloat16, config=wgrad_cfg)

  def backward_fn(order, fused_cfg=None, token_cfg=bwd_cfg):
    @jax.jit
    def run(x, dy, wg, wu, wd, tw, r, lists):
      return pallas_backend.sparse_backward(order, x, dy, wg, wu, wd, tw, r, lists,
                                            jnp.float32(1e-6), jnp.bfloat16,
                                            bwd_config=token_cfg, fused_config=fused_cfg)
    return run

  @jax.jit
  def dense(x, wg, wu, wd, dy):
    def loss(x, wg, wu, wd):
      y, l1 = bf16_gated_ffn_with_l1(x, wg, wu, wd)
      return jnp.sum(y.astype(F32) * dy.astype(F32)) + 1e-2 * l1
    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, wg, wu, wd)

  a = (p.x, p.w_gate, p.w_up, p.w_down)
  out = {}
  y, l1, r, tw = fwd(*a)
  out["forward"] = benchmarking.cupti_ms(fwd, *a)[0]
  lists = lists_fn(tw)
  out["entry_lists"] = benchmarking.cupti_ms(lists_fn, tw)[0]
  out["entry_lists_kernels"] = benchmarking.cupti_breakdown(lists_fn, tw)
  dx, du, dr = bwd(p.x, dy, p.w_gate, p.w_up, p.w_down, tw, r)
  out["backward_kernel"] = benchmarking.cupti_ms(bwd, p.x, dy, p.w_gate, p.w_up, p.w_down, tw, r)[0]
  out["weight_grads"] = benchmarking.cupti_ms(wgrad, lists, du, dr, tw, r, p.x, dy)[0]
  out["wgrad_kernels"] = benchmarking.cupti_breakdown(wgrad, lists, du, dr, tw, r, p.x, dy)
  out["sparse_total"] = sum(out[k] for k in ("forward", "entry_lists", "backward_kernel",
                                              "weight_grads"))
  bargs = (p.x, dy, p.w_gate, p.w_up, p.w_down, tw, r, lists)
  for order in ("token_major", "neuron_major", "neuron_major_fused"):
    out[order] = benchmarking.cupti_ms(backward_fn(order), *bargs)[0]
  out["neuron_major_kernels"] = benchmarking.cupti_breakdown(backward_fn("neuron_major"), *bargs)
  # The warp-per-token kernels with work-balanced CTA ranges (FusedConfig / BackwardConfig
  # .balanced: common.token_bounds), the forward and the default order's backward.
  out["forward_balanced"] = benchmarking.cupti_ms(
      fwd_fn(dataclasses.replace(twell_ffn.DEFAULT_CONFIG, balanced=True)), *a)[0]
  balanced_bwd = backward_fn("auto", token_cfg=dataclasses.replace(bwd_cfg, balanced=True))
  out["backward_auto"] = benchmarking.cupti_ms(backward_fn("auto"), *bargs)[0]
  out["backward_auto_balanced"] = benchmarking.cupti_ms(balanced_bwd, *bargs)[0]
  out["backward_auto_balanced_kernels"] = benchmarking.cupti_breakdown(balanced_bwd, *bargs)
  # The fused order with other task pieces for its pass (whole-row tickets: see
  # twell_wgrad.FUSED_PASS_FINE_CONFIG), each with its per-kernel breakdown.
  for piece, partial_rows in fused_pieces:
    fcfg = dataclasses.replace(twell_wgrad.FUSED_PASS_CONFIG, piece=piece,
                               partial_rows=partial_rows)
    fn = backward_fn("neuron_major_fused", fcfg)
    out[f"fused_piece{piece}"] = benchmarking.cupti_ms(fn, *bargs)[0]
    out[f"fused_piece{piece}_kernels"] = benchmarking.cupti_breakdown(fn, *bargs)
  out["dense_fwd_bwd"] = benchmarking.cupti_ms(dense, *a, dy)[0]
  out["speedup"] = out["dense_fwd_bwd"] / out["sparse_total"]
  # The whole sparse step as jax.grad runs it (dispatch conds bypassed so CUPTI sees every kernel).
  cfg = ops.SparseFFNConfig(max_active_fraction=None, entry_capacity=e_cap)

  @jax.jit
  def step(x, wg, wu, wd, dy):
    def loss(x, wg, wu, wd):
      y, st = ops.gated_sparse_ffn(x, wg, wu, wd, implementation="pallas", config=cfg)
      return jnp.sum(y.astype(F32) * dy.astype(F32)) + 1e-2 * st.l1
    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, wg, wu, wd)

  pallas_backend.PROFILE_WITHOUT_DISPATCH = True
  try:
    out["step_cupti"] = benchmarking.cupti_ms(step, *a, dy)[0]
    out["step_kernels"] = benchmarking.cupti_breakdown(step, *a, dy)
    out["step_wall"] = benchmarking.wall_ms_per_call(step, *a, dy, calls=20)[1]
  finally:
    pallas_backend.PROFILE_WITHOUT_DISPATCH = False
  out["dense_wall"] = benchmarking.wall_ms_per_call(dense, *a, dy, calls=20)[1]
  out["n_entries"] = int(lists.n_entries)
  out["entry_capacity"] = e_cap
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--m", type=int, default=16384)
  ap.add_argument("--active", type=float, nargs="+", default=[11, 28, 56])
  ap.add_argument("--dist", nargs="+", default=["uniform", "skewed"])
  ap.add_argument("--unroll", type=int, default=twell_wgrad.DEFAULT_CONFIG.unroll)
  ap.add_argument("--warpgroups", type=int, default=twell_wgrad.DEFAULT_CONFIG.warpgroups)
  ap.add_argument("--bwd-steps", type=int, default=twell_backward.DEFAULT_CONFIG.entries_per_step,
                  help="entries per step of the per-token kernels (backward_kernel, dx_kernel)")
  ap.add_argument("--fused-pieces", nargs="*", default=["512:512", "128:4096"],
                  metavar="PIECE:PARTIAL_ROWS",
                  help="time the fused order's backward with these task pieces for its pass "
                       "(default: the default config's and FUSED_PASS_FINE_CONFIG's)")
  ap.add_argument("--out", default="experiments/results/train_parts.json")
  args = ap.parse_args(argv)
  try:
    fused_pieces = [tuple(int(v) for v in spec.split(":")) for spec in args.fused_pieces]
    if (any(len(fp) != 2 or min(fp) <= 0 for fp in fused_pieces)
        or len({fp[0] for fp in fused_pieces}) < len(fused_pieces)):
      raise ValueError
  except ValueError:
    ap.error(f"--fused-pieces takes PIECE:PARTIAL_ROWS pairs of positive integers, "
             f"got {args.fused_pieces} (one pair per piece)")
  if jax.devices()[0].platform != "gpu":
    raise SystemExit("bench_train_parts.py needs a GPU")
  header = benchmarking.run_header()
  print(f"device {header['device']}  jax {header['jax']}")
  cols = ("forward", "entry_lists", "backward_kernel", "weight_grads", "token_major",
          "neuron_major", "neuron_major_fused", "sparse_total", "dense_fwd_bwd", "speedup",
          "step_cupti", "step_wall", "dense_wall")
  label = {"neuron_major_fused": "nm_fused", "neuron_major": "neuron_major"}
  print(f"{'dist':8} {'act':>5} " + " ".join(f"{label.get(c, c)[:12]:>12}" for c in cols))
  records = []
  key = jax.random.key(0)
  for dist in args.dist:
    for active in args.active:
      key, k1, k2 = jax.random.split(key, 3)
      p = make_ffn_problem(k1, args.m, 2048, 5632, active_per_token=active, distribution=dist)
      dy = jax.random.normal(k2, p.x.shape, jnp.bfloat16)
      r = stages(p, dy,
                 bwd_cfg=dataclasses.replace(twell_backward.DEFAULT_CONFIG,
                                             entries_per_step=args.bwd_steps),
                 wgrad_cfg=dataclasses.replace(twell_wgrad.DEFAULT_CONFIG, unroll=args.unroll,
                                               warpgroups=args.warpgroups),
                 fused_pieces=fused_pieces)
      rec = dict(M=args.m, distribution=dist, active_per_token=p.active_per_token(),
                 unroll=args.unroll, warpgroups=args.warpgroups, bwd_steps=args.bwd_steps,
                 timer="CUPTI median of 20", **r)
      records.append(rec)
      print(f"{dist:8} {rec['active_per_token']:5.1f} " +
            " ".join(f"{r[c]:12.3f}" for c in cols), flush=True)
      print(f"   balanced CTA ranges: forward {r['forward']:.3f} -> {r['forward_balanced']:.3f} "
            f"ms, backward (auto) {r['backward_auto']:.3f} -> {r['backward_auto_balanced']:.3f} ms")
      if fused_pieces:
        print("   fused order by pass piece: " + ", ".join(
            f"piece {piece} ({rows} partial rows) {r[f'fused_piece{piece}']:.3f} ms"
            for piece, rows in fused_pieces))
      for part in ("wgrad_kernels", "entry_lists_kernels", "neuron_major_kernels",
                   *(f"fused_piece{piece}_kernels" for piece, _ in fused_pieces),
                   "backward_auto_balanced_kernels",
                   "step_kernels"):
        top = sorted(r[part], key=lambda nt: -nt[1])[:12 if part == "step_kernels" else 6]
        print(f"   {part} ({len(r[part])} kernels, {sum(t for _, t in r[part]):.3f} ms): "
            + ", ".join(f"{n[:32]} {t:.3f}" for n, t in top))
      benchmarking.write_results(args.out, header, records)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
