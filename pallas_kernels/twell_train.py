"""Training path of the Pallas backend: sparse forward residuals and a sparse backward.

Forward (under ``jax.grad``): the gate kernel packs P = relu(x Wg^T) into TwELL; the fused kernel
computes y and also stores the up projection R = x Wu^T at every TwELL slot. Residuals are x, the
weights, TwELL(P) and R: no dense M x d_ff activation is kept.

Backward (``backward_kernel``, one warp per token, the fused kernel's machinery): for every active
entry j of token i
    a = dOut_i . Wd[j]                      (Wd row gathered; the sampled dOut Wd^T)
    t = bf16(p * r)                         (T exactly as the forward rounded it)
    dT = a + coeff * d|t|                   (the L1 term; jax.grad's sign convention, +1 at 0)
    dR = dT * p,  dU = dT * r * [p > 0]
    dX_i += dR * Wu[j] + dU * Wg[j]         (two more row gathers, accumulated in registers)
and dU, dR are stored at the entry's TwELL slot. The weight gradients are sparse-transpose products
of those slot values: dWg = dU^T X, dWu = dR^T X, dWd = T^T dOut (``twell_wgrad``: the forward
sorts the entries by neuron once, a CUDA-core kernel sums each neuron's token rows; work and
memory are proportional to the active entries, not to M x d_ff).

Rows with an overflowed TwELL tile are skipped by the kernel and computed exactly by a dense row
path (the vjp of the dense FFN on those rows, at most ``overflow_capacity`` of them; beyond that the
call's backward runs dense under ``lax.cond``), as the XLA reference does.
"""
from __future__ import annotations

import functools
import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common, twell_ffn, twell_gate, twell_wgrad
from sparse_jax.formats import twell
from sparse_jax.ops.config import FFNStats, SparseFFNConfig
from sparse_jax.ops.dense import F32, matmul_nn, matmul_nt
from sparse_jax.ops.nonfinite import with_dense_nonfinite_rows

TILE = twell_gate.TILE_N
ENTRIES_PER_STEP = 2


# --------------------------------------------------------------------------- backward kernel


def _backward_mgpu(x_ref, dy_ref, wg_ref, wu_ref, wd_ref, cnt_ref, idx_ref, val_ref, r_ref,
                   coeff_ref, dx_ref, du_ref, dr_ref, ej_ref, ev_ref, es_ref, ctr_ref, *,
                   entries_per_step: int = ENTRIES_PER_STEP):
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
    total, masks = w.build_entry_list(t, cnt_ref, idx_ref, val_ref, ej_ref, ev_ref, es_ref)
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

  w.for_each_token(m, ctr_ref, process_token, dynamic=True)


def _backward_jnp(x_ref, dy_ref, wg_ref, wu_ref, wd_ref, cnt_ref, idx_ref, val_ref, r_ref,
                  coeff_ref, dx_ref, du_ref, dr_ref, *, rows):
  """Interpretable path: the same per-entry math with array ops for a block of tokens."""
  gated = wu_ref is not None
  capacity = idx_ref.shape[2]
  cnt = cnt_ref[rows]
  flagged = jnp.any(cnt > capacity, axis=1)
  valid = ((lax.broadcasted_iota(jnp.int32, idx_ref[rows].shape, 2) < cnt[:, :, None])
           & ~flagged[:, None, None])
  col = (idx_ref[rows].astype(jnp.int32)
         + lax.broadcasted_iota(jnp.int32, valid.shape, 1) * 256).reshape(valid.shape[0], -1)
  p = val_ref[rows].astype(F32)
  dy = dy_ref[rows].astype(F32)
  a = jnp.take_along_axis(jnp.dot(dy, wd_ref[...].astype(F32).T), col, axis=1).reshape(p.shape)
  r = r_ref[rows] if gated else None
  tval = (p * r).astype(jnp.bfloat16).astype(F32) if gated else p
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


