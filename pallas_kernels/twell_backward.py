"""Per-token backward kernel of the sparse FFN's training path (Mosaic GPU, Hopper).

One warp per token, the fused forward kernel's machinery (``warp_mgpu``). For every active entry
j of token i, with P the gate activation stored in TwELL and R the up projection the forward
stored at the same slot:
    a = dOut_i . Wd[j]                      (Wd row gathered; the sampled dOut Wd^T)
    t = bf16(p * r)                         (T exactly as the forward rounded it)
    dT = a + coeff * d|t|                   (the L1 term; jax.grad's sign convention, +1 at 0)
    dR = dT * p,  dU = dT * r * [p > 0]
    dX_i += dR * Wu[j] + dU * Wg[j]         (two more row gathers, accumulated in registers)
and dU, dR are stored at the entry's TwELL slot; the weight gradients are built from those slot
values by ``twell_wgrad``. Rows with an overflowed TwELL tile are skipped (dx row 0): the op's
exact dense row path owns them.

``dx_kernel`` is the token-major half of the neuron-major backward (``SparseFFNConfig.
train_backward="neuron_major"``): dU and dR come in at the slots (formed per entry from the
neuron-major pass's a = dOut_i . Wd[j], ``twell_wgrad.neuron_major_pass``), so a token gathers
only the Wu and Wg rows of its entries.

Interpret mode (``common.pallas_interpret()``) cannot run ``inline_mgpu``: the interpretable path
(``_backward_jnp``) computes the same per-entry math with array ops in the same kernel skeleton.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common
from sparse_jax.formats import twell

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
  """warpgroups: per CTA (one CTA per SM, persistent); entries_per_step: active entries whose Wd
  rows are loaded before the first reduction (more is more bytes in flight, more registers);
  balanced: each CTA's range of tokens holds about equal work (``common.token_bounds``, a few
  XLA ops on the TwELL counts) instead of an equal token count; interpret_ctas: the grid of the
  interpretable path (tokens are split over its warpgroups; ``balanced`` changes only the GPU
  path's schedule, never the sums)."""
  warpgroups: int = 2
  entries_per_step: int = 4  # 2: 3-6% slower (H200, NOTES_train.md 2026-12-02 ninth session)
  balanced: bool = False
  interpret_ctas: int = 2


DEFAULT_CONFIG = BackwardConfig()


def _backward_mgpu(x_ref, dy_ref, wg_ref, wu_ref, wd_ref, cnt_ref, idx_ref, val_ref, r_ref,
                   coeff_ref, dx_ref, du_ref, dr_ref, ej_ref, ev_ref, es_ref, ctr_ref, *,
                   entries_per_step: int, tile_width: int, bounds_ref=None):
  """Per-warp backward. Non-gated: ``wu_ref``/``r_ref``/``dr_ref`` are None and ``wg_ref`` holds
  the up weights (P is the hidden activation itself)."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, memref
  import jax.experimental.mosaic.gpu as mgpu
  from pallas_kernels.warp_mgpu import WarpKernel

  gated = wu_ref is not None
  m, d_model = ir.MemRefType(x_ref.type).shape
  _, n_tiles, capacity = ir.MemRefType(idx_ref.type).shape
  w = WarpKernel(d_model)
  c, cf, nch = w.c, w.cf, w.chunks
  coeff = memref.load(coeff_ref, [mgpu.c(0, w.index)])

  def slot_of(e_safe):
    slot = memref.load(es_ref, [w.idx(w.warp), e_safe])
    return w.idx(arith.divui(slot, c(capacity))), w.idx(arith.remui(slot, c(capacity)))

  def process_token(t):
    total, masks = w.build_entry_list(t, cnt_ref, idx_ref, val_ref, ej_ref, ev_ref, es_ref,
                                      tile_width=tile_width)
    flagged = arith.cmpi(arith.CmpIPredicate.ne, functools.reduce(arith.ori, masks), c(0))
    # Rows with an overflowed tile belong to the dense row path: no entries, zero dx row.
    total = arith.select(flagged, c(0), total)
    dy = w.load_row(dy_ref, t)
    n_steps = arith.divui(arith.addi(total, c(entries_per_step - 1)), c(entries_per_step))

    @mgpu.fori(n_steps, [w.zero] * nch)
    def _entries(step, acc):
      picks = w.pick_entries(step, entries_per_step, total, ej_ref, ev_ref)
      downs = [w.load_row(wd_ref, row) for row, *_ in picks]
      grads = []
      for (row, p, valid, e_safe), vd in zip(picks, downs):
        tile, s = slot_of(e_safe)
        a = w.dot(dy, vd)
        r = memref.load(r_ref, [w.idx(t), tile, s]) if gated else None
        tval = w.round_bf16(arith.mulf(p, r)) if gated else p
        sign = arith.select(arith.cmpf(arith.CmpFPredicate.OGE, tval, cf(0.0)), cf(1.0), cf(-1.0))
        d_t = arith.addf(a, arith.mulf(coeff, sign))
        p_pos = arith.cmpf(arith.CmpFPredicate.OGT, p, cf(0.0))
        d_u = arith.select(p_pos, arith.mulf(d_t, r) if gated else d_t, cf(0.0))
        d_r = arith.mulf(d_t, p) if gated else None
        d_u = arith.select(valid, d_u, cf(0.0))
        d_r = arith.select(valid, d_r, cf(0.0)) if gated else None
        with mgpu.when(arith.andi(valid, w.eq(w.lane, c(0)))):
          memref.store(d_u, du_ref, [w.idx(t), tile, s])
          if gated:
            memref.store(d_r, dr_ref, [w.idx(t), tile, s])
        grads.append((row, d_u, d_r))
      for row, d_u, d_r in grads:
        if gated:
          acc = w.axpy(d_r, w.load_row(wu_ref, row), acc)
        acc = w.axpy(d_u, w.load_row(wg_ref, row), acc)
      return list(acc)

    w.store_row(dx_ref, t, list(_entries.results))
    mgpu.utils.warp_barrier()  # the entry list is rewritten by the next token

  w.for_each_token(m, ctr_ref, process_token, dynamic=True, bounds_ref=bounds_ref)


def _backward_jnp(x_ref, dy_ref, wg_ref, wu_ref, wd_ref, cnt_ref, idx_ref, val_ref, r_ref,
                  coeff_ref, dx_ref, du_ref, dr_ref, *, rows, tile_width):
  """Interpretable path: the same per-entry math with array ops for a block of tokens."""
  gated = wu_ref is not None
  capacity = idx_ref.shape[2]
  cnt = cnt_ref[rows]
  flagged = jnp.any(cnt > capacity, axis=1)
  valid = ((lax.broadcasted_iota(jnp.int32, idx_ref[rows].shape, 2) < cnt[:, :, None])
           & ~flagged[:, None, None])
  col = (idx_ref[rows].astype(jnp.int32)
         + lax.broadcasted_iota(jnp.int32, valid.shape, 1) * tile_width).reshape(valid.shape[0], -1)
  p = val_ref[rows].astype(F32)
  dy = dy_ref[rows].astype(F32)
  a = jnp.take_along_axis(jnp.dot(dy, wd_ref[...].astype(F32).T), col, axis=1).reshape(p.shape)
  r = r_ref[rows] if gated else None
  tval = common.round_bf16(p * r) if gated else p
  d_t = a + coeff_ref[0] * jnp.where(tval >= 0, 1.0, -1.0)
  d_u = jnp.where(valid & (p > 0), d_t * r if gated else d_t, 0.0)
  n_rows = p.shape[0]
  scatter = lambda v: jnp.zeros((n_rows, wg_ref.shape[0]), F32).at[
      jnp.arange(n_rows)[:, None], col].add(v.reshape(col.shape))
  dx = jnp.dot(scatter(d_u), wg_ref[...].astype(F32))
  du_ref[rows] = d_u
  if gated:
    d_r = jnp.where(valid, d_t * p, 0.0)
    dr_ref[rows] = d_r
    dx = dx + jnp.dot(scatter(d_r), wu_ref[...].astype(F32))
  dx_ref[rows] = dx.astype(dx_ref.dtype)


def _token_grid(cfg: BackwardConfig, m: int, tw: twell.TwELL, interpret: bool, what: str):
  """(grid, scratch, tokens per warpgroup of the interpretable path, CTA token bounds or None) of
  a warp-per-token kernel: one persistent CTA per SM with each warp's SMEM entry lists (column,
  value, slot) and a ticket counter, its token range from ``common.token_bounds`` where
  ``cfg.balanced`` (rows with an overflowed tile cost nothing: the kernels skip them);
  interpreted, ``cfg.interpret_ctas`` CTAs over equal token blocks."""
  list_len = tw.n_tiles * tw.capacity
  n_warps = cfg.warpgroups * common.WARPS_PER_WARPGROUP
  if interpret:
    grid, scratch = (cfg.interpret_ctas,), []
    if m % (grid[0] * cfg.warpgroups):
      raise NotImplementedError("the interpretable path needs M divisible by its token blocks")
  else:
    common.check_entry_lists(n_warps, list_len, what)
    grid = (common.num_sms(),)
    scratch = [plgpu.SMEM((n_warps, list_len), jnp.int32),
               plgpu.SMEM((n_warps, list_len), jnp.float32),
               plgpu.SMEM((n_warps, list_len), jnp.int32), plgpu.SMEM((1,), jnp.int32)]
  bounds = (common.token_bounds(tw.counts_MxT, tw.capacity, grid[0], overflowed_rows_skipped=True)
            if cfg.balanced and not interpret else None)
  return grid, scratch, m // (grid[0] * cfg.warpgroups), bounds


@common.shared_lowering(static_argnames=("config",))
def backward_kernel(x_MxD, dy_MxD, w_gate, w_up, w_down, tw: twell.TwELL, r_MxTxC, coeff, *,
                    config: BackwardConfig | None = None):
  """(dx [M, D] in x's dtype, dU slots, dR slots) for the rows without an overflowed tile (flagged
  rows: dx 0, slots unspecified). ``coeff``: the L1 cotangent over (M * d_ff), a scalar."""
  cfg = config or DEFAULT_CONFIG
  interpret = common.pallas_interpret()
  m, d = x_MxD.shape
  common.check_row_span(d, "backward kernel")
  gated = w_up is not None
  warpgroups = cfg.warpgroups
  slots = jax.ShapeDtypeStruct(tw.values_MxTxC.shape, F32)
  # dx in x's dtype: accumulated in f32 registers, rounded once on the store.
  out_type = (jax.ShapeDtypeStruct((m, d), x_MxD.dtype), slots) + ((slots,) if gated else ())
  grid, scratch, rows_per_wg, bounds = _token_grid(cfg, m, tw, interpret, "backward kernel")
  balanced = bounds is not None
  names = ["x", "dy", "wg"] + (["wu"] if gated else []) + ["wd", "cnt", "idx", "val"] + (
      ["r"] if gated else []) + ["coeff"] + (["bounds"] if balanced else []) + ["dx", "du"] + (
      ["dr"] if gated else [])

  def body(*refs):
    named = dict(zip(names, refs))
    scr = refs[len(names):]
    order = ["x", "dy", "wg", "wu", "wd", "cnt", "idx", "val", "r", "coeff", "dx", "du", "dr"]
    present = [named.get(k) for k in order]
    if not interpret:
      ref_args = [r for r in present + list(scr) if r is not None] + (
          [named["bounds"]] if balanced else [])

      @plgpu.inline_mgpu(arg_types=tuple(plgpu.RefType() for _ in ref_args))
      def _(ctx, *r):
        del ctx
        bounds_r, r = (r[-1], r[:-1]) if balanced else (None, r)
        it = iter(r)
        args = [None if p is None else next(it) for p in present] + list(it)
        _backward_mgpu(*args, entries_per_step=cfg.entries_per_step, tile_width=tw.tile,
                       bounds_ref=bounds_r)

      _(*ref_args)
    else:
      wg = lax.axis_index("sm") * warpgroups + lax.axis_index("wg")
      _backward_jnp(*present, rows=pl.ds(wg * rows_per_wg, rows_per_wg), tile_width=tw.tile)

  f = plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("sm",),
      num_threads=warpgroups, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=common.interpret_params())
  args = [x_MxD, dy_MxD, w_gate] + ([w_up] if gated else []) + [
      w_down, tw.counts_MxT, tw.indices_MxTxC, tw.values_MxTxC] + (
      [r_MxTxC] if gated else []) + [jnp.reshape(coeff, (1,)).astype(F32)] + (
      [bounds] if balanced else [])
  outs = f(*args)
  return outs[0], outs[1], (outs[2] if gated else None)


# --------------------------------------------------------------------------- dx from given slots


def _dx_mgpu(wg_ref, wu_ref, cnt_ref, idx_ref, val_ref, g_ref, dx_ref, ej_ref, ev_ref, es_ref,
             ctr_ref, *, entries_per_step: int, tile_width: int, bounds_ref=None):
  """Per-warp dx_i = sum_j dR_ij Wu[j] + dU_ij Wg[j] with dU, dR read at the slots
  (``g_ref[i, tile, s, 0 / 1]``). Non-gated: ``wu_ref`` is None, ``wg_ref`` the up weights."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, memref
  import jax.experimental.mosaic.gpu as mgpu
  from pallas_kernels.warp_mgpu import WarpKernel

  gated = wu_ref is not None
  m, d_model = ir.MemRefType(dx_ref.type).shape
  _, n_tiles, capacity = ir.MemRefType(idx_ref.type).shape
  w = WarpKernel(d_model)
  c, cf, nch = w.c, w.cf, w.chunks

  def process_token(t):
    total, masks = w.build_entry_list(t, cnt_ref, idx_ref, val_ref, ej_ref, ev_ref, es_ref,
                                      tile_width=tile_width)
    flagged = arith.cmpi(arith.CmpIPredicate.ne, functools.reduce(arith.ori, masks), c(0))
    total = arith.select(flagged, c(0), total)  # the dense row path owns flagged rows
    n_steps = arith.divui(arith.addi(total, c(entries_per_step - 1)), c(entries_per_step))

    @mgpu.fori(n_steps, [w.zero] * nch)
    def _entries(step, acc):
      picks = w.pick_entries(step, entries_per_step, total, ej_ref, ev_ref)
      loaded = []
      for row, _, valid, e_safe in picks:
        slot = memref.load(es_ref, [w.idx(w.warp), e_safe])
        at = [w.idx(t), w.idx(arith.divui(slot, c(capacity))),
              w.idx(arith.remui(slot, c(capacity)))]
        d_u = arith.select(valid, memref.load(g_ref, at + [w.idx(c(0))]), cf(0.0))
        d_r = (arith.select(valid, memref.load(g_ref, at + [w.idx(c(1))]), cf(0.0))
               if gated else None)
        loaded.append((d_u, d_r, w.load_row(wg_ref, row),
                       w.load_row(wu_ref, row) if gated else None))
      acc = list(acc)
      for d_u, d_r, vg, vu in loaded:
        if gated:
          acc = w.axpy(d_r, vu, acc)
        acc = w.axpy(d_u, vg, acc)
      return acc

    w.store_row(dx_ref, t, list(_entries.results))
    mgpu.utils.warp_barrier()  # the entry list is rewritten by the next token

  w.for_each_token(m, ctr_ref, process_token, dynamic=True, bounds_ref=bounds_ref)


