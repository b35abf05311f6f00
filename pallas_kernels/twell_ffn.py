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
  2. lane l holds x[8(l + 32k) : 8(l + 32k) + 8] for k < d_model / 256 (16-byte coalesced loads)
     and the same slice of the f32 output accumulator;
  3. entries are taken two at a time: both Wu rows are loaded before the first reduction (loads in
     flight), each dot product is a per-lane FMA chain plus a 5-step butterfly, then both Wd rows
     are folded into the accumulator;
  4. tiles whose count exceeds the capacity (their TwELL row lost entries) are recomputed exactly:
     the warp takes the tile's 256 gate dot products itself and runs every active neuron through
     the same math, so the kernel is exact on any input with no fallback pass outside it;
  5. the row is stored once as bf16, and lane 0 stores the row's sum |h| (for the L1 statistic).
Interpret mode cannot run ``inline_mgpu``: the
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

WARPS_PER_WG = 4


@dataclasses.dataclass(frozen=True)
class FusedConfig:
  """warpgroups: per CTA (one CTA per SM, persistent); entries_per_step: active neurons whose rows
  are loaded before the first reduction; x_bf16: keep x packed in bf16 registers (fewer registers,
  one convert per use); split_loads: load the Wd rows only after the dot products (fewer live
  registers) instead of with the Wu rows (more bytes in flight); dynamic: warps of a CTA take the
  CTA's tokens from a shared-memory counter (balances skewed per-token activity) instead of a
  fixed stride."""
  warpgroups: int = 2
  entries_per_step: int = 4
  x_bf16: bool = True
  split_loads: bool = True
  dynamic: bool = True


# Chosen by experiments/tune_twell.py on an H200 (NOTES_twell.md): 0.475 ms uniform / 0.525 ms
# skewed at 28 active per token, M = 16384; 3-4 warpgroups spill registers and run 2x slower.
DEFAULT_CONFIG = FusedConfig()
DEFAULT_WARPGROUPS = DEFAULT_CONFIG.warpgroups