def backward_kernel(x_MxD, dy_MxD, w_gate, w_up, w_down, tw: twell.TwELL, r_MxTxC, coeff, *,
                    interpret: bool = False, warpgroups: int = 2,
                    entries_per_step: int = ENTRIES_PER_STEP):
  """(dx [M, D] in x's dtype, dU slots, dR slots) for the rows without an overflowed tile (flagged
  rows: dx 0, slots unspecified). ``coeff``: the L1 cotangent over (M * d_ff), a scalar."""
  m, d = x_MxD.shape
  gated = w_up is not None
  list_len = tw.n_tiles * tw.capacity
  n_warps = warpgroups * 4
  slots = jax.ShapeDtypeStruct(tw.values_MxTxC.shape, F32)
  # dx in x's dtype: accumulated in f32 registers, rounded once on the store.
  out_type = (jax.ShapeDtypeStruct((m, d), x_MxD.dtype), slots) + ((slots,) if gated else ())
  if interpret:
    grid, scratch = (2,), []
    if m % (grid[0] * warpgroups):
      raise NotImplementedError("the interpretable path needs M divisible by its token blocks")
  else:
    if n_warps * list_len * 12 > 200 * 1024:
      raise NotImplementedError(f"entry lists need {n_warps * list_len * 12} bytes of SMEM")
    grid = (common.num_sms(),)
    scratch = [plgpu.SMEM((n_warps, list_len), jnp.int32),
               plgpu.SMEM((n_warps, list_len), jnp.float32),
               plgpu.SMEM((n_warps, list_len), jnp.int32), plgpu.SMEM((1,), jnp.int32)]
  rows_per_wg = m // (grid[0] * warpgroups)
  names = ["x", "dy", "wg"] + (["wu"] if gated else []) + ["wd", "cnt", "idx", "val"] + (
      ["r"] if gated else []) + ["coeff", "dx", "du"] + (["dr"] if gated else [])

  def body(*refs):
    named = dict(zip(names, refs))
    scr = refs[len(names):]
    order = ["x", "dy", "wg", "wu", "wd", "cnt", "idx", "val", "r", "coeff", "dx", "du", "dr"]
    present = [named.get(k) for k in order]
    if not interpret:
      ref_args = [r for r in present + list(scr) if r is not None]

      @plgpu.inline_mgpu(arg_types=tuple(plgpu.RefType() for _ in ref_args))
      def _(ctx, *r):
        del ctx
        it = iter(r)
        args = [None if p is None else next(it) for p in present] + list(it)
        _backward_mgpu(*args, entries_per_step=entries_per_step)

      _(*ref_args)
    else:
      wg = lax.axis_index("sm") * warpgroups + lax.axis_index("wg")
      _backward_jnp(*present, rows=pl.ds(wg * rows_per_wg, rows_per_wg))

  f = plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("sm",),
      num_threads=warpgroups, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=common.interpret_params() if interpret else None)
  args = [x_MxD, dy_MxD, w_gate] + ([w_up] if gated else []) + [
      w_down, tw.counts_MxT, tw.indices_MxTxC, tw.values_MxTxC] + (
      [r_MxTxC] if gated else []) + [jnp.reshape(coeff, (1,)).astype(F32)]
  outs = f(*args)
  return outs[0], outs[1], (outs[2] if gated else None)


# --------------------------------------------------------------------------- glue
# Everything dense below runs over row chunks or d_ff chunks inside lax.map / lax.scan, so no
# [M, d_ff] buffer is ever allocated: XLA reserves a conditional's largest branch, so a dense fallback branch that
# materialised [M, d_ff] activations would set the step's peak memory even when never taken.

ROW_CHUNK = 2048
# Profiling only (experiments/bench_train_parts.py): the backward skips its dense/sparse lax.cond
# so CUPTI sees every kernel (it cannot see kernels inside XLA's device-side conditionals).
# Inexact when the dense branch would have been taken; never set it for training.
PROFILE_WITHOUT_DISPATCH = False


def _chunks(a, chunk):
  return common.pad_rows(a, chunk).reshape(-1, chunk, *a.shape[1:])


def _dense_chunk(xc, wg, wu, wd):
  """bf16 dense FFN on a row chunk: (y, sum |h|, active mask)."""
  pre = matmul_nt(xc, wg)
  h = jax.nn.relu(pre)
  if wu is not None:
    h = h * matmul_nt(xc, wu)
  h = h.astype(xc.dtype)
  return (matmul_nn(h, wd).astype(xc.dtype), jnp.sum(jnp.abs(h.astype(F32))),
          jnp.logical_not(pre <= 0))