def _dx_jnp(wg_ref, wu_ref, cnt_ref, idx_ref, g_ref, dx_ref, *, rows, tile_width):
  """Interpretable path: the same sums with array ops for a block of tokens."""
  capacity = idx_ref.shape[2]
  cnt = cnt_ref[rows]
  flagged = jnp.any(cnt > capacity, axis=1)
  valid = ((lax.broadcasted_iota(jnp.int32, idx_ref[rows].shape, 2) < cnt[:, :, None])
           & ~flagged[:, None, None])
  col = (idx_ref[rows].astype(jnp.int32)
         + lax.broadcasted_iota(jnp.int32, valid.shape, 1) * tile_width).reshape(valid.shape[0], -1)
  g = jnp.where(valid[..., None], g_ref[rows], 0.0)
  n_rows = valid.shape[0]
  scatter = lambda v: jnp.zeros((n_rows, wg_ref.shape[0]), F32).at[
      jnp.arange(n_rows)[:, None], col].add(v.reshape(col.shape))
  dx = jnp.dot(scatter(g[..., 0]), wg_ref[...].astype(F32))
  if wu_ref is not None:
    dx = dx + jnp.dot(scatter(g[..., 1]), wu_ref[...].astype(F32))
  dx_ref[rows] = dx.astype(dx_ref.dtype)