def _fused_mgpu(x_ref, wg_ref, wu_ref, wd_ref, cnt_ref, idx_ref, val_ref, out_ref, l1_ref, ej_ref,
                ev_ref, ctr_ref, *, cfg: FusedConfig):
  """Per-warp CUDA-core code. ``wu_ref`` is None for the non-gated FFN (``wg_ref`` then holds the
  up weights: the gate of a non-gated FFN is its hidden activation)."""
  import jax.experimental.mosaic.gpu as mgpu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, nvvm, scf, vector
  from jax._src.lib.mlir.dialects import math as mlir_math

  gated = wu_ref is not None
  m, d_model = ir.MemRefType(x_ref.type).shape
  _, n_tiles, capacity = ir.MemRefType(idx_ref.type).shape
  chunks = d_model // 256
  per_step = cfg.entries_per_step
  i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
  f32, bf16 = ir.F32Type.get(), ir.BF16Type.get()
  c = lambda v: mgpu.c(v, i32)
  ci = lambda v: mgpu.c(v, index)
  cf = lambda v: mgpu.c(v, f32)
  idx_of = lambda v: v if isinstance(v.type, ir.IndexType) else arith.index_cast(index, v)
  as_i32 = lambda v: arith.index_cast(i32, v) if isinstance(v.type, ir.IndexType) else v
  v8bf, v8f = ir.VectorType.get((8,), bf16), ir.VectorType.get((8,), f32)
  full = c(0xFFFFFFFF)

  tid = mgpu.thread_idx()
  lane = arith.remui(tid, c(32))
  warp = arith.divui(tid, c(32))
  n_warps = arith.divui(arith.index_cast(i32, gpu.block_dim(gpu.Dimension.x)), c(32))
  n_ctas = arith.index_cast(i32, gpu.grid_dim(gpu.Dimension.x))
  cta = mgpu.utils.block_idx()
  cols = [arith.muli(arith.addi(lane, c(32 * k)), c(8)) for k in range(chunks)]

  def hsum(v):
    return vector.reduction(f32, vector.CombiningKind.ADD, v)

  def warp_sum(v):
    for dist in (16, 8, 4, 2, 1):
      v = arith.addf(v, mgpu.utils.shfl_bfly(v, dist))
    return v

  def load_row(ref, row, as_f32=True):
    vals = [vector.load(v8bf, ref, [idx_of(row), idx_of(col)]) for col in cols]
    return [arith.extf(v8f, v) for v in vals] if as_f32 else vals

  def f32v(v):
    return v if ir.VectorType(v.type).element_type == f32 else arith.extf(v8f, v)

  zero = vector.broadcast(v8f, cf(0.0))

  def dot_x(x, row_vecs):
    part = zero
    for k in range(chunks):
      part = mlir_math.fma(f32v(x[k]), arith.extf(v8f, row_vecs[k]), part)
    return warp_sum(hsum(part))

  def dense_tile(x, tile, acc, l1):
    """Exact path for a tile whose count exceeded the capacity: its 256 gate values are
    recomputed here (x . Wg[j]), rounded to bf16 as the gate kernel rounds them, and every active
    neuron (not g <= 0, so NaN counts) goes through the same up/down math as the list entries."""
    step = 4
    res_types = [v8f] * chunks + [f32]

    @mgpu.fori(c(256 // step), (acc, l1))
    def _rows(jstep, carry):
      acc, l1 = carry
      j0 = arith.addi(arith.muli(tile, c(256)), arith.muli(as_i32(jstep), c(step)))
      rows = [arith.addi(j0, c(b)) for b in range(step)]
      gates = [dot_x(x, load_row(wg_ref, r, as_f32=False)) for r in rows]
      for row, g in zip(rows, gates):
        active = arith.cmpf(arith.CmpFPredicate.UGT, g, cf(0.0))
        branch = scf.IfOp(active, res_types, has_else=True)
        with ir.InsertionPoint(branch.then_block):
          gb = arith.extf(f32, arith.truncf(bf16, g))
          if gated:
            h = arith.extf(f32, arith.truncf(bf16, arith.mulf(gb, dot_x(x, load_row(wu_ref, row, False)))))
          else:
            h = gb
          wd_row = load_row(wd_ref, row, as_f32=False)
          hv = vector.broadcast(v8f, h)
          new_acc = [mlir_math.fma(hv, arith.extf(v8f, wd_row[k]), acc[k]) for k in range(chunks)]
          scf.yield_(new_acc + [arith.addf(l1, mlir_math.absf(h))])
        with ir.InsertionPoint(branch.else_block):
          scf.yield_(list(acc) + [l1])
        acc, l1 = list(branch.results[:chunks]), branch.results[chunks]
      return acc, l1

    return _rows.results

  def process_token(t):
    # 1. Entry list of this token in SMEM: (global column, gate value), tiles in order;
    #    overflowed tiles are recorded in a ballot mask and handled by dense_tile.
    overflow_masks = []
    base = c(0)
    for g0 in range(0, n_tiles, 32):
      tile = arith.addi(lane, c(g0))
      has_tile = arith.cmpi(arith.CmpIPredicate.ult, tile, c(n_tiles))
      safe_tile = arith.select(has_tile, tile, c(0))
      raw = memref.load(cnt_ref, [idx_of(t), idx_of(safe_tile)])
      over = arith.andi(has_tile, arith.cmpi(arith.CmpIPredicate.sgt, raw, c(capacity)))
      cnt = arith.select(arith.andi(has_tile, arith.xori(over, mgpu.c(1, ir.IntegerType.get_signless(1)))),
                         raw, c(0))
      overflow_masks.append(nvvm.vote_sync(full, over, nvvm.VoteSyncKind.ballot))
      incl = cnt
      for dist in (1, 2, 4, 8, 16):
        up = nvvm.shfl_sync(full, incl, c(dist), c(0), nvvm.ShflKind.up)
        incl = arith.select(arith.cmpi(arith.CmpIPredicate.uge, lane, c(dist)),
                            arith.addi(incl, up), incl)
      start = arith.addi(base, arith.subi(incl, cnt))

      @mgpu.fori(cnt, None)
      def _copy(s, _):
        local = arith.extui(i32, memref.load(idx_ref, [idx_of(t), idx_of(safe_tile), idx_of(s)]))
        col = arith.addi(arith.muli(safe_tile, c(256)), local)
        gate = arith.extf(f32, memref.load(val_ref, [idx_of(t), idx_of(safe_tile), idx_of(s)]))
        pos = idx_of(arith.addi(start, as_i32(s)))
        memref.store(col, ej_ref, [idx_of(warp), pos])
        memref.store(gate, ev_ref, [idx_of(warp), pos])
        return None

      base = arith.addi(base, nvvm.shfl_sync(full, incl, c(31), c(0x1F), nvvm.ShflKind.idx))
    total = base
    mgpu.utils.warp_barrier()

    # 2. This lane's slice of x.
    x = load_row(x_ref, t, as_f32=not cfg.x_bf16)
    n_steps = arith.divui(arith.addi(total, c(per_step - 1)), c(per_step))

    # 3. Entries, per_step at a time.
    @mgpu.fori(n_steps, ([zero] * chunks, cf(0.0)))
    def _entries(step, carry):
      acc, l1 = carry
      e0 = arith.muli(as_i32(step), c(per_step))
      picks = []
      for b in range(per_step):
        e = arith.addi(e0, c(b))
        valid = arith.cmpi(arith.CmpIPredicate.ult, e, total)
        e_safe = idx_of(arith.select(valid, e, e0))
        row = memref.load(ej_ref, [idx_of(warp), e_safe])
        gate = arith.select(valid, memref.load(ev_ref, [idx_of(warp), e_safe]), cf(0.0))
        picks.append((row, gate))
      ups = [load_row(wu_ref, row, as_f32=False) for row, _ in picks] if gated else None
      downs = None if cfg.split_loads else [load_row(wd_ref, row, as_f32=False) for row, _ in picks]
      hs = []
      for b, (row, gate) in enumerate(picks):
        if gated:
          r = dot_x(x, ups[b])
          hs.append(arith.extf(f32, arith.truncf(bf16, arith.mulf(gate, r))))
        else:
          hs.append(gate)
      if downs is None:
        downs = [load_row(wd_ref, row, as_f32=False) for row, _ in picks]
      for b, h in enumerate(hs):
        l1 = arith.addf(l1, mlir_math.absf(h))
        hv = vector.broadcast(v8f, h)
        acc = [mlir_math.fma(hv, arith.extf(v8f, downs[b][k]), acc[k]) for k in range(chunks)]
      return acc, l1

    acc, l1 = _entries.results
    acc = list(acc)

    # 4. Overflowed tiles, exactly (rare: the dispatcher keeps dense inputs off this path).
    for g0, mask in zip(range(0, n_tiles, 32), overflow_masks):
      res_types = [v8f] * chunks + [f32]

      @mgpu.fori(c(min(32, n_tiles - g0)), (acc, l1))
      def _bits(b, carry):
        acc, l1 = carry
        bit = arith.andi(arith.shrui(mask, as_i32(b)), c(1))
        branch = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ne, bit, c(0)), res_types, has_else=True)
        with ir.InsertionPoint(branch.then_block):
          new_acc, new_l1 = dense_tile(x, arith.addi(as_i32(b), c(g0)), acc, l1)
          scf.yield_(list(new_acc) + [new_l1])
        with ir.InsertionPoint(branch.else_block):
          scf.yield_(list(acc) + [l1])
        return list(branch.results[:chunks]), branch.results[chunks]

      acc, l1 = _bits.results
      acc = list(acc)
    v8out = ir.VectorType.get((8,), ir.MemRefType(out_ref.type).element_type)
    for k in range(chunks):
      vector.store(arith.truncf(v8out, acc[k]), out_ref, [idx_of(t), idx_of(cols[k])])
    with mgpu.when(arith.cmpi(arith.CmpIPredicate.eq, lane, c(0))):
      memref.store(l1, l1_ref, [idx_of(t)])
    mgpu.utils.warp_barrier()  # the entry list is rewritten by the next token

  if not cfg.dynamic:
    gwarp = arith.addi(arith.muli(cta, n_warps), warp)
    loop = scf.ForOp(idx_of(gwarp), ci(m), idx_of(arith.muli(n_ctas, n_warps)), [])
    with ir.InsertionPoint(loop.body):
      process_token(as_i32(loop.induction_variable))
      scf.yield_([])
    return
  # Dynamic: this CTA owns a contiguous token range; its warps take tokens from an SMEM counter.
  per_cta = arith.divui(arith.addi(c(m), arith.subi(n_ctas, c(1))), n_ctas)
  lo = arith.minui(arith.muli(cta, per_cta), c(m))
  hi = arith.minui(arith.addi(lo, per_cta), c(m))
  with mgpu.when(arith.cmpi(arith.CmpIPredicate.eq, tid, c(0))):
    memref.store(c(0), ctr_ref, [ci(0)])
  gpu.barrier()
  ptr = mgpu.utils.memref_ptr(ctr_ref)
  is_lane0 = arith.cmpi(arith.CmpIPredicate.eq, lane, c(0))
  loop = scf.WhileOp([i32], [c(0)])
  before = loop.before.blocks.append(i32)
  with ir.InsertionPoint(before):
    ticket = scf.IfOp(is_lane0, [i32], has_else=True)
    with ir.InsertionPoint(ticket.then_block):
      scf.yield_([llvm.atomicrmw(llvm.AtomicBinOp.add, ptr, c(1), llvm.AtomicOrdering.monotonic)])
    with ir.InsertionPoint(ticket.else_block):
      scf.yield_([c(0)])
    t = arith.addi(lo, nvvm.shfl_sync(full, ticket.result, c(0), c(0x1F), nvvm.ShflKind.idx))
    scf.condition(arith.cmpi(arith.CmpIPredicate.ult, t, hi), [t])
  after = loop.after.blocks.append(i32)
  with ir.InsertionPoint(after):
    process_token(after.arguments[0])
    scf.yield_([c(0)])