def dense_forward_chunked(x, w_gate, w_up, w_down, chunk=ROW_CHUNK):
  """The dispatcher's dense branch for training: (y, FFNStats) with [chunk, d_ff] temporaries."""
  m, d = x.shape
  n = w_gate.shape[0]

  def body(xc):
    y, l1, act = _dense_chunk(xc, w_gate, w_up, w_down)
    return y, l1, jnp.sum(act, axis=0, dtype=jnp.int32)

  ys, l1s, acts = lax.map(body, _chunks(x, chunk))
  act = jnp.sum(acts, axis=0)
  acts_total = jnp.sum(act)
  # Zero padding rows are inactive everywhere (pre = 0), so they add nothing to the counts.
  return ys.reshape(-1, d)[:m], FFNStats(
      l0=acts_total / m, l1=jnp.sum(l1s) / (m * n), overflow_rows=jnp.zeros((), jnp.int32),
      dense_fallback=jnp.ones((), bool), active_per_neuron=act)


NEURON_CHUNK = 1536   # widest d_ff chunk of the dense branch's backward


def dense_grads_neuron_chunked(x, d_y, w_gate, w_up, w_down, coeff, max_chunk=NEURON_CHUNK):
  """The backward's dense branch: gradients of sum(y * d_y) + coeff * sum|h| of the bf16 dense
  FFN (as ``bf16_gated_ffn_with_l1`` computes it), recomputing the activations one d_ff chunk at
  a time over all M rows. Every weight-gradient row depends on one chunk only, so each chunk's
  dW is final (in the weight dtype); only dx sums over chunks (f32). Matmuls keep M = all rows
  (tensor-core sized); temporaries are ~6 [M, chunk] bf16 arrays plus the f32 dx."""
  m, d = x.shape
  n = w_gate.shape[0]
  gated = w_up is not None
  n_chunks = common.cdiv(n, max_chunk)
  width = common.cdiv(common.cdiv(n, n_chunks), 128) * 128
  n_pad = width * n_chunks
  ws = [w for w in (w_gate, w_up, w_down) if w is not None]
  chunks = [jnp.pad(w, ((0, n_pad - n), (0, 0))).reshape(n_chunks, width, d) for w in ws]
  dot_nt = lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ())))
  d_y = d_y.astype(x.dtype)

  def f(xx, *w):
    wg, wu, wd = w if gated else (w[0], None, w[1])
    h = jax.nn.relu(dot_nt(xx, wg))
    if wu is not None:
      h = h * dot_nt(xx, wu)
    y = lax.dot_general(h, wd, (((1,), (0,)), ((), ())))
    return y, jnp.sum(jnp.abs(h.astype(F32)))

  def body(dx, w):
    _, vjp = jax.vjp(f, x, *w)
    dxc, *dws = vjp((d_y, coeff))
    return dx + dxc.astype(F32), dws

  dx, dws = lax.scan(body, jnp.zeros((m, d), F32), chunks)
  return (dx,) + tuple(g.reshape(n_pad, d)[:n] for g in dws)


ENTRY_HEADROOM = 1.25     # entry capacity over the dispatcher's threshold density
FORCED_FRACTION = 0.05    # density the entry capacity assumes when the dispatcher is off