@common.shared_lowering(static_argnames=("out_dtype", "config"))
def dx_kernel(w_gate, w_up, tw: twell.TwELL, grads_MxTxCxK, *, out_dtype,
              config: BackwardConfig | None = None):
  """dx [M, D] (``out_dtype``) = sum over each row's TwELL entries of dR Wu[j] + dU Wg[j], with
  ``grads_MxTxCxK[..., 0]`` = dU and ``[..., 1]`` = dR at the slots (K = 1, non-gated: dU only,
  and ``w_gate`` holds the up weights). Rows with an overflowed tile: dx 0 (the dense row path
  owns them). Only the slots of entries are read."""
  cfg = config or DEFAULT_CONFIG
  interpret = common.pallas_interpret()
  m = tw.values_MxTxC.shape[0]
  d = w_gate.shape[1]
  common.check_row_span(d, "dx kernel")
  gated = w_up is not None
  if grads_MxTxCxK.shape != tw.values_MxTxC.shape + (2 if gated else 1,):
    raise ValueError(f"slot gradients of shape {grads_MxTxCxK.shape}, expected "
                     f"{tw.values_MxTxC.shape + (2 if gated else 1,)}")
  warpgroups = cfg.warpgroups
  grid, scratch, rows_per_wg, bounds = _token_grid(cfg, m, tw, interpret, "dx kernel")
  balanced = bounds is not None
  ins = [w_gate] + ([w_up] if gated else []) + [tw.counts_MxT, tw.indices_MxTxC,
                                                 tw.values_MxTxC, grads_MxTxCxK] + (
      [bounds] if balanced else [])

  def body(*refs):
    wg_ref = refs[0]
    wu_ref = refs[1] if gated else None
    n_in = 5 + gated + balanced
    cnt_ref, idx_ref, val_ref, g_ref = refs[1 + gated:5 + gated]
    dx_ref = refs[n_in]
    if interpret:
      wg = lax.axis_index("sm") * warpgroups + lax.axis_index("wg")
      _dx_jnp(wg_ref, wu_ref, cnt_ref, idx_ref, g_ref, dx_ref,
              rows=pl.ds(wg * rows_per_wg, rows_per_wg), tile_width=tw.tile)
      return
    present = list(refs)

    @plgpu.inline_mgpu(arg_types=tuple(plgpu.RefType() for _ in present))
    def _(ctx, *r):
      del ctx
      wg_r = r[0]
      wu_r = r[1] if gated else None
      cnt_r, idx_r, val_r, g_r = r[1 + gated:5 + gated]
      bounds_r = r[5 + gated] if balanced else None
      _dx_mgpu(wg_r, wu_r, cnt_r, idx_r, val_r, g_r, *r[n_in:],
               entries_per_step=cfg.entries_per_step, tile_width=tw.tile, bounds_ref=bounds_r)

    _(*present)

  f = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((m, d), out_dtype), scratch_types=scratch, grid=grid,
      grid_names=("sm",), num_threads=warpgroups, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=common.interpret_params())
  return f(*ins)