def _fused_jnp(x_ref, wg_ref, wu_ref, wd_ref, cnt_ref, idx_ref, val_ref, out_ref, l1_ref, *,
               rows):
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
  col = (idx + lax.broadcasted_iota(jnp.int32, idx.shape, 1) * 256).reshape(n_rows, -1)
  x = x_ref[rows].astype(jnp.float32)
  g_twell = jnp.zeros((n_rows, n_tiles * 256), jnp.float32).at[
      jnp.arange(n_rows)[:, None], col].add(jnp.where(valid, val, 0.0).reshape(col.shape))
  g_exact = jnp.dot(x, wg_ref[...].astype(jnp.float32).T)
  g_exact = jnp.where(jnp.logical_not(g_exact <= 0), g_exact, 0.0).astype(jnp.bfloat16)
  g = jnp.where(jnp.repeat(over, 256, axis=1), g_exact.astype(jnp.float32), g_twell)
  if gated:
    h = (g * jnp.dot(x, wu_ref[...].astype(jnp.float32).T)).astype(jnp.bfloat16)
    h = jnp.where(g == 0, 0.0, h.astype(jnp.float32))
  else:
    h = g
  out_ref[rows] = jnp.dot(h, wd_ref[...].astype(jnp.float32)).astype(out_ref.dtype)
  l1_ref[rows] = jnp.sum(jnp.abs(h), axis=1)