def entry_capacity(cfg: SparseFFNConfig, m: int, n_pad: int, capacity: int) -> int:
  """Static capacity of the weight gradients' entry lists (``SparseFFNConfig.entry_capacity``)."""
  if cfg.entry_capacity is not None:
    return cfg.entry_capacity
  from pallas_kernels import ffn_backend
  if cfg.max_active_fraction is None:
    frac = FORCED_FRACTION
  else:
    frac = ffn_backend.dispatch_threshold(cfg, m, training=True)
  e = int(ENTRY_HEADROOM * frac * m * n_pad) + 1
  return max(1024, min(common.cdiv(e, 1024) * 1024, m * (n_pad // TILE) * capacity))


def forward(x_MxD, w_gate, w_up, w_down, cfg: SparseFFNConfig, *, interpret=False):
  """Training forward: ((y, FFNStats), residuals). Residuals are sparse (TwELL(P), R). Like the
  inference path, a probe of the gate's density sends too-dense calls to the dense FFN under
  ``lax.cond`` (on device); the backward follows the same branch."""
  from pallas_kernels import ffn_backend
  m, _ = x_MxD.shape
  n = w_gate.shape[0]
  n_pad = common.cdiv(n, TILE) * TILE
  mp = common.cdiv(m, 128) * 128
  nt, cap = n_pad // TILE, cfg.twell_capacity
  pad = lambda w: w if w is None or w.shape[0] == n_pad else jnp.pad(
      w, ((0, n_pad - w.shape[0]), (0, 0)))
  wg, wu, wd = pad(w_gate), pad(w_up), pad(w_down)

  e_cap = entry_capacity(cfg, mp, n_pad, cap)
  budget = cfg.overflow_rows_for(m)

  def sparse():
    xp = common.pad_rows(x_MxD, 128)
    tw = twell_gate.gate_twell(xp, wg, capacity=cap, interpret=interpret)
    outs = twell_ffn.fused_up_down(xp, wg, wu, wd, tw, return_r=w_up is not None,
                                   interpret=interpret)
    r = outs[2] if w_up is not None else jnp.zeros((mp, nt, cap), F32)
    flagged_p = tw.row_overflow()
    flagged = flagged_p[:m]
    # The weight gradients' entry lists depend on the pattern only: built here, kept as residuals.
    lists = twell_wgrad.entry_lists(tw, ~flagged_p, e_cap)
    n_flagged = jnp.sum(flagged, dtype=jnp.int32)
    active = lists.active_per_neuron()[:n] + _flagged_active_counts(
        x_MxD, w_gate, flagged, n_flagged, budget)
    stats = FFNStats(l0=jnp.sum(tw.counts_MxT[:m]) / m, l1=jnp.sum(outs[1][:m]) / (m * n),
                     overflow_rows=n_flagged,
                     dense_fallback=(n_flagged > budget) | lists.overflowed(),
                     active_per_neuron=active)
    return (outs[0][:m], stats), (tw.values_MxTxC, tw.indices_MxTxC, tw.counts_MxT, r, lists)

  def dense():
    y, stats = dense_forward_chunked(x_MxD, w_gate, w_up, w_down)
    empty = (jnp.zeros((mp, nt, cap), jnp.bfloat16), jnp.zeros((mp, nt, cap), jnp.int16),
             jnp.zeros((mp, nt), jnp.int32), jnp.zeros((mp, nt, cap), F32),
             twell_wgrad.EntryLists.empty(e_cap, n_pad))
    return (y, stats), empty

  if cfg.max_active_fraction is None:
    too_dense = jnp.zeros((), bool)
    out, packed = sparse()
  else:
    too_dense = (ffn_backend.estimate_active_fraction(x_MxD, w_gate)
                 > ffn_backend.dispatch_threshold(cfg, m, training=True))
    out, packed = lax.cond(too_dense, dense, sparse)
  vals, idx, cnt, r, lists = packed
  tw = twell.TwELL(vals, idx, cnt, n_cols=n_pad, tile=TILE)
  return out, (x_MxD, w_gate, w_up, w_down, tw, r if w_up is not None else None, lists,
               too_dense)


def _flagged_active_counts(x_MxD, w_gate, flagged, n_flagged, budget, chunk=ROW_CHUNK):
  """[d_ff] active counts of the gate on the flagged rows (their entries are not in the lists):
  a gate matmul on the gathered rows (at most ``budget``), or, with more, over all rows in
  row chunks (no [M, d_ff] buffer)."""
  m = x_MxD.shape[0]
  n = w_gate.shape[0]

  def few():
    (rows,) = jnp.nonzero(flagged, size=budget, fill_value=m)
    xo = jnp.take(x_MxD, rows, axis=0, mode="fill", fill_value=0)
    act = jnp.logical_not(matmul_nt(xo, w_gate) <= 0) & (rows < m)[:, None]
    return jnp.sum(act, axis=0, dtype=jnp.int32)

  def many():
    def body(inp):
      xc, fc = inp
      act = jnp.logical_not(matmul_nt(xc, w_gate) <= 0) & fc[:, None]
      return jnp.sum(act, axis=0, dtype=jnp.int32)
    return jnp.sum(lax.map(body, (_chunks(x_MxD, chunk), _chunks(flagged, chunk))), axis=0)

  return lax.cond(n_flagged == 0, lambda: jnp.zeros((n,), jnp.int32),
                  lambda: lax.cond(n_flagged > budget, many, few))


def backward(residuals, cotangents, cfg: SparseFFNConfig, *, interpret=False):
  x, w_gate, w_up, w_down, tw, r, lists, too_dense = residuals
  d_y, d_stats = cotangents
  m, _ = x.shape
  n = w_gate.shape[0]
  n_pad = tw.n_cols
  gated = w_up is not None
  budget = cfg.overflow_rows_for(m)
  coeff = d_stats.l1.astype(F32) / (m * n)
  pad = lambda w: None if w is None else (w if w.shape[0] == n_pad else jnp.pad(
      w, ((0, n_pad - w.shape[0]), (0, 0))))
  wg, wu, wd = pad(w_gate), pad(w_up), pad(w_down)
  xp = common.pad_rows(x, 128)
  dyp = common.pad_rows(d_y.astype(x.dtype), 128)
  flagged = tw.row_overflow()[:m]
  n_flagged = jnp.sum(flagged, dtype=jnp.int32)
  dtypes = [x.dtype, w_gate.dtype] + ([w_up.dtype] if gated else []) + [w_down.dtype]

  def sparse():
    dx, du, dr = backward_kernel(xp, dyp, wg, wu, wd, tw, r, coeff, interpret=interpret)
    # Weight gradients from the forward's entry lists: dWg = dU^T X, dWu = dR^T X, dWd = T^T dOut
    # with T = bf16(P R) as the forward rounded it (non-gated: T = P).
    if gated:
      c = lists.gather([du, dr, tw.values_MxTxC, r])
      coefs = jnp.stack([c[0], c[1], (c[2] * c[3]).astype(jnp.bfloat16).astype(F32)])
    else:
      coefs = lists.gather([du, tw.values_MxTxC])
    dws = twell_wgrad.sparse_weight_gradients(lists, coefs, xp, dyp, n_x=2 if gated else 1,
                                              out_dtype=w_gate.dtype, interpret=interpret)
    grads = (dx[:m],) + tuple(dw[:n] for dw in dws)

    def add_flagged_rows(grads):
      # Rows with an overflowed tile: dense row path (exact), at most `budget` of them.
      (rows,) = jnp.nonzero(flagged, size=budget, fill_value=m)
      x_o = jnp.take(x, rows, axis=0, mode="fill", fill_value=0)
      dy_o = jnp.take(d_y.astype(x.dtype), rows, axis=0, mode="fill", fill_value=0)
      # Fill rows are zero in x and dOut, so they contribute nothing; their dx rows are dropped.
      g = dense_grads_neuron_chunked(x_o, dy_o, w_gate, w_up, w_down, coeff)
      dx = grads[0].at[rows].set(g[0].astype(grads[0].dtype), mode="drop")  # kernel left 0 there
      return (dx,) + tuple((dw.astype(F32) + gw).astype(dw.dtype)
                           for dw, gw in zip(grads[1:], g[1:]))

    grads = lax.cond(n_flagged > 0, add_flagged_rows, lambda g: g, grads)
    return tuple(a.astype(dt) for a, dt in zip(grads, dtypes))

  def dense():
    return tuple(g.astype(dt) for g, dt in zip(
        dense_grads_neuron_chunked(x, d_y, w_gate, w_up, w_down, coeff), dtypes))

  if PROFILE_WITHOUT_DISPATCH:
    return sparse()
  return lax.cond(too_dense | (n_flagged > budget) | lists.overflowed(), dense, sparse)


def make_ops(interpret: bool):
  """custom_vjp ops: inference primal (``ffn_backend.twell_forward``), sparse training fwd/bwd."""
  from pallas_kernels import ffn_backend

  # Rows of x with +-Inf or NaN take the dense FFN's output, as in the XLA reference
  # (sparse_jax.ops.nonfinite): XLA glue around the kernels, run only when such a row exists.
  def exact_rows(x, wg, wu, wd, out):
    y, stats = out
    return with_dense_nonfinite_rows(x, wg, wu, wd, y), stats

  def train_forward(x, wg, wu, wd, cfg):
    out, res = forward(x, wg, wu, wd, cfg, interpret=interpret)
    return exact_rows(x, wg, wu, wd, out), res

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
  def gated(x, w_gate, w_up, w_down, cfg):
    return exact_rows(x, w_gate, w_up, w_down,
                      ffn_backend.twell_forward(x, w_gate, w_up, w_down, cfg, interpret=interpret))

  gated.defvjp(train_forward, lambda cfg, res, ct: backward(res, ct, cfg, interpret=interpret))

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def relu(x, w_up, w_down, cfg):
    return exact_rows(x, w_up, None, w_down,
                      ffn_backend.twell_forward(x, w_up, None, w_down, cfg, interpret=interpret))

  relu.defvjp(lambda x, wu, wd, cfg: train_forward(x, wu, None, wd, cfg),
              lambda cfg, res, ct: backward(res, ct, cfg, interpret=interpret))
  return gated, relu
