"""Sparse weight gradients of the training backward: dW_k = S_k^T B_k on the active pattern only.

For the gated FFN, with the backward kernel's slot values dU, dR and the forward's T = bf16(P R):
    dWg[j] = sum_i dU[i, j] x_i,   dWu[j] = sum_i dR[i, j] x_i,   dWd[j] = sum_i T[i, j] dOut_i
(non-gated: dWu = dU^T X and dWd = P^T dOut). Each sum runs over the tokens on which neuron j was
active: ~81 of 16384 tokens at 28 active/token, so the dense products (1.1 TFLOP for the three)
waste ~99.5% of their FLOPs. Work here is proportional to the entries.

1. ``entry_lists`` (XLA, O(entries)): the TwELL slots of the rows kept for the sparse path are
   compacted into a list of at most ``capacity`` entries (row-major), then stably sorted by neuron
   (a key/index radix sort), giving per entry its token row and coefficients, and per neuron the
   start of its segment. More entries than ``capacity`` is reported (``n_entries``) and the caller
   takes its exact dense path.
2. ``task_table`` (XLA, O(d_ff)): one task per neuron segment, split into pieces of ``piece``
   entries when a neuron is active on more tokens (hot neurons of skewed models would otherwise
   leave one warp working long after the rest). ``piece`` grows by powers of two until the
   pieces of split neurons fit ``partial_rows``. Single-piece neurons are written straight to the
   output (zeros for a neuron with no entries); pieces of split neurons go to f32 partial rows
   that XLA sums per neuron afterwards. No atomics, so the result is deterministic.
3. The kernel (Mosaic GPU, CUDA cores, through ``plgpu.inline_mgpu``): a warp takes a (d_model
   slice, task) ticket, walks the task's entries ``unroll`` at a time (all loads issued before the
   FMAs) and accumulates ``coef * x_i`` (and ``coef * dOut_i``) in registers, lanes over columns
   (16-byte loads, 8 columns per lane and 256-column chunk). Tickets are d-slice-major, so at any
   time the whole GPU reads one slice of x and dOut (2 x 16 MB at M = 16384, d_model 2048),
   which stays in L2.

Floor (H200, M = 16384, d_model 2048, d_ff 5632, 28 active/token): 460k entries, each reading a
4 KB row of x and of dOut: 3.8 GB from L2, ~0.4 ms; 2.8 G FMAs are ~0.1 ms on the CUDA cores.
Interpret mode (``common.pallas_interpret()``) cannot run ``inline_mgpu``: the interpretable path
computes the same task table's sums with array ops (``_wgrad_jnp``); cross-lowering checks the GPU
path's MLIR on the CPU.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common
from sparse_jax.formats import sorting, twell

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class WgradConfig:
  """piece: entries per task before a neuron's segment is split; partial_rows: f32 partial rows
  for the pieces of split neurons; unroll: entries whose rows are in flight at once per warp;
  warpgroups: per CTA (one CTA per SM, persistent); task_overhead: a task's fixed cost (loads,
  flush) in entries, for balancing CTAs; slice_width: d_model columns of one ticket (a multiple
  of ``common.WARP_ROW_SPAN``; narrower where d_model is not a multiple of it)."""
  piece: int = 512
  partial_rows: int = 512
  unroll: int = 4
  warpgroups: int = 2
  task_overhead: int = 16
  slice_width: int = 512


DEFAULT_CONFIG = WgradConfig()
# The fused neuron-major pass holds whole rows (d_model 2048: 8 chunks a lane): its Wd row (32
# registers as bf16), the dWd accumulator (64) and ``unroll`` dOut rows in flight (32 each), so
# it keeps 2 in flight to stay clear of spills.
FUSED_PASS_UNROLL = 2
FUSED_PASS_CONFIG = WgradConfig(unroll=FUSED_PASS_UNROLL)
# Its tickets are whole rows, so a task of ``piece`` entries is as much work as 4 tickets of the
# sliced passes (512-column slices at d_model 2048). With their piece (512), the hot neurons of
# skewed activity are tasks of 260-512 entries against ~435 entries per warp on average (460k
# entries at ~28 active/token over 132 SMs x 8 warps), so the last tasks may run alone: on an H200
# the fused order took 1.61 ms skewed vs 1.33 ms uniform, where the sliced order is flat (1.60 /
# 1.57). The candidate below gives the fused pass the sliced passes' granularity (the pieces of
# skewed and Zipf activity at ~28 need ~3.6k and ~2.7k partial rows; ``task_table`` doubles the
# piece where they would not fit, so denser uniform activity stays unsplit). Unmeasured: the
# default stays as measured until ``bench_train_parts.py --fused-pieces`` has timed both.
FUSED_PASS_FINE_CONFIG = WgradConfig(piece=128, partial_rows=4096, unroll=FUSED_PASS_UNROLL)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EntryLists:
  """Active TwELL entries sorted by neuron (rows ascending within a neuron). Built from the
  forward's pattern alone, so the training forward builds it once and the backward reuses it.

  rows [E] int32 token row and slots [E] int32 flat TwELL slot ``(row * T + tile) * C + s``;
  entries past ``n_entries`` are padding (row 0, slot -1). seg_start [N_pad + 1] int32: neuron j's
  entries are ``seg_start[j]:seg_start[j + 1]``. n_entries: the true entry count; above E the
  lists are incomplete and must not be used (``overflowed``).
  """

  rows: jax.Array
  slots: jax.Array
  seg_start: jax.Array
  n_entries: jax.Array

  @property
  def capacity(self) -> int:
    return self.rows.shape[0]

  def overflowed(self) -> jax.Array:
    return self.n_entries > self.capacity

  def active_per_neuron(self) -> jax.Array:
    return jnp.diff(self.seg_start)

  def gather(self, slot_values) -> jax.Array:
    """[K, E] f32: each [M, T, C] array of ``slot_values`` at the entries (0 on padding)."""
    ok = self.slots >= 0
    safe = jnp.where(ok, self.slots, 0)
    return jnp.stack([jnp.where(ok, v.reshape(-1)[safe].astype(F32), 0.0) for v in slot_values])

  @staticmethod
  def empty(capacity: int, n_pad: int) -> "EntryLists":
    return EntryLists(rows=jnp.zeros((capacity,), jnp.int32),
                      slots=jnp.full((capacity,), -1, jnp.int32),
                      seg_start=jnp.zeros((n_pad + 1,), jnp.int32),
                      n_entries=jnp.zeros((), jnp.int32))


def entry_counts(tw: twell.TwELL, keep_rows: jax.Array) -> jax.Array:
  """[M, T] counts of the TwELL tiles on the rows kept for the sparse path: rows in ``keep_rows``
  without an overflowed tile (those belong to an exact dense row path). 0 elsewhere."""
  ok = keep_rows & ~tw.row_overflow()
  return jnp.where(ok[:, None], tw.counts_MxT, 0)


def entry_lists(tw: twell.TwELL, keep_rows: jax.Array, capacity: int) -> EntryLists:
  """Compacts TwELL's active slots on the kept rows (``entry_counts``) and sorts them by neuron."""
  _, n_tiles, cap = tw.values_MxTxC.shape
  n_pad = tw.n_cols
  cnt = entry_counts(tw, keep_rows).reshape(-1)
  incl = jnp.cumsum(cnt)
  total = incl[-1]
  excl = incl - cnt
  e = jnp.arange(capacity, dtype=jnp.int32)
  valid = e < total
  # (row, tile) of compact entry e: mark each non-empty (row, tile) at its first entry, then a
  # running max carries it over the tile's other entries.
  # The fill depends on this call's data (total >= 0 always): a constant fill is one broadcast
  # that XLA hoists to the start of a training step and copies for every layer's scatter, so each
  # layer's [capacity] buffer lived through the whole step (2b with remat: 77 x 7.8 MB).
  fill = jnp.where(total >= 0, -1, 0).astype(jnp.int32)
  marks = jnp.broadcast_to(fill, (capacity,)).at[jnp.where(cnt > 0, excl, capacity)].set(
      jnp.arange(cnt.shape[0], dtype=jnp.int32), mode="drop")
  rt = jnp.where(valid, lax.cummax(marks), 0)
  s = jnp.where(valid, e - excl[rt], 0)
  slot = rt * cap + s
  neuron = (rt % n_tiles) * tw.tile + tw.indices_MxTxC.reshape(-1)[slot].astype(jnp.int32)
  key = jnp.where(valid, neuron, n_pad)
  key_sorted, perm = sorting.argsort_small_keys(key, n_pad)  # CUB's radix sort on the GPU
  valid_sorted = key_sorted < n_pad
  # Segment starts: the exclusive running count of entries per neuron (a scatter-add and a
  # cumsum; a searchsorted of the sorted keys would be a ~20-step loop of small kernels on the
  # GPU, each a launch of its own).
  per_neuron = jnp.zeros((n_pad + 1,), jnp.int32).at[key].add(1)[:n_pad]
  seg_start = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                               jnp.cumsum(per_neuron, dtype=jnp.int32)])
  return EntryLists(rows=jnp.where(valid_sorted, rt[perm] // n_tiles, 0),
                    slots=jnp.where(valid_sorted, slot[perm], -1),
                    seg_start=seg_start, n_entries=total)


def task_table(seg_start: jax.Array, *, piece: int = DEFAULT_CONFIG.piece,
               partial_rows: int = DEFAULT_CONFIG.partial_rows):
  """(tasks [N_pad + partial_rows, 5] int32 = (start, end, out_row, partial_row, neuron),
  partial_neuron [partial_rows] int32 (N_pad where unused)). out_row / partial_row are -1 where
  not written; neuron is the task's neuron (0 on unused tasks, which hold no entries)."""
  n_pad = seg_start.shape[0] - 1
  count = jnp.diff(seg_start)
  n_entries = seg_start[-1]
  sizes = [piece]
  while sizes[-1] < (1 << 31) // 2 and len(sizes) < 24:
    sizes.append(sizes[-1] * 2)
  sizes = jnp.asarray(sizes, jnp.int32)
  # Partial rows needed at each candidate piece size; the smallest size that fits wins.
  need = jnp.sum(jnp.where(count[None, :] > sizes[:, None],
                           -(-count[None, :] // sizes[:, None]), 0), axis=1)
  b = sizes[jnp.argmax(need <= partial_rows)]
  multi = count > b
  n_pieces = jnp.where(multi, -(-count // b), 1)
  first = jnp.cumsum(n_pieces) - n_pieces
  n_tasks = jnp.sum(n_pieces)
  pfirst = jnp.cumsum(jnp.where(multi, n_pieces, 0)) - jnp.where(multi, n_pieces, 0)
  t_cap = n_pad + partial_rows
  k = jnp.arange(t_cap, dtype=jnp.int32)
  # The neuron of task k: the last neuron whose first task is <= k. Every neuron has >= 1 task, so
  # the firsts are distinct: mark each at its first task and carry it forward with a running max
  # (= searchsorted(first, k, "right") - 1 without the searchsorted's loop of small kernels).
  marks = jnp.full((t_cap,), 0, jnp.int32).at[first].set(
      jnp.arange(n_pad, dtype=jnp.int32), mode="drop")
  j = jnp.clip(lax.cummax(marks), 0, n_pad - 1)
  q = k - first[j]
  live = k < n_tasks
  start = jnp.where(live, seg_start[j] + q * b, n_entries)
  end = jnp.where(live, jnp.minimum(start + b, seg_start[j + 1]), n_entries)
  out_row = jnp.where(live & ~multi[j], j, -1)
  part_row = jnp.where(live & multi[j], pfirst[j] + q, -1)
  partial_neuron = jnp.full((partial_rows,), n_pad, jnp.int32).at[
      jnp.where(part_row >= 0, part_row, partial_rows)].set(j, mode="drop")
  tasks = jnp.stack([start, end, out_row, part_row, jnp.where(live, j, 0)],
                    axis=1).astype(jnp.int32)
  return tasks, partial_neuron


def cta_bounds(tasks, n_ctas: int, task_overhead: int = DEFAULT_CONFIG.task_overhead) -> jax.Array:
  """[n_ctas + 1] task index bounds giving each CTA about the same work (entries plus a fixed
  cost per task), so skewed neuron activity does not leave CTAs idle."""
  work = tasks[:, 1] - tasks[:, 0] + jnp.where((tasks[:, 2] >= 0) | (tasks[:, 3] >= 0),
                                               task_overhead, 0)
  return common.balanced_bounds(work, n_ctas)


# --------------------------------------------------------------------------- kernel


def slice_width(d_model: int, cfg: WgradConfig) -> int:
  """The ticket's d_model slice: ``cfg.slice_width`` where it divides d_model, else one warp
  pass."""
  return cfg.slice_width if d_model % cfg.slice_width == 0 else common.WARP_ROW_SPAN


# Refs of the kernel, in order (None where absent): inputs, outputs, scratch.
_IN = ("x", "dy", "rows", "coef", "task", "bounds", "wdot", "slots", "val", "r", "coeff")
_OUT_TAIL = ("part", "a", "g", "ge")


def _wgrad_mgpu(refs: dict, out_refs, *, n_x: int, n_dy: int, unroll: int, width: int):
  """Per-warp CUDA-core code: tickets (slice, task); lanes over 8-column groups of the slice.
  Products: ``n_x`` coefficient rows times x, then ``n_dy`` (0 or 1) times dOut. With ``wdot``
  (the neuron-major pass) each entry's dOut slice is also dotted with the task neuron's row of
  ``wdot``: stored as a partial sum at ``a[slice, entry]``, or, with ``slots`` (the fused
  finish, one slice of all d_model), turned into the entry's dU, dR right here: T, P and R
  read at the entry's slot (``val``, ``r``: flat TwELL arrays), T the dOut product's
  coefficient, and (dU, dR) stored at ``g[slot * K + k]`` and ``ge[k, entry]``."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, memref, vector
  from jax._src.lib.mlir.dialects import math as mlir_math
  import jax.experimental.mosaic.gpu as mgpu
  from pallas_kernels.warp_mgpu import WarpKernel

  x_ref, dy_ref, rows_ref, task_ref = refs["x"], refs["dy"], refs["rows"], refs["task"]
  _, d_model = ir.MemRefType(x_ref.type).shape
  n_slices, chunks = d_model // width, width // common.WARP_ROW_SPAN
  n_prod = n_x + n_dy
  dots, fused = refs["wdot"] is not None, refs["slots"] is not None
  gated = refs["r"] is not None
  k_out = 2 if gated else 1
  w = WarpKernel(d_model)
  c, cf = w.c, w.cf
  out_dtype = ir.MemRefType(out_refs[0].type).element_type
  v8out = ir.VectorType.get((8,), out_dtype)
  coeff = memref.load(refs["coeff"], [w.idx(c(0))]) if fused else None

  bounds = refs["bounds"]
  lo = memref.load(bounds, [w.idx(w.cta)])
  hi = arith.maxsi(lo, memref.load(bounds, [w.idx(arith.addi(w.cta, c(1)))]))
  span = arith.subi(hi, lo)
  safe_span = arith.maxui(span, c(1))

  def process(ticket):
    sl = arith.divui(ticket, safe_span)
    k = w.idx(arith.addi(lo, arith.remui(ticket, safe_span)))
    start = memref.load(task_ref, [k, w.idx(c(0))])
    end = memref.load(task_ref, [k, w.idx(c(1))])
    out_row = memref.load(task_ref, [k, w.idx(c(2))])
    part_row = memref.load(task_ref, [k, w.idx(c(3))])
    base = arith.muli(sl, c(width))
    cols = [w.idx(arith.addi(base, arith.muli(arith.addi(w.lane, c(32 * ch)), c(8))))
            for ch in range(chunks)]
    if dots:  # the task's neuron row (this slice), held in registers for all its entries
      neuron = w.idx(memref.load(task_ref, [k, w.idx(c(4))]))
      wrow = [vector.load(w.v8bf, refs["wdot"], [neuron, col]) for col in cols]
      if chunks <= 2:  # a narrow slice: held as f32 (8 registers a chunk; bf16 below: 4)
        wrow = [arith.extf(w.v8f, v) for v in wrow]
    n_steps = arith.divui(arith.addi(arith.subi(end, start), c(unroll - 1)), c(unroll))
    init = [w.zero] * (n_prod * chunks)

    @mgpu.fori(n_steps, init)
    def _steps(step, acc):
      e0 = arith.addi(start, arith.muli(w.as_i32(step), c(unroll)))
      loaded = []
      for u in range(unroll):
        e = arith.addi(e0, c(u))
        valid = w.lt(e, end)
        e_safe = w.idx(arith.select(valid, e, e0))
        row = w.idx(memref.load(rows_ref, [e_safe]))
        extra = None
        if fused:  # the entry's slot values; T is the dOut product's coefficient
          slot = w.idx(memref.load(refs["slots"], [e_safe]))
          pv = arith.extf(w.f32, memref.load(refs["val"], [slot]))
          rv = memref.load(refs["r"], [slot]) if gated else None
          tv = w.round_bf16(arith.mulf(pv, rv)) if gated else pv
          coefs = [arith.select(valid, tv, cf(0.0))]
          extra = (slot, pv, rv, tv)
        else:
          coefs = [arith.select(valid, memref.load(refs["coef"], [w.idx(c(q)), e_safe]),
                                cf(0.0)) for q in range(n_prod)]
        xs = [vector.load(w.v8bf, x_ref, [row, col]) for col in cols] if n_x else None
        dys = ([vector.load(w.v8bf, dy_ref, [row, col]) for col in cols]
               if n_dy or dots else None)
        loaded.append((coefs, xs, dys, valid, e_safe, extra))
      acc = list(acc)
      for coefs, xs, dys, valid, e_safe, extra in loaded:
        if dots:
          part = w.zero
          for ch in range(chunks):
            part = mlir_math.fma(arith.extf(w.v8f, dys[ch]), w.f32v(wrow[ch]), part)
          a = w.warp_sum(vector.reduction(w.f32, vector.CombiningKind.ADD, part))
          store = arith.andi(valid, w.eq(w.lane, c(0)))
          if fused:  # twell_backward's per-entry math, with this a
            slot, pv, rv, tv = extra
            sign = arith.select(arith.cmpf(arith.CmpFPredicate.OGE, tv, cf(0.0)), cf(1.0),
                                cf(-1.0))
            d_t = arith.addf(a, arith.mulf(coeff, sign))
            p_pos = arith.cmpf(arith.CmpFPredicate.OGT, pv, cf(0.0))
            grads = [arith.select(p_pos, arith.mulf(d_t, rv) if gated else d_t, cf(0.0))]
            if gated:
              grads.append(arith.mulf(d_t, pv))
            with mgpu.when(store):
              at = arith.muli(slot, mgpu.c(k_out, w.index))
              for q, g in enumerate(grads):
                memref.store(g, refs["g"], [arith.addi(at, mgpu.c(q, w.index))])
                memref.store(g, refs["ge"], [w.idx(c(q)), e_safe])
          else:
            with mgpu.when(store):
              memref.store(a, refs["a"], [w.idx(sl), e_safe])
        for q in range(n_prod):
          cv = vector.broadcast(w.v8f, coefs[q])
          src = xs if q < n_x else dys
          for ch in range(chunks):
            i = q * chunks + ch
            acc[i] = mlir_math.fma(cv, arith.extf(w.v8f, src[ch]), acc[i])
      return acc

    acc = list(_steps.results)
    with mgpu.when(arith.cmpi(arith.CmpIPredicate.sge, out_row, c(0))):
      for q in range(n_prod):
        for ch in range(chunks):
          v = acc[q * chunks + ch]
          v = v if out_dtype == w.f32 else arith.truncf(v8out, v)
          vector.store(v, out_refs[q], [w.idx(out_row), cols[ch]])
    with mgpu.when(arith.cmpi(arith.CmpIPredicate.sge, part_row, c(0))):
      for q in range(n_prod):
        for ch in range(chunks):
          vector.store(acc[q * chunks + ch], refs["part"],
                       [w.idx(part_row), w.idx(c(q)), cols[ch]])

  w.for_each_ticket(arith.muli(span, c(n_slices)), refs["ctr"], process)


def _wgrad_jnp(refs: dict, out_refs, *, n_x: int, n_dy: int, width: int):
  """Interpretable path: every task's sums (and the neuron-major pass's dot products, partial
  or finished into dU, dR) with array ops, written where the kernel writes them."""
  tasks = refs["task"][...]
  rows = refs["rows"][...]
  n_pad = out_refs[0].shape[0]
  part_ref = refs["part"]
  p_cap = part_ref.shape[0]
  end, out_row, part_row = tasks[:, 1], tasks[:, 2], tasks[:, 3]
  e = jnp.arange(rows.shape[0], dtype=jnp.int32)
  # Tasks are ordered and contiguous: entry e belongs to the first task whose end exceeds it.
  owner = jnp.searchsorted(end, e, side="right").astype(jnp.int32)
  owner = jnp.where(e < end[-1], owner, tasks.shape[0])
  live = owner < tasks.shape[0]
  x, dy = refs["x"][...].astype(F32), refs["dy"][...].astype(F32)
  fused = refs["slots"] is not None
  if fused:
    slot = jnp.where(live, refs["slots"][...], 0)
    p = refs["val"][...][slot].astype(F32)
    r = refs["r"][...][slot] if refs["r"] is not None else None
    t = common.round_bf16(p * r) if r is not None else p
    coefs = jnp.where(live, t, 0.0)[None]
  else:
    coefs = refs["coef"][...]
  sums = []
  for q in range(n_x + n_dy):
    b = (x if q < n_x else dy)[rows] * coefs[q][:, None]
    sums.append(jax.ops.segment_sum(b, owner, num_segments=tasks.shape[0]))
  orow = jnp.where(out_row >= 0, out_row, n_pad)
  prow = jnp.where(part_row >= 0, part_row, p_cap)
  for q, ref in enumerate(out_refs):
    ref[...] = jnp.zeros(ref.shape, ref.dtype).at[orow].set(sums[q].astype(ref.dtype), mode="drop")
  part_ref[...] = jnp.zeros(part_ref.shape, F32).at[prow].set(jnp.stack(sums, axis=1), mode="drop")
  if refs["wdot"] is None:
    return
  neuron = tasks[jnp.where(live, owner, 0), 4]
  prod = dy[rows] * refs["wdot"][...].astype(F32)[neuron]
  if not fused:
    n_slices = prod.shape[1] // width
    partial = prod.reshape(prod.shape[0], n_slices, width).sum(-1).T
    refs["a"][...] = jnp.where(live[None, :], partial, 0.0)
    return
  d_t = prod.sum(-1) + refs["coeff"][0] * jnp.where(t >= 0, 1.0, -1.0)
  grads = [jnp.where(p > 0, d_t * r if r is not None else d_t, 0.0)]
  if r is not None:
    grads.append(d_t * p)
  g = jnp.where(live[None, :], jnp.stack(grads), 0.0)
  k_out = len(grads)
  at = (jnp.where(live, refs["slots"][...], refs["val"].shape[0])[:, None] * k_out
        + jnp.arange(k_out)[None, :])
  # Only the entries' slots are defined (the kernel writes nothing elsewhere).
  refs["g"][...] = jnp.zeros(refs["g"].shape, F32).at[at.reshape(-1)].set(
      g.T.reshape(-1), mode="drop")
  refs["ge"][...] = g


@common.shared_lowering(static_argnames=("n_x", "n_dy", "out_dtype", "config"))
def weight_grads_kernel(x_MxD, dy_MxD, lists: EntryLists, coefs, tasks, wdot=None,
                        finish=None, *, n_x: int, n_dy: int = 1, out_dtype,
                        config: WgradConfig | None = None):
  """(outputs [n_x + n_dy] x [N_pad, D] out_dtype, partials [partial_rows, n_x + n_dy, D] f32,
  extras). With ``wdot`` ([N_pad, D], the neuron-major pass; n_x 0, n_dy 1), each entry's dOut
  row is dotted with its neuron's ``wdot`` row: extras is ``a`` [D / slice width, E] f32, one
  partial sum per d_model slice (0 on entries past the tasks). With ``finish`` = (TwELL values
  flat [S] bf16, R flat [S] f32 or None (non-gated), coeff [1] f32) as well, the kernel also
  forms T (the dOut product's coefficient; ``coefs`` unused) and each entry's dU, dR from the
  whole dot: extras is (g [S * K] f32, dU / dR at ``slot * K + k``, other slots undefined;
  ge [K, E] f32 by entry), K = 2 (gated) or 1. Needs one slice of all d_model."""
  cfg = config or DEFAULT_CONFIG
  interpret = common.pallas_interpret()
  _, d = x_MxD.shape
  common.check_row_span(d, "weight-gradient kernel")
  if cfg.slice_width % common.WARP_ROW_SPAN:
    raise NotImplementedError(f"WgradConfig.slice_width={cfg.slice_width} must be a multiple of "
                              f"{common.WARP_ROW_SPAN}")
  if n_dy not in (0, 1) or n_x < 0 or n_x + n_dy < 1:
    raise ValueError(f"n_x={n_x}, n_dy={n_dy}: need n_dy in (0, 1) and at least one product")
  width = slice_width(d, cfg)
  partial_rows = cfg.partial_rows
  n_pad = lists.seg_start.shape[0] - 1
  n_prod = n_x + n_dy
  dots, fused = wdot is not None, finish is not None
  if tasks.shape[0] != n_pad + partial_rows:
    raise ValueError(f"a task table of {tasks.shape[0]} rows for {n_pad} neurons and "
                     f"{partial_rows} partial rows: build it with this config's piece and "
                     f"partial_rows (task_table(..., partial_rows={partial_rows}))")
  if dots and wdot.shape != (n_pad, d):
    raise ValueError(f"wdot of shape {wdot.shape}, expected {(n_pad, d)} (padded neurons)")
  if fused:
    if not dots or (n_x, n_dy) != (0, 1):
      raise ValueError("finish is the neuron-major pass's: it needs wdot, n_x=0, n_dy=1")
    if width != d:
      raise ValueError(f"finish needs the whole d_model ({d}) in one slice, got slices of "
                       f"{width} (WgradConfig.slice_width)")
    val, r, coeff = finish
    k_out = 1 if r is None else 2
  elif coefs.shape[0] != n_prod:
    raise ValueError(f"{coefs.shape[0]} coefficient rows for n_x + n_dy = {n_prod} products")
  e_cap = lists.capacity
  extras = ((jax.ShapeDtypeStruct((val.size * k_out,), F32),
             jax.ShapeDtypeStruct((k_out, e_cap), F32)) if fused else
            (jax.ShapeDtypeStruct((d // width, e_cap), F32),) if dots else ())
  out_type = tuple(jax.ShapeDtypeStruct((n_pad, d), out_dtype) for _ in range(n_prod)) + (
      jax.ShapeDtypeStruct((partial_rows, n_prod, d), F32),) + extras
  if interpret:
    grid, scratch, threads = (1,), [], 1
  else:
    grid, scratch, threads = (common.num_sms(),), [plgpu.SMEM((1,), jnp.int32)], cfg.warpgroups
  inputs = dict(x=x_MxD, dy=dy_MxD, rows=lists.rows, coef=None if fused else coefs, task=tasks,
                bounds=cta_bounds(tasks, grid[0], cfg.task_overhead), wdot=wdot,
                slots=lists.slots if fused else None, val=val.reshape(-1) if fused else None,
                r=r.reshape(-1) if fused and r is not None else None,
                coeff=jnp.reshape(coeff, (1,)).astype(F32) if fused else None)
  in_names = [k for k in _IN if inputs[k] is not None]
  tail = ["part"] + (["g", "ge"] if fused else ["a"] if dots else [])

  def by_name(rs):
    """({name: ref or None} with the SMEM ticket counter as "ctr", the product outputs)."""
    named = dict(zip(in_names, rs))
    named.update(zip(tail, rs[len(in_names) + n_prod:]))
    full = {k: named.get(k) for k in _IN + _OUT_TAIL}
    full["ctr"] = None if interpret else rs[-1]
    return full, rs[len(in_names):len(in_names) + n_prod]

  def body(*refs):
    if interpret:
      _wgrad_jnp(*by_name(refs), n_x=n_x, n_dy=n_dy, width=width)
      return

    @plgpu.inline_mgpu(arg_types=tuple(plgpu.RefType() for _ in refs))
    def _(ctx, *r):
      del ctx
      _wgrad_mgpu(*by_name(r), n_x=n_x, n_dy=n_dy, unroll=cfg.unroll, width=width)

    _(*refs)

  f = plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("sm",),
      num_threads=threads, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=common.interpret_params())
  outs = f(*[inputs[k] for k in in_names])
  rest = outs[n_prod + 1:]
  return list(outs[:n_prod]), outs[n_prod], (tuple(rest) if fused else rest[0] if dots else None)


def reduce_partials(outs, partials, partial_neuron):
  """Writes the summed partial rows of split neurons into their output rows."""
  n_pad = outs[0].shape[0]
  p_cap = partials.shape[0]
  live = partial_neuron < n_pad
  # Partial rows are ordered by neuron: a neuron's rank among split neurons numbers its segment.
  new = live & jnp.concatenate([live[:1], partial_neuron[1:] != partial_neuron[:-1]])
  seg = jnp.where(live, jnp.cumsum(new) - 1, p_cap)
  sums = jax.ops.segment_sum(jnp.where(live[:, None, None], partials, 0.0), seg,
                             num_segments=p_cap)
  neuron_of_seg = jnp.full((p_cap,), n_pad, jnp.int32).at[jnp.where(new, seg, p_cap)].set(
      partial_neuron, mode="drop")
  return [o.at[neuron_of_seg].set(sums[:, p].astype(o.dtype), mode="drop")
          for p, o in enumerate(outs)]


def sparse_weight_gradients(lists: EntryLists, coefs, x_MxD, dy_MxD, *, n_x: int, n_dy: int = 1,
                            out_dtype, config: WgradConfig | None = None, tasks=None):
  """dW_p = S_p^T B_p, [N_pad, D] each, for the sparse S_p with values ``coefs[p]`` ([K, E] f32,
  K = n_x + n_dy) on the entries of ``lists``; B_p is x for p < n_x and dy for the last (n_dy 1).
  ``tasks``: ``task_table(lists.seg_start, ...)`` for ``config`` when the caller has it."""
  cfg = config or DEFAULT_CONFIG
  if tasks is None:
    tasks = task_table(lists.seg_start, piece=cfg.piece, partial_rows=cfg.partial_rows)
  tasks, partial_neuron = tasks
  outs, partials, _ = weight_grads_kernel(x_MxD, dy_MxD, lists, coefs, tasks, n_x=n_x, n_dy=n_dy,
                                          out_dtype=out_dtype, config=cfg)
  return reduce_partials(outs, partials, partial_neuron)


def neuron_major_pass(lists: EntryLists, t_coef, dy_MxD, w_down, *, out_dtype,
                      config: WgradConfig | None = None, tasks=None):
  """(dWd [N_pad, D] = T^T dOut over the entries, a [E] f32 = dOut_i . Wd[j] per entry) in one
  pass over the entries sorted by neuron: each dOut row an entry needs is read once for both, and
  the neuron's Wd row is held by the warp (the token-major backward then gathers no Wd rows).
  ``t_coef``: [E] f32, T at each entry; ``w_down``: [N_pad, D]. a is 0 past ``n_entries``."""
  cfg = config or DEFAULT_CONFIG
  if tasks is None:
    tasks = task_table(lists.seg_start, piece=cfg.piece, partial_rows=cfg.partial_rows)
  tasks, partial_neuron = tasks
  outs, partials, a_SxE = weight_grads_kernel(dy_MxD, dy_MxD, lists, t_coef[None], tasks, w_down,
                                              n_x=0, n_dy=1, out_dtype=out_dtype, config=cfg)
  (dwd,) = reduce_partials(outs, partials, partial_neuron)
  valid = jnp.arange(lists.capacity) < lists.n_entries
  return dwd, jnp.where(valid, a_SxE.sum(axis=0), 0.0)


def neuron_major_pass_fused(lists: EntryLists, values_MxTxC, r_MxTxC, coeff, dy_MxD, w_down, *,
                            out_dtype, config: WgradConfig | None = None, tasks=None):
  """``neuron_major_pass`` with the per-entry backward math in the kernel (one d_model slice:
  the whole dot is there): (dWd [N_pad, D], g [M, T, C, K] f32 with (dU, dR) at each entry's
  slot (other slots undefined), g_KxE [K, E] f32 the same by entry, 0 past ``n_entries``).
  K = 2 (gated, R given) or 1 (non-gated, ``r_MxTxC`` None: T = P). ``coeff``: the L1 cotangent
  over M d_ff. No XLA glue between the pass and ``twell_backward.dx_kernel``."""
  cfg = dataclasses.replace(config or FUSED_PASS_CONFIG, slice_width=dy_MxD.shape[1])
  if tasks is None:
    tasks = task_table(lists.seg_start, piece=cfg.piece, partial_rows=cfg.partial_rows)
  tasks, partial_neuron = tasks
  outs, partials, (g, ge) = weight_grads_kernel(
      dy_MxD, dy_MxD, lists, None, tasks, w_down, (values_MxTxC, r_MxTxC, coeff), n_x=0,
      n_dy=1, out_dtype=out_dtype, config=cfg)
  (dwd,) = reduce_partials(outs, partials, partial_neuron)
  valid = jnp.arange(lists.capacity) < lists.n_entries
  return dwd, g.reshape(values_MxTxC.shape + (-1,)), jnp.where(valid[None], ge, 0.0)