def fused_up_down(x_MxD: jax.Array, w_gate: jax.Array, w_up: jax.Array | None,
                  w_down: jax.Array, tw: TwELL, *,
                  compute: Literal["mgpu", "jnp", "auto"] = "auto", interpret: bool = False,
                  config: FusedConfig | None = None) -> tuple[jax.Array, jax.Array]:
  """(y [M, D] bf16, per-row sum |h| [M] f32) from TwELL-packed gate activations, exact for
  every row: tiles whose count exceeds the capacity are recomputed from ``w_gate``.

  Non-gated FFN: ``w_up=None`` and ``w_gate`` is its up projection (TwELL holds h itself)."""
  m, d = x_MxD.shape
  gated = w_up is not None
  if d % 256:
    raise ValueError(f"d_model={d} must be a multiple of 256 for the fused kernel")
  if tw.tile != 256 or tw.n_rows != m:
    raise ValueError(f"TwELL must be tile 256 with {m} rows, got tile {tw.tile}, rows {tw.n_rows}")
  for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
    if w is not None and (w.shape != (tw.n_tiles * 256, d) or w.dtype != jnp.bfloat16):
      raise ValueError(f"{name} must be bf16 [{tw.n_tiles * 256}, {d}], got {w.dtype} {w.shape}")
  if compute == "auto":
    compute = "jnp" if interpret else "mgpu"
  cfg = config or DEFAULT_CONFIG
  warpgroups = cfg.warpgroups
  out_type = (jax.ShapeDtypeStruct((m, d), jnp.bfloat16), jax.ShapeDtypeStruct((m,), jnp.float32))
  n_warps = warpgroups * WARPS_PER_WG
  list_len = tw.n_tiles * tw.capacity
  if compute == "mgpu":
    if n_warps * list_len * 8 > 200 * 1024:
      raise NotImplementedError(f"entry lists need {n_warps * list_len * 8} bytes of SMEM")
    scratch = [plgpu.SMEM((n_warps, list_len), jnp.int32),
               plgpu.SMEM((n_warps, list_len), jnp.float32), plgpu.SMEM((1,), jnp.int32)]
    grid = (common.num_sms(),)
  else:
    scratch = []
    grid = (2,)
  blocks = grid[0] * warpgroups
  if compute == "jnp" and m % blocks:
    raise NotImplementedError(f"the interpretable path needs M divisible by {blocks}")
  rows_per_wg = m // blocks

  def body(x_ref, wg_ref, *refs):
    if gated:
      wu_ref, wd_ref, cnt_ref, idx_ref, val_ref, out_ref, l1_ref, *scr = refs
    else:
      wd_ref, cnt_ref, idx_ref, val_ref, out_ref, l1_ref, *scr = refs
      wu_ref = None
    if compute == "mgpu":
      ref_args = [x_ref, wg_ref] + ([wu_ref] if gated else []) + [
          wd_ref, cnt_ref, idx_ref, val_ref, out_ref, l1_ref, *scr]

      @plgpu.inline_mgpu(arg_types=tuple(plgpu.RefType() for _ in ref_args))
      def _(ctx, *r):
        del ctx
        if gated:
          _fused_mgpu(*r, cfg=cfg)
        else:
          _fused_mgpu(r[0], r[1], None, *r[2:], cfg=cfg)

      _(*ref_args)
    else:
      wg = lax.axis_index("sm") * warpgroups + lax.axis_index("wg")
      _fused_jnp(x_ref, wg_ref, wu_ref, wd_ref, cnt_ref, idx_ref, val_ref, out_ref, l1_ref,
                 rows=pl.ds(wg * rows_per_wg, rows_per_wg))

  f = plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("sm",),
      num_threads=warpgroups, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=common.interpret_params() if interpret else None)
  args = (x_MxD, w_gate) + ((w_up,) if gated else ()) + (w_down, tw.counts_MxT,
                                                         tw.indices_MxTxC, tw.values_MxTxC)
  return f(*args)
