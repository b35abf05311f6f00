"""Per-warp CUDA-core building blocks for the TwELL kernels, emitted through ``plgpu.inline_mgpu``.

One warp owns one token at a time. A lane holds 8-element slices ``8(lane + 32k) .. +8`` of every
d_model-wide row (16-byte coalesced loads; ``common.WARP_ROW_SPAN`` columns per pass), so a dot
product is a per-lane FMA chain plus a butterfly, and an axpy into an accumulator needs no
communication. Used by the fused forward (``twell_ffn``), the backward (``twell_backward``) and the
weight gradients (``twell_wgrad``); everything here runs inside an ``inline_mgpu`` body and
therefore only on the GPU (interpret mode cannot run it).
"""
from __future__ import annotations

import jax.experimental.mosaic.gpu as mgpu
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, nvvm, scf, vector
from jax._src.lib.mlir.dialects import math as mlir_math

from pallas_kernels.common import WARP_ROW_SPAN


class WarpKernel:
  """Types, lane geometry and helpers for one ``inline_mgpu`` body with rows of ``d_model``."""

  def __init__(self, d_model: int):
    if d_model % WARP_ROW_SPAN:
      raise ValueError(f"d_model={d_model} must be a multiple of {WARP_ROW_SPAN}")
    self.chunks = d_model // WARP_ROW_SPAN
    self.i32, self.index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    self.i1 = ir.IntegerType.get_signless(1)
    self.f32, self.bf16 = ir.F32Type.get(), ir.BF16Type.get()
    self.v8bf = ir.VectorType.get((8,), self.bf16)
    self.v8f = ir.VectorType.get((8,), self.f32)
    self.full = self.c(0xFFFFFFFF)
    self.tid = mgpu.thread_idx()
    self.lane = arith.remui(self.tid, self.c(32))
    self.warp = arith.divui(self.tid, self.c(32))
    self.n_warps = arith.divui(arith.index_cast(self.i32, gpu.block_dim(gpu.Dimension.x)), self.c(32))
    self.n_ctas = arith.index_cast(self.i32, gpu.grid_dim(gpu.Dimension.x))
    self.cta = mgpu.utils.block_idx()
    self.cols = [arith.muli(arith.addi(self.lane, self.c(32 * k)), self.c(8))
                 for k in range(self.chunks)]
    self.zero = vector.broadcast(self.v8f, self.cf(0.0))

  # ---- constants and casts
  def c(self, v):
    return mgpu.c(v, ir.IntegerType.get_signless(32))

  def cf(self, v):
    return mgpu.c(v, ir.F32Type.get())

  def idx(self, v):
    return v if isinstance(v.type, ir.IndexType) else arith.index_cast(self.index, v)

  def as_i32(self, v):
    return arith.index_cast(self.i32, v) if isinstance(v.type, ir.IndexType) else v

  def lt(self, a, b):
    return arith.cmpi(arith.CmpIPredicate.ult, a, b)

  def eq(self, a, b):
    return arith.cmpi(arith.CmpIPredicate.eq, a, b)

  # ---- rows
  def load_row(self, ref, row, as_f32=False):
    vals = [vector.load(self.v8bf, ref, [self.idx(row), self.idx(col)]) for col in self.cols]
    return [arith.extf(self.v8f, v) for v in vals] if as_f32 else vals

  def f32v(self, v):
    return v if ir.VectorType(v.type).element_type == self.f32 else arith.extf(self.v8f, v)

  def store_row(self, ref, row, vecs_f32):
    ety = ir.MemRefType(ref.type).element_type
    vty = ir.VectorType.get((8,), ety)
    for k, col in enumerate(self.cols):
      v = vecs_f32[k] if ety == self.f32 else arith.truncf(vty, vecs_f32[k])
      vector.store(v, ref, [self.idx(row), self.idx(col)])

  def warp_sum(self, s):
    for dist in (16, 8, 4, 2, 1):
      s = arith.addf(s, mgpu.utils.shfl_bfly(s, dist))
    return s

  def dot(self, a_vecs, b_vecs):
    """Warp-wide dot product of two rows given as this lane's slices (bf16 or f32)."""
    part = self.zero
    for k in range(self.chunks):
      part = mlir_math.fma(self.f32v(a_vecs[k]), self.f32v(b_vecs[k]), part)
    return self.warp_sum(vector.reduction(self.f32, vector.CombiningKind.ADD, part))

  def axpy(self, alpha, row_vecs, acc):
    av = vector.broadcast(self.v8f, alpha)
    return [mlir_math.fma(av, self.f32v(row_vecs[k]), acc[k]) for k in range(self.chunks)]

  def round_bf16(self, x):
    return arith.extf(self.f32, arith.truncf(self.bf16, x))

  def bcast(self, v, lane=0):
    return nvvm.shfl_sync(self.full, v, self.c(lane), self.c(0x1F), nvvm.ShflKind.idx)

  def if_else(self, cond, carry, then_fn):
    """``then_fn(carry) if cond else carry`` for a flat list of values (warp-uniform cond)."""
    branch = scf.IfOp(cond, [v.type for v in carry], has_else=True)
    with ir.InsertionPoint(branch.then_block):
      scf.yield_(list(then_fn(carry)))
    with ir.InsertionPoint(branch.else_block):
      scf.yield_(list(carry))
    return list(branch.results)

  # ---- TwELL entry lists
  def build_entry_list(self, t, cnt_ref, idx_ref, val_ref, ej_ref, ev_ref, es_ref=None, *,
                       tile_width: int):
    """Copies token t's TwELL entries (``tile_width``: the TwELL tile's neurons) into this warp's
    SMEM lists: global column (ej), value as f32 (ev) and, if asked, the flat slot
    ``tile * capacity + s`` (es). Tiles whose count exceeds the capacity contribute nothing and
    are returned as ballot masks (one i32 per 32 tiles) together with the number of entries."""
    _, n_tiles, capacity = ir.MemRefType(idx_ref.type).shape
    c, lane = self.c, self.lane
    masks, base = [], c(0)
    for g0 in range(0, n_tiles, 32):
      tile = arith.addi(lane, c(g0))
      has_tile = self.lt(tile, c(n_tiles))
      safe_tile = arith.select(has_tile, tile, c(0))
      raw = memref.load(cnt_ref, [self.idx(t), self.idx(safe_tile)])
      over = arith.andi(has_tile, arith.cmpi(arith.CmpIPredicate.sgt, raw, c(capacity)))
      keep = arith.andi(has_tile, arith.xori(over, mgpu.c(1, self.i1)))
      cnt = arith.select(keep, raw, c(0))
      masks.append(nvvm.vote_sync(self.full, over, nvvm.VoteSyncKind.ballot))
      incl = cnt
      for dist in (1, 2, 4, 8, 16):
        up = nvvm.shfl_sync(self.full, incl, c(dist), c(0), nvvm.ShflKind.up)
        incl = arith.select(arith.cmpi(arith.CmpIPredicate.uge, lane, c(dist)),
                            arith.addi(incl, up), incl)
      start = arith.addi(base, arith.subi(incl, cnt))

      @mgpu.fori(cnt, None)
      def _copy(s, _):
        pos = self.idx(arith.addi(start, self.as_i32(s)))
        local = arith.extui(self.i32, memref.load(idx_ref, [self.idx(t), self.idx(safe_tile),
                                                            self.idx(s)]))
        memref.store(arith.addi(arith.muli(safe_tile, c(tile_width)), local), ej_ref,
                     [self.idx(self.warp), pos])
        memref.store(arith.extf(self.f32, memref.load(val_ref, [self.idx(t), self.idx(safe_tile),
                                                                self.idx(s)])),
                     ev_ref, [self.idx(self.warp), pos])
        if es_ref is not None:
          memref.store(arith.addi(arith.muli(safe_tile, c(capacity)), self.as_i32(s)), es_ref,
                       [self.idx(self.warp), pos])
        return None

      base = arith.addi(base, self.bcast(incl, 31))
    mgpu.utils.warp_barrier()
    return base, masks

  def pick_entries(self, step, per_step, total, ej_ref, ev_ref):
    """The ``per_step`` list entries of this step: (row, value, valid, safe list index). Past the
    end, the index repeats the step's first entry (valid, since the step starts below total) and
    ``valid`` is False."""
    e0 = arith.muli(self.as_i32(step), self.c(per_step))
    picks = []
    for b in range(per_step):
      e = arith.addi(e0, self.c(b))
      valid = self.lt(e, total)
      e_safe = self.idx(arith.select(valid, e, e0))
      picks.append((memref.load(ej_ref, [self.idx(self.warp), e_safe]),
                    memref.load(ev_ref, [self.idx(self.warp), e_safe]), valid, e_safe))
    return picks

  def for_each_overflow_tile(self, masks, n_tiles, carry, body):
    """Runs ``body(tile, carry) -> carry`` for every tile set in the ballot masks."""
    for g0, mask in zip(range(0, n_tiles, 32), masks):
      @mgpu.fori(self.c(min(32, n_tiles - g0)), list(carry))
      def _bits(b, carry):
        bit = arith.andi(arith.shrui(mask, self.as_i32(b)), self.c(1))
        return self.if_else(arith.cmpi(arith.CmpIPredicate.ne, bit, self.c(0)), carry,
                            lambda cr: body(arith.addi(self.as_i32(b), self.c(g0)), cr))
      carry = list(_bits.results)
    return carry

  # ---- token scheduling
  def for_each_token(self, m: int, ctr_ref, process, dynamic: bool, bounds_ref=None):
    """Calls ``process(t)`` for tokens 0..m-1 across all warps of the grid: a fixed stride, or
    (dynamic) each CTA owns a contiguous range its warps take from an SMEM ticket counter, which
    balances tokens of very different activity within the CTA. The ranges are equal token counts,
    or with ``bounds_ref`` (GMEM int32 [n_ctas + 1], ``common.token_bounds``: about equal work)
    CTA k owns tokens bounds[k]..bounds[k + 1] - 1."""
    c = self.c
    if bounds_ref is not None:
      if not dynamic:
        raise ValueError("bounds_ref needs dynamic token tickets")
      lo = memref.load(bounds_ref, [self.idx(self.cta)])
      hi = arith.maxsi(lo, memref.load(bounds_ref, [self.idx(arith.addi(self.cta, c(1)))]))
      self.for_each_ticket(arith.subi(hi, lo), ctr_ref, lambda t: process(arith.addi(lo, t)))
      return
    if not dynamic:
      gwarp = arith.addi(arith.muli(self.cta, self.n_warps), self.warp)
      loop = scf.ForOp(self.idx(gwarp), mgpu.c(m, self.index),
                       self.idx(arith.muli(self.n_ctas, self.n_warps)), [])
      with ir.InsertionPoint(loop.body):
        process(self.as_i32(loop.induction_variable))
        scf.yield_([])
      return
    per_cta = arith.divui(arith.addi(c(m), arith.subi(self.n_ctas, c(1))), self.n_ctas)
    lo = arith.minui(arith.muli(self.cta, per_cta), c(m))
    hi = arith.minui(arith.addi(lo, per_cta), c(m))
    self.for_each_ticket(arith.subi(hi, lo), ctr_ref, lambda t: process(arith.addi(lo, t)))

  def for_each_ticket(self, n_tickets, ctr_ref, process):
    """Calls ``process(ticket)`` once for every ticket in [0, n_tickets) (an i32 value, the same
    for the whole CTA): this CTA's warps take tickets in order from an SMEM counter."""
    c = self.c
    with mgpu.when(self.eq(self.tid, c(0))):
      memref.store(c(0), ctr_ref, [mgpu.c(0, self.index)])
    gpu.barrier()
    ptr = mgpu.utils.memref_ptr(ctr_ref)
    loop = scf.WhileOp([self.i32], [c(0)])
    before = loop.before.blocks.append(self.i32)
    with ir.InsertionPoint(before):
      ticket = scf.IfOp(self.eq(self.lane, c(0)), [self.i32], has_else=True)
      with ir.InsertionPoint(ticket.then_block):
        scf.yield_([llvm.atomicrmw(llvm.AtomicBinOp.add, ptr, c(1),
                                   llvm.AtomicOrdering.monotonic)])
      with ir.InsertionPoint(ticket.else_block):
        scf.yield_([c(0)])
      t = self.bcast(ticket.result)
      scf.condition(self.lt(t, n_tickets), [t])
    after = loop.after.blocks.append(self.i32)
    with ir.InsertionPoint(after):
      process(after.arguments[0])
      scf.yield_([c(0)])
