"""Fused up + down projection reading TwELL (Mosaic GPU, Hopper).

For each token, its active neurons (from TwELL): ``r_j = x . Wu[j]`` (up projection sampled at
the active entries), ``h_j = bf16(g_j * r_j)`` (gated product, rounded as the reference rounds it),
``y += h_j * Wd[j]`` (sparse down projection). The output row is written once; the hidden
activation never exists anywhere but registers. Non-gated (``relu(x Wu^T) Wd``): the TwELL values
are h itself and only the down projection runs.

Why CUDA cores and per-token gathers (see NOTES_twell.md for the numbers): at d_model = 2048 a
gathered weight row is 4 KB, so a tensor-core tile of 64 gathered rows (256 KB) does not fit in
shared memory, and at ~0.5% density a block of tokens shares almost no rows, so the work is bound
by streaming the active rows from L2 (~3.8 GB at 28 active/token) whatever unit does the FMAs.

GPU path (``compute="mgpu"``, per-lane code through ``plgpu.inline_mgpu``): one warp per token,
tokens strided over all warps of a persistent grid.
  1. lane l < n_tiles reads the count of tile l, a warp scan gives each tile's offset, and each
     lane copies its tile's entries (global column, gate value) into a per-warp list in SMEM;
  2. lane l holds x[8(l + 32k) : 8(l + 32k) + 8] for k < d_model / 256 (16-byte coalesced loads,
     ``common.WARP_ROW_SPAN``) and the same slice of the f32 output accumulator;
  3. entries are taken two at a time: both Wu rows are loaded before the first reduction (loads in
     flight), each dot product is a per-lane FMA chain plus a 5-step butterfly, then both Wd rows
     are folded into the accumulator;
  4. tiles whose count exceeds the capacity (their TwELL row lost entries) are recomputed exactly:
     the warp takes the tile's gate dot products itself (one per neuron of the tile) and runs every
     active neuron through the same math, so the kernel is exact on any input with no fallback pass outside it;
  5. the row is stored once as bf16, and lane 0 stores the row's sum |h| (for the L1 statistic).
The TwELL tile width comes with the format (``TwELL.tile``). Interpret mode
(``common.pallas_interpret()``) cannot run ``inline_mgpu``: the
interpretable path (``compute="jnp"``) computes each warpgroup's token block with array ops in the
same kernel skeleton (grid, token partition, output stores).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common
from sparse_jax.formats.twell import TwELL


@dataclasses.dataclass(frozen=True)
class FusedConfig:
  """warpgroups: per CTA (one CTA per SM, persistent); entries_per_step: active neurons whose rows
  are loaded before the first reduction; split_loads: load the Wd rows only after the dot products
  (fewer live registers) instead of with the Wu rows (more bytes in flight); dynamic: warps of a
  CTA take the CTA's tokens from a shared-memory counter (balances skewed per-token activity)
  instead of a fixed stride; balanced (with dynamic): each CTA's range of tokens holds about
  equal work (``common.token_bounds``: entries, overflowed tiles' recomputation) instead of an
  equal token count; overflow_rows_per_step: gate rows an overflowed tile's exact
  recomputation loads at once (the TwELL tile must be a multiple of it). x stays packed in bf16
  registers (the tuned choice). interpret_ctas: the grid of the interpretable path."""
  warpgroups: int = 2
  entries_per_step: int = 4
  split_loads: bool = True
  dynamic: bool = True
  balanced: bool = False
  overflow_rows_per_step: int = 4
  interpret_ctas: int = 2


# Chosen by experiments/tune_twell.py on an H200 (NOTES_twell.md): 0.475 ms uniform / 0.525 ms
# skewed at 28 active per token, M = 16384; 3-4 warpgroups spill registers and run 2x slower.
DEFAULT_CONFIG = FusedConfig()


def _fused_mgpu(x_ref, wg_ref, wu_ref, wd_ref, cnt_ref, idx_ref, val_ref, out_ref, l1_ref, r_ref,
                ej_ref, ev_ref, es_ref, ctr_ref, *, cfg: FusedConfig, tile_width: int,
                bounds_ref=None):
  """Per-warp CUDA-core code. ``wu_ref`` is None for the non-gated FFN (``wg_ref`` then holds the
  up weights: the gate of a non-gated FFN is its hidden activation). ``r_ref`` (training) receives
  the up projection r at every TwELL slot; None for inference."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, memref
  from jax._src.lib.mlir.dialects import math as mlir_math
  import jax.experimental.mosaic.gpu as mgpu
  from pallas_kernels.warp_mgpu import WarpKernel

  gated = wu_ref is not None
  m, d_model = ir.MemRefType(x_ref.type).shape
  _, n_tiles, capacity = ir.MemRefType(idx_ref.type).shape
  w = WarpKernel(d_model)
  c, cf, per_step = w.c, w.cf, cfg.entries_per_step
  nch = w.chunks

  def dense_tile(x, tile, carry):
    """Exact path for a tile whose count exceeded the capacity: its ``tile_width`` gate values are
    recomputed here (x . Wg[j]), rounded to bf16 as the gate kernel rounds them, and every active
    neuron (not g <= 0, so NaN counts) goes through the same up/down math as the list entries."""
    step = cfg.overflow_rows_per_step

    @mgpu.fori(c(tile_width // step), list(carry))
    def _rows(jstep, carry):
      j0 = arith.addi(arith.muli(tile, c(tile_width)), arith.muli(w.as_i32(jstep), c(step)))
      rows = [arith.addi(j0, c(b)) for b in range(step)]
      gates = [w.dot(x, w.load_row(wg_ref, r)) for r in rows]
      for row, g in zip(rows, gates):
        def active_neuron(cr, row=row, g=g):
          acc, l1 = cr[:nch], cr[nch]
          gb = w.round_bf16(g)
          h = w.round_bf16(arith.mulf(gb, w.dot(x, w.load_row(wu_ref, row)))) if gated else gb
          return w.axpy(h, w.load_row(wd_ref, row), acc) + [arith.addf(l1, mlir_math.absf(h))]
        carry = w.if_else(arith.cmpf(arith.CmpFPredicate.UGT, g, cf(0.0)), carry, active_neuron)
      return carry

    return list(_rows.results)

  def process_token(t):
    total, masks = w.build_entry_list(t, cnt_ref, idx_ref, val_ref, ej_ref, ev_ref,
                                      es_ref if r_ref is not None else None, tile_width=tile_width)
    x = w.load_row(x_ref, t)
    n_steps = arith.divui(arith.addi(total, c(per_step - 1)), c(per_step))

    @mgpu.fori(n_steps, [w.zero] * nch + [cf(0.0)])
    def _entries(step, carry):
      acc, l1 = carry[:nch], carry[nch]
      picks = [(row, arith.select(valid, val, cf(0.0)), valid, e_safe)
               for row, val, valid, e_safe in w.pick_entries(step, per_step, total, ej_ref, ev_ref)]
      ups = [w.load_row(wu_ref, row) for row, *_ in picks] if gated else None
      downs = None if cfg.split_loads else [w.load_row(wd_ref, row) for row, *_ in picks]
      hs = []
      for b, (row, gate, valid, e_safe) in enumerate(picks):
        if gated:
          r = w.dot(x, ups[b])
          if r_ref is not None:
            slot = memref.load(es_ref, [w.idx(w.warp), e_safe])
            tile = arith.divui(slot, c(capacity))
            with mgpu.when(arith.andi(valid, w.eq(w.lane, c(0)))):
              memref.store(r, r_ref, [w.idx(t), w.idx(tile),
                                      w.idx(arith.remui(slot, c(capacity)))])
          hs.append(w.round_bf16(arith.mulf(gate, r)))
        else:
          hs.append(gate)
      if downs is None:
        downs = [w.load_row(wd_ref, row) for row, *_ in picks]
      for b, h in enumerate(hs):
        l1 = arith.addf(l1, mlir_math.absf(h))
        acc = w.axpy(h, downs[b], acc)
      return list(acc) + [l1]

    carry = list(_entries.results)
    # Overflowed tiles, exactly (rare: the dispatcher keeps dense inputs off this path).
    carry = w.for_each_overflow_tile(masks, n_tiles, carry,
                                     lambda tile, cr: dense_tile(x, tile, cr))
    w.store_row(out_ref, t, carry[:nch])
    with mgpu.when(w.eq(w.lane, c(0))):
      memref.store(carry[nch], l1_ref, [w.idx(t)])
    mgpu.utils.warp_barrier()  # the entry list is rewritten by the next token

  w.for_each_token(m, ctr_ref, process_token, cfg.dynamic, bounds_ref=bounds_ref)


def _fused_jnp(x_ref, wg_ref, wu_ref, wd_ref, cnt_ref, idx_ref, val_ref, out_ref, l1_ref, r_ref,
               *, rows, tile_width):
  """Interpretable path: the same math with array ops for a block of tokens, overflowed tiles
  recomputed exactly as the GPU path does."""
  gated = wu_ref is not None
  n_tiles, capacity = idx_ref.shape[1], idx_ref.shape[2]
  cnt = cnt_ref[rows]
  idx = idx_ref[rows].astype(jnp.int32)
  val = val_ref[rows].astype(jnp.float32)
  n_rows = idx.shape[0]
  over = cnt > capacity
  valid = (lax.broadcasted_iota(jnp.int32, idx.shape, 2) < cnt[:, :, None]) & ~over[:, :, None]
  col = (idx + lax.broadcasted_iota(jnp.int32, idx.shape, 1) * tile_width).reshape(n_rows, -1)
  x = x_ref[rows].astype(jnp.float32)
  g_twell = jnp.zeros((n_rows, n_tiles * tile_width), jnp.float32).at[
      jnp.arange(n_rows)[:, None], col].add(jnp.where(valid, val, 0.0).reshape(col.shape))
  g_exact = jnp.dot(x, wg_ref[...].astype(jnp.float32).T)
  g_exact = jnp.where(jnp.logical_not(g_exact <= 0), g_exact, 0.0).astype(jnp.bfloat16)
  g = jnp.where(jnp.repeat(over, tile_width, axis=1), g_exact.astype(jnp.float32), g_twell)
  if gated:
    u = jnp.dot(x, wu_ref[...].astype(jnp.float32).T)
    h = (g * u).astype(jnp.bfloat16)
    h = jnp.where(g == 0, 0.0, h.astype(jnp.float32))
    if r_ref is not None:
      r = jnp.take_along_axis(u, col, axis=1).reshape(idx.shape)
      r_ref[rows] = jnp.where(valid, r, 0.0)
  else:
    h = g
  out_ref[rows] = jnp.dot(h, wd_ref[...].astype(jnp.float32)).astype(out_ref.dtype)
  l1_ref[rows] = jnp.sum(jnp.abs(h), axis=1)


@common.shared_lowering(static_argnames=("return_r", "compute", "config"))
def fused_up_down(x_MxD: jax.Array, w_gate: jax.Array, w_up: jax.Array | None,
                  w_down: jax.Array, tw: TwELL, *, return_r: bool = False,
                  compute: Literal["mgpu", "jnp", "auto"] = "auto",
                  config: FusedConfig | None = None):
  """(y [M, D] bf16, per-row sum |h| [M] f32[, r [M, tiles, C] f32]) from TwELL-packed gate
  activations, exact for every row: tiles whose count exceeds the capacity are recomputed from
  ``w_gate``.

  Non-gated FFN: ``w_up=None`` and ``w_gate`` is its up projection (TwELL holds h itself).
  ``return_r`` (gated only; training residual): the up projection ``x . Wu[j]`` at every valid
  TwELL slot of tiles that did not overflow (other slots unspecified)."""
  m, d = x_MxD.shape
  gated = w_up is not None
  cfg = config or DEFAULT_CONFIG
  interpret = common.pallas_interpret()
  if return_r and not gated:
    raise ValueError("return_r needs the gated FFN (the non-gated one has no up projection)")
  common.check_row_span(d, "fused kernel")
  if tw.n_rows != m:
    raise ValueError(f"TwELL has {tw.n_rows} rows but x has {m}")
  if tw.tile % cfg.overflow_rows_per_step or tw.tile > 1 << 15:
    raise NotImplementedError(f"TwELL tile={tw.tile}: the fused kernel needs a multiple of "
                              f"FusedConfig.overflow_rows_per_step={cfg.overflow_rows_per_step} "
                              "whose local indices fit int16")
  n_cols = tw.n_tiles * tw.tile
  for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
    if w is not None and (w.shape != (n_cols, d) or w.dtype != jnp.bfloat16):
      raise ValueError(f"{name} must be bf16 [{n_cols}, {d}], got {w.dtype} {w.shape}")
  if compute == "auto":
    compute = "jnp" if interpret else "mgpu"
  warpgroups = cfg.warpgroups
  out_type = [jax.ShapeDtypeStruct((m, d), jnp.bfloat16), jax.ShapeDtypeStruct((m,), jnp.float32)]
  if return_r:
    out_type.append(jax.ShapeDtypeStruct((m, tw.n_tiles, tw.capacity), jnp.float32))
  n_warps = warpgroups * common.WARPS_PER_WARPGROUP
  list_len = tw.n_tiles * tw.capacity
  if compute == "mgpu":
    common.check_entry_lists(n_warps, list_len, "fused kernel")
    scratch = [plgpu.SMEM((n_warps, list_len), jnp.int32),
               plgpu.SMEM((n_warps, list_len), jnp.float32),
               plgpu.SMEM((n_warps, list_len), jnp.int32), plgpu.SMEM((1,), jnp.int32)]
    grid = (common.num_sms(),)
  else:
    scratch = []
    grid = (cfg.interpret_ctas,)
  blocks = grid[0] * warpgroups
  if compute == "jnp" and m % blocks:
    raise NotImplementedError(f"the interpretable path needs M divisible by {blocks}")
  rows_per_wg = m // blocks
  balanced = cfg.balanced and compute == "mgpu"
  if balanced and not cfg.dynamic:
    raise ValueError("FusedConfig.balanced needs dynamic=True (token tickets within each CTA)")
  n_in = 6 + gated + balanced

  def body(*refs):
    ins, outs, scr = refs[:n_in], refs[n_in:n_in + len(out_type)], refs[n_in + len(out_type):]
    x_ref, wg_ref = ins[:2]
    wu_ref = ins[2] if gated else None
    wd_ref, cnt_ref, idx_ref, val_ref = ins[2 + gated:6 + gated]
    bounds_ref = ins[6 + gated] if balanced else None
    out_ref, l1_ref = outs[:2]
    r_ref = outs[2] if return_r else None
    if compute == "mgpu":
      present = [x_ref, wg_ref, wu_ref, wd_ref, cnt_ref, idx_ref, val_ref, out_ref, l1_ref, r_ref,
                 *scr, bounds_ref]
      ref_args = [r for r in present if r is not None]

      @plgpu.inline_mgpu(arg_types=tuple(plgpu.RefType() for _ in ref_args))
      def _(ctx, *r):
        del ctx
        it = iter(r)
        args = [None if p is None else next(it) for p in present]
        _fused_mgpu(*args[:-1], cfg=cfg, tile_width=tw.tile, bounds_ref=args[-1])

      _(*ref_args)
    else:
      wg = lax.axis_index("sm") * warpgroups + lax.axis_index("wg")
      _fused_jnp(x_ref, wg_ref, wu_ref, wd_ref, cnt_ref, idx_ref, val_ref, out_ref, l1_ref,
                 r_ref, rows=pl.ds(wg * rows_per_wg, rows_per_wg), tile_width=tw.tile)

  f = plgpu.kernel(
      body, out_type=tuple(out_type), scratch_types=scratch, grid=grid, grid_names=("sm",),
      num_threads=warpgroups, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=common.interpret_params())
  args = (x_MxD, w_gate) + ((w_up,) if gated else ()) + (w_down, tw.counts_MxT,
                                                         tw.indices_MxTxC, tw.values_MxTxC)
  if balanced:
    args += (common.token_bounds(tw.counts_MxT, tw.capacity, grid[0],
                                 overflowed_rows_skipped=False),)
  return f(*args)
