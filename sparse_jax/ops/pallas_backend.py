"""The ``"pallas_mosaic_gpu"`` implementation of the sparse FFN op: the glue around the Hopper
kernels of ``pallas_kernels`` (support check, dispatch, padding, custom_vjp forward and backward,
dense fallbacks). The kernels themselves know nothing of this module.

Inference (the primal of the custom_vjp):
  1. dispatcher (``SparseFFNConfig.mode="auto"``): the gate of a seeded random sample of tokens
     (``ops.dispatch``) estimates the active fraction on device; ``lax.cond`` runs the dense FFN
     (``dense.dense_with_stats``) when it is above ``dispatch_threshold`` (where the sparse path
     stops paying), with no host sync. ``mode="sparse"`` skips it (the caller decided);
     ``mode="dense"`` never reaches this backend (``sparse_jax.ops.modes``);
  2. gate kernel -> TwELL (``twell_gate``); fused up + down kernel (``twell_ffn``);
  3. tiles that overflowed the TwELL capacity are recomputed exactly inside the fused kernel (no
     fallback pass); the overflowed rows are counted in the stats.

Training (the custom_vjp's forward and backward): the gate kernel packs P = relu(x Wg^T) into
TwELL; the fused kernel computes y and also stores the up projection R = x Wu^T at every TwELL
slot. Residuals are x, the weights, TwELL(P), R and the neuron-sorted entry lists of the weight
gradients (``twell_wgrad.entry_lists``): no dense M x d_ff activation is kept. The backward
(``sparse_backward``, in the order of ``SparseFFNConfig.train_backward``) by default runs a pass
over the entries sorted by neuron (``twell_wgrad.neuron_major_pass``: a = dOut_i . Wd[j] and
dWd = T^T dOut), forms each entry's dU, dR (in the pass itself up to d_model 2048:
``neuron_major_pass_fused``, "auto"), then dx by token (``twell_backward.dx_kernel``) and
dWg = dU^T X, dWu = dR^T X by neuron (``twell_wgrad``); "token_major" forms a, dU, dR and dx in
one per-token kernel (``twell_backward.backward_kernel``) and all three weight gradients after.
Rows with an overflowed TwELL tile are skipped by the kernels' sparse backward and computed
exactly by a dense row path (at most ``overflow_capacity`` rows; beyond that, or with more active
entries than ``entry_capacity``, or when the dispatcher chose dense, the backward runs dense under
``lax.cond``). Every dense branch is chunked (``dense.dense_forward_chunked``,
``dense.dense_grads_neuron_chunked``) so no branch allocates [M, d_ff]. docs/method.md has the
rules and the numbers behind the thresholds.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common, twell_backward, twell_ffn, twell_gate, twell_wgrad
from sparse_jax.formats import twell
from sparse_jax.ops import decode, dispatch
from sparse_jax.ops.base import (F32, SparseFFNConfig, make_stats, named_sparse_residuals,
                                  resolve_train_backward)
from sparse_jax.ops.dense import (NEURON_CHUNK, ROW_CHUNK, _row_chunks, dense_forward_chunked,
                                  dense_grads_neuron_chunked, dense_with_stats, ffn_as_model,
                                  matmul_nt)
from sparse_jax.ops.nonfinite import nonfinite_rows, with_dense_nonfinite_rows

ROW_BLOCK = 128           # the gate kernel's CTA rows: x is padded to a multiple of it
ENTRY_HEADROOM = 1.25     # entry capacity over the dispatcher's threshold density
FORCED_FRACTION = 0.05    # density the entry capacity assumes when the dispatcher is off
MAX_TWELL_CAPACITY = 128  # the paper's largest (compression factor 2); the kernels' checked range
ROW_PATH_ONE_CHUNK = 1 << 22  # the backward's row path takes d_ff in one chunk up to budget x d_ff
# Profiling only (experiments/bench_train_parts.py): the backward skips its dense/sparse lax.cond
# so CUPTI sees every kernel (it cannot see kernels inside XLA's device-side conditionals).
# Inexact when the dense branch would have been taken; never set it for training.
PROFILE_WITHOUT_DISPATCH = False


def gate_config(cfg: SparseFFNConfig, d_model: int) -> twell_gate.GateConfig:
  """The gate kernel's tuning for this op config (its TwELL tile is ``cfg.tile``)."""
  return twell_gate.default_config(cfg.twell_capacity, d_model, tile_n=cfg.tile)


def supports(x_MxD, weights, cfg: SparseFFNConfig) -> str | None:
  """None if the kernels can run these arguments here, else why not."""
  if cfg.gate_threshold != 0:
    return f"the kernels compute ReLU; gate_threshold={cfg.gate_threshold} needs the XLA reference"
  if not common.pallas_interpret() and not common.hopper_available():
    return "needs an NVIDIA Hopper (sm_90) GPU as the default device"
  if x_MxD.dtype != jnp.bfloat16:
    return f"the kernels take bfloat16, got {x_MxD.dtype}"
  d_model = x_MxD.shape[1]
  if d_model % common.WARP_ROW_SPAN:
    return f"d_model={d_model} must be a multiple of {common.WARP_ROW_SPAN}"
  if cfg.twell_capacity % 8 or cfg.twell_capacity > MAX_TWELL_CAPACITY:
    return (f"twell_capacity must be a multiple of 8 up to {MAX_TWELL_CAPACITY}, got "
            f"{cfg.twell_capacity}")
  n_tiles = common.cdiv(weights[0].shape[0], cfg.tile)
  warps = max(twell_ffn.DEFAULT_CONFIG.warpgroups,
              twell_backward.DEFAULT_CONFIG.warpgroups) * common.WARPS_PER_WARPGROUP
  try:
    twell_gate.check_tile(cfg.tile)
    common.check_entry_lists(warps, n_tiles * cfg.twell_capacity, "fused kernel")
  except NotImplementedError as e:
    return str(e)
  return None


# --------------------------------------------------------------------------- dispatch


def estimate_active_fraction(x_MxD, w_gate, cfg: SparseFFNConfig | None = None) -> jax.Array:
  """Effective active fraction on device: the gate of a seeded random sample of tokens (never
  aligned to sequence starts) plus the cost of the (token, tile) pairs over the TwELL capacity
  (``sparse_jax.ops.dispatch``)."""
  cfg = cfg or SparseFFNConfig()
  return dispatch.estimate(x_MxD, w_gate,
                           dispatch.ProbeConfig(tile=cfg.tile, capacity=cfg.twell_capacity))


# The fused kernel holds a token's x row (bf16) and its f32 output row in one warp's registers,
# d_model / 32 elements of each per lane, next to the weight rows in flight. Above d_model 2048
# that spills: on an H200 at d_model 4096 / d_ff 14336, ~28 active per token (0.2%), the forced
# sparse op ran 0.89-0.93x of the dense FFN (bench_ffn_wall_shapes_h200.json). There the
# dispatcher (mode "auto") runs the dense FFN from the shape alone; mode "sparse" or
# max_active_fraction=None still run the kernels.
PAYING_MAX_D_MODEL = 2048


def auto_runs_dense(d_model: int, cfg: SparseFFNConfig) -> bool:
  """Whether mode "auto" runs the dense FFN for every call of this width (``ops.api``)."""
  return cfg.max_active_fraction is not None and d_model > PAYING_MAX_D_MODEL


def dispatch_threshold(cfg: SparseFFNConfig, m: int, training: bool = False) -> float:
  """Active fraction above which the dense FFN is faster. ``max_active_fraction`` holds for
  M >= 16384 tokens; fewer tokens leave the fused kernel's CTAs fewer tokens to balance, and the
  break-even falls roughly with sqrt(M) (bench_ffn.py on an H200: 56 active/token of 5632 is 1.12x
  at M = 16384 but 0.84x skewed at M = 4096). ``training``: the forward + backward line,
  ``max_active_fraction_train`` (bench_ffn_train.py)."""
  frac = cfg.max_active_fraction
  if training and cfg.max_active_fraction_train is not None:
    frac = min(frac, cfg.max_active_fraction_train)
  return frac * min(1.0, (m / 16384) ** 0.5)


def entry_capacity(cfg: SparseFFNConfig, m: int, n_pad: int, capacity: int) -> int:
  """Static capacity of the weight gradients' entry lists (``SparseFFNConfig.entry_capacity``)."""
  if cfg.entry_capacity is not None:
    return cfg.entry_capacity
  if cfg.max_active_fraction is None:
    frac = FORCED_FRACTION
  else:
    frac = dispatch_threshold(cfg, m, training=True)
  e = int(ENTRY_HEADROOM * frac * m * n_pad) + 1
  return max(1024, min(common.cdiv(e, 1024) * 1024, m * (n_pad // cfg.tile) * capacity))


def _pad_neurons(w, n_pad):
  return w if w is None or w.shape[0] == n_pad else jnp.pad(w, ((0, n_pad - w.shape[0]), (0, 0)))


def _active_per_neuron(tw: twell.TwELL) -> jax.Array:
  valid = tw.valid_mask()
  cols = jnp.where(valid, tw.global_indices(), tw.n_cols)
  return jnp.zeros((tw.n_cols,), jnp.int32).at[cols.reshape(-1)].add(1, mode="drop")


# --------------------------------------------------------------------------- inference


def _fused_with_dense_rows(xp, wg, wu, wd, tw: twell.TwELL, w_gate, w_up, w_down, budget: int,
                           return_r: bool = False, conditional: bool = True):
  """``twell_ffn.fused_up_down`` with the overflowed rows (up to ``budget``) on a dense row path.
  Same outputs: (y, per-row sum|h|[, r]).

  Why: the kernel's exact in-place recomputation of an overflowed tile costs one warp 256 gate
  dot products, so a single very busy token (a sequence start, the tail of a heavy-tailed batch)
  can overflow every tile and hold one warp for longer than the rest of the call takes (measured
  on an H200: 5 such rows in 16384 made the op 0.37x of dense). Here the first ``budget`` flagged
  rows are gathered and run as a small dense FFN (``ops.dense.ffn_as_model``) and the kernel sees
  them with count 0 (a zero row, no work); flagged rows past the budget keep their counts and the
  kernel's exact recomputation. The dense rows are computed and written under a ``lax.cond`` that
  holds XLA ops only and is skipped when no row overflowed (the common case costs one elementwise
  pass over the [M, tiles] counts). ``conditional=False``: the dense rows are always computed
  and written (a fixed-size row FFN, no conditional: ``SparseFFNConfig.defers_overflow``)."""
  mp = xp.shape[0]
  flagged = tw.row_overflow()
  (rows,) = jnp.nonzero(flagged, size=budget, fill_value=mp)
  taken = jnp.zeros((mp,), bool).at[rows].set(True, mode="drop")
  tw_kernel = twell.TwELL(tw.values_MxTxC, tw.indices_MxTxC,
                          jnp.where(taken[:, None], 0, tw.counts_MxT), n_cols=tw.n_cols,
                          tile=tw.tile)
  outs = twell_ffn.fused_up_down(xp, wg, wu, wd, tw_kernel, return_r=return_r)

  def write_dense_rows(y_l1):
    y, l1_rows = y_l1
    x_rows = jnp.take(xp, rows, axis=0, mode="fill", fill_value=0)
    y_rows, h_rows, _ = ffn_as_model(x_rows, w_gate, w_up, w_down)
    return (y.at[rows].set(y_rows.astype(y.dtype), mode="drop"),
            l1_rows.at[rows].set(jnp.sum(jnp.abs(h_rows.astype(F32)), axis=1), mode="drop"))

  if conditional:
    y, l1_rows = lax.cond(jnp.any(taken), write_dense_rows, lambda y_l1: y_l1,
                          (outs[0], outs[1]))
  else:
    y, l1_rows = write_dense_rows((outs[0], outs[1]))
  return (y, l1_rows) + tuple(outs[2:])


def twell_forward(x_MxD, w_gate, w_up, w_down, cfg: SparseFFNConfig):
  """Inference forward. Returns (y [M, D], FFNStats)."""
  m, d = x_MxD.shape
  n = w_gate.shape[0]
  n_pad = common.cdiv(n, cfg.tile) * cfg.tile

  def dense():
    return dense_with_stats(x_MxD, w_gate, w_up, w_down)

  def sparse():
    wg, wu, wd = (_pad_neurons(w, n_pad) for w in (w_gate, w_up, w_down))
    xp = common.pad_rows(x_MxD, ROW_BLOCK)
    tw = twell_gate.gate_twell(xp, wg, capacity=cfg.twell_capacity, config=gate_config(cfg, d))
    # Exact on every row: overflowed rows run dense (up to the row budget), any further ones are
    # recomputed inside the fused kernel.
    y, l1_rows = _fused_with_dense_rows(xp, wg, wu, wd, tw, w_gate, w_up, w_down,
                                        cfg.overflow_rows_for(m))
    tw = twell.TwELL(tw.values_MxTxC[:m], tw.indices_MxTxC[:m], tw.counts_MxT[:m],
                     n_cols=n_pad, tile=cfg.tile)
    flagged = tw.row_overflow()
    # Statistics below are dropped by XLA when the caller does not use them.
    active = lax.cond(jnp.any(flagged),
                      lambda: dense_with_stats(x_MxD, w_gate, w_up, w_down)[1].active_per_neuron,
                      lambda: _active_per_neuron(tw)[:n])
    return y[:m], make_stats(l0=jnp.sum(tw.counts_MxT) / m, l1=jnp.sum(l1_rows[:m]) / (m * n),
                             overflow_rows=jnp.sum(flagged, dtype=jnp.int32),
                             active_per_neuron=active)

  if cfg.max_active_fraction is None or cfg.mode == "sparse":
    return sparse()  # no probe, no conditional around the kernels
  too_dense = estimate_active_fraction(x_MxD, w_gate, cfg) > dispatch_threshold(cfg, m)
  return lax.cond(too_dense, dense, sparse)


# --------------------------------------------------------------------------- training forward


def training_forward(x_MxD, w_gate, w_up, w_down, cfg: SparseFFNConfig):
  """Training forward: ((y, FFNStats), residuals). Residuals are sparse (TwELL(P), R). Like the
  inference path, a probe of the gate's density sends too-dense calls to the dense FFN under
  ``lax.cond`` (on device); the backward follows the same branch."""
  m, d = x_MxD.shape
  n = w_gate.shape[0]
  n_pad = common.cdiv(n, cfg.tile) * cfg.tile
  mp = common.cdiv(m, ROW_BLOCK) * ROW_BLOCK
  nt, cap = n_pad // cfg.tile, cfg.twell_capacity
  wg, wu, wd = (_pad_neurons(w, n_pad) for w in (w_gate, w_up, w_down))

  e_cap = entry_capacity(cfg, mp, n_pad, cap)
  budget = cfg.overflow_rows_for(m)
  defer = cfg.defers_overflow

  def sparse():
    xp = common.pad_rows(x_MxD, ROW_BLOCK)
    tw = twell_gate.gate_twell(xp, wg, capacity=cap, config=gate_config(cfg, d))
    # Overflowed rows: dense in the forward (up to the budget; the backward's row path takes the
    # same rows), so no warp recomputes a whole busy row inside the fused kernel.
    outs = _fused_with_dense_rows(xp, wg, wu, wd, tw, w_gate, w_up, w_down, budget,
                                  return_r=w_up is not None, conditional=not defer)
    r = outs[2] if w_up is not None else jnp.zeros((mp, nt, cap), F32)
    flagged_p = tw.row_overflow()
    flagged = flagged_p[:m]
    # The weight gradients' entry lists depend on the pattern only: built here, kept as residuals.
    lists = twell_wgrad.entry_lists(tw, ~flagged_p, e_cap)
    n_flagged = jnp.sum(flagged, dtype=jnp.int32)
    # Overflowed lists hold only their first entries: then count from the gate on every row (XLA,
    # row chunks), so the per-neuron counts (dead-neuron tracking) are never short.
    if defer:  # the flagged rows within the budget, always (short only on a flagged call)
      active = lists.active_per_neuron()[:n] + _budget_rows_active_counts(x_MxD, w_gate,
                                                                          flagged, budget)
    else:
      active = lax.cond(
          lists.overflowed(),
          lambda: _flagged_active_counts(x_MxD, w_gate, jnp.ones((m,), bool), jnp.int32(m),
                                         budget),
          lambda: lists.active_per_neuron()[:n] + _flagged_active_counts(
              x_MxD, w_gate, flagged, n_flagged, budget))
    stats = make_stats(l0=jnp.sum(tw.counts_MxT[:m]) / m, l1=jnp.sum(outs[1][:m]) / (m * n),
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

  if cfg.max_active_fraction is None or cfg.mode == "sparse":
    too_dense = jnp.zeros((), bool)
    out, packed = sparse()  # no probe, no conditional around the kernels
  else:
    too_dense = (estimate_active_fraction(x_MxD, w_gate, cfg)
                 > dispatch_threshold(cfg, m, training=True))
    out, packed = lax.cond(too_dense, dense, sparse)
  # Named: a rematerialised block keeps them (ModelConfig.remat_policy) instead of running the
  # gate, fused and entry-list kernels again in its backward pass. x and the weights are not: the
  # block recomputes them cheaply (a norm, casts).
  vals, idx, cnt, r, lists, too_dense = named_sparse_residuals((*packed, too_dense))
  tw = twell.TwELL(vals, idx, cnt, n_cols=n_pad, tile=cfg.tile)
  return out, (x_MxD, w_gate, w_up, w_down, tw, r if w_up is not None else None, lists,
               too_dense)


def _budget_rows_active_counts(x_MxD, w_gate, flagged, budget):
  """[d_ff] active counts of the gate on the first ``budget`` flagged rows (a gate matmul on the
  gathered rows; fill rows count nothing)."""
  m = x_MxD.shape[0]
  (rows,) = jnp.nonzero(flagged, size=budget, fill_value=m)
  xo = jnp.take(x_MxD, rows, axis=0, mode="fill", fill_value=0)
  act = jnp.logical_not(matmul_nt(xo, w_gate) <= 0) & (rows < m)[:, None]
  return jnp.sum(act, axis=0, dtype=jnp.int32)


def _flagged_active_counts(x_MxD, w_gate, flagged, n_flagged, budget, chunk=ROW_CHUNK):
  """[d_ff] active counts of the gate on the flagged rows (their entries are not in the lists):
  a gate matmul on the gathered rows (at most ``budget``), or, with more, over all rows in
  row chunks (no [M, d_ff] buffer)."""
  m = x_MxD.shape[0]
  n = w_gate.shape[0]

  def few():
    return _budget_rows_active_counts(x_MxD, w_gate, flagged, budget)

  def many():
    def body(inp):
      xc, fc = inp
      act = jnp.logical_not(matmul_nt(xc, w_gate) <= 0) & fc[:, None]
      return jnp.sum(act, axis=0, dtype=jnp.int32)
    return jnp.sum(lax.map(body, (_row_chunks(x_MxD, chunk), _row_chunks(flagged, chunk))),
                   axis=0)

  return lax.cond(n_flagged == 0, lambda: jnp.zeros((n,), jnp.int32),
                  lambda: lax.cond(n_flagged > budget, many, few))


# --------------------------------------------------------------------------- training backward


def sparse_backward(order: str, xp, dyp, wg, wu, wd, tw: twell.TwELL, r, lists, coeff, w_dtype,
                    bwd_config: twell_backward.BackwardConfig | None = None,
                    fused_config: twell_wgrad.WgradConfig | None = None):
  """(dx [M_pad, D] in x's dtype, [dWg, dWu, dWd] (non-gated [dWu, dWd]) [N_pad, D] in
  ``w_dtype``) of the sparse backward on the rows without an overflowed tile, in the order of
  ``SparseFFNConfig.train_backward``. Inputs padded (rows of x and dOut, neurons of the
  weights); ``lists``: the forward's entry lists; ``coeff``: the L1 cotangent over M d_ff;
  ``bwd_config``: the per-token kernel's (``backward_kernel`` or ``dx_kernel``);
  ``fused_config``: the fused neuron-major pass's (default ``twell_wgrad.FUSED_PASS_CONFIG``)."""
  gated = wu is not None
  order = resolve_train_backward(order, xp.shape[1])
  if order == "token_major":
    dx, du, dr = twell_backward.backward_kernel(xp, dyp, wg, wu, wd, tw, r, coeff,
                                                config=bwd_config)
    # Weight gradients from the forward's entry lists: dWg = dU^T X, dWu = dR^T X, dWd = T^T dOut
    # with T = bf16(P R) as the forward rounded it (non-gated: T = P).
    if gated:
      c = lists.gather([du, dr, tw.values_MxTxC, r])
      coefs = jnp.stack([c[0], c[1], common.round_bf16(c[2] * c[3])])
    else:
      coefs = lists.gather([du, tw.values_MxTxC])
    return dx, twell_wgrad.sparse_weight_gradients(lists, coefs, xp, dyp, n_x=2 if gated else 1,
                                                   out_dtype=w_dtype)
  wcfg = twell_wgrad.DEFAULT_CONFIG
  tasks = twell_wgrad.task_table(lists.seg_start, piece=wcfg.piece, partial_rows=wcfg.partial_rows)
  if order == "neuron_major_fused":  # the per-entry math inside the pass (whole-row dots)
    # The pass shares the table where its config cuts the same pieces, else builds its own.
    fcfg = fused_config or twell_wgrad.FUSED_PASS_CONFIG
    same = (fcfg.piece, fcfg.partial_rows) == (wcfg.piece, wcfg.partial_rows)
    dwd, g_slots, g_KxE = twell_wgrad.neuron_major_pass_fused(
        lists, tw.values_MxTxC, r, coeff, dyp, wd, out_dtype=w_dtype, config=fcfg,
        tasks=tasks if same else None)
  else:
    g_slots, g_KxE, dwd = _neuron_major_glue(lists, tw, r, coeff, dyp, wd, w_dtype, tasks)
  dx = twell_backward.dx_kernel(wg, wu, tw, g_slots, out_dtype=xp.dtype, config=bwd_config)
  dws = twell_wgrad.sparse_weight_gradients(lists, g_KxE, xp, dyp, n_x=g_KxE.shape[0], n_dy=0,
                                            out_dtype=w_dtype, tasks=tasks)
  return dx, dws + [dwd]


def _neuron_major_glue(lists, tw: twell.TwELL, r, coeff, dyp, wd, w_dtype, tasks):
  """The neuron-major pass with d_model slices and the per-entry math in XLA: (g [M, T, C, K]
  (dU, dR) at the slots, g_KxE [K, E] by entry, dWd). The same per-entry math as the
  token-major kernel (twell_backward's docstring), with a = dOut_i . Wd[j] from the pass."""
  gated = r is not None
  p_e, *r_e = lists.gather([tw.values_MxTxC] + ([r] if gated else []))
  t_e = common.round_bf16(p_e * r_e[0]) if gated else p_e
  dwd, a_e = twell_wgrad.neuron_major_pass(lists, t_e, dyp, wd, out_dtype=w_dtype, tasks=tasks)
  d_t = a_e + coeff * jnp.where(t_e >= 0, 1.0, -1.0)
  d_u = jnp.where(p_e > 0, d_t * r_e[0] if gated else d_t, 0.0)
  g_KxE = jnp.stack([d_u, d_t * p_e] if gated else [d_u])
  n_slots = tw.values_MxTxC.size
  at = jnp.where(lists.slots >= 0, lists.slots, n_slots)
  g_slots = jnp.zeros((n_slots, g_KxE.shape[0]), F32).at[at].set(g_KxE.T, mode="drop")
  return g_slots.reshape(tw.values_MxTxC.shape + (-1,)), g_KxE, dwd


def training_backward(residuals, cotangents, cfg: SparseFFNConfig):
  x, w_gate, w_up, w_down, tw, r, lists, too_dense = residuals
  d_y, d_stats = cotangents
  m, _ = x.shape
  n = w_gate.shape[0]
  n_pad = tw.n_cols
  gated = w_up is not None
  budget = cfg.overflow_rows_for(m)
  coeff = d_stats.l1.astype(F32) / (m * n)
  wg, wu, wd = (_pad_neurons(w, n_pad) for w in (w_gate, w_up, w_down))
  xp = common.pad_rows(x, ROW_BLOCK)
  dyp = common.pad_rows(d_y.astype(x.dtype), ROW_BLOCK)
  flagged = tw.row_overflow()[:m]
  n_flagged = jnp.sum(flagged, dtype=jnp.int32)
  dtypes = [x.dtype, w_gate.dtype] + ([w_up.dtype] if gated else []) + [w_down.dtype]

  def sparse(conditional_rows: bool = True):
    dx, dws = sparse_backward(cfg.train_backward, xp, dyp, wg, wu, wd, tw, r, lists, coeff,
                              w_gate.dtype)
    grads = (dx[:m],) + tuple(dw[:n] for dw in dws)

    def add_flagged_rows(grads):
      # Rows with an overflowed tile: dense row path (exact), at most `budget` of them.
      (rows,) = jnp.nonzero(flagged, size=budget, fill_value=m)
      x_o = jnp.take(x, rows, axis=0, mode="fill", fill_value=0)
      dy_o = jnp.take(d_y.astype(x.dtype), rows, axis=0, mode="fill", fill_value=0)
      # Fill rows are zero in x and dOut, so they contribute nothing; their dx rows are dropped.
      # One d_ff chunk while the [budget, d_ff] temporaries are small: no loop in the step.
      chunk = n_pad if budget * n_pad <= ROW_PATH_ONE_CHUNK else NEURON_CHUNK
      g = dense_grads_neuron_chunked(x_o, dy_o, w_gate, w_up, w_down, coeff, max_chunk=chunk)
      dx = grads[0].at[rows].set(g[0].astype(grads[0].dtype), mode="drop")  # kernel left 0 there
      return (dx,) + tuple((dw.astype(F32) + gw).astype(dw.dtype)
                           for dw, gw in zip(grads[1:], g[1:]))

    if conditional_rows:
      grads = lax.cond(n_flagged > 0, add_flagged_rows, lambda g: g, grads)
    else:  # a fixed-size correction (zero rows when none is flagged), no conditional
      grads = add_flagged_rows(grads)
    return tuple(a.astype(dt) for a, dt in zip(grads, dtypes))

  def dense():
    return tuple(g.astype(dt) for g, dt in zip(
        dense_grads_neuron_chunked(x, d_y, w_gate, w_up, w_down, coeff), dtypes))

  if PROFILE_WITHOUT_DISPATCH:
    return sparse()
  if cfg.defers_overflow:
    # No conditional: the host never waits for the device inside the step. A call that needed
    # the dense backward (FFNStats.dense_fallback) returns these inexact gradients; the caller
    # redoes it with overflow_fallback="cond" (sparse_jax.train.loop does).
    return sparse(conditional_rows=False)
  if cfg.mode == "sparse":
    # The kernels run unconditionally, inside XLA's command buffer. The rare call with more
    # overflowed rows than the row path's budget, or more entries than the lists hold, is
    # corrected afterwards by a conditional whose branches hold only XLA ops (the d_ff-chunked
    # dense gradients: bounded memory, since a conditional reserves its largest branch).
    grads = sparse()
    return lax.cond((n_flagged > budget) | lists.overflowed(), dense, lambda: grads)
  return lax.cond(too_dense | (n_flagged > budget) | lists.overflowed(), dense, sparse)


# --------------------------------------------------------------------------- custom_vjp ops
# The implementation's entry points (``api.IMPLEMENTATIONS["pallas_mosaic_gpu"]``): x [M, D],
# checked weights; whether the kernels run compiled or interpreted is ``common.pallas_interpret()``
# at trace time.


# Rows of x with +-Inf or NaN take the dense FFN's output, as in the XLA reference
# (sparse_jax.ops.nonfinite): XLA glue around the kernels, run only when such a row exists; the
# kernels are unchanged. Applied to the inference primal and to the training forward, so the
# backward sees the same output.


def _exact_rows(x_MxD, w_gate, w_up, w_down, out):
  y, stats = out
  return with_dense_nonfinite_rows(x_MxD, w_gate, w_up, w_down, y), stats


def _train_forward(x_MxD, w_gate, w_up, w_down, cfg):
  out, res = training_forward(x_MxD, w_gate, w_up, w_down, cfg)
  if cfg.defers_overflow:
    # No conditional: a non-finite row of x is flagged like an overflow (the caller redoes the
    # call with "cond", where that row takes the dense FFN's output).
    y, stats = out
    bad = jnp.any(nonfinite_rows(x_MxD))
    return (y, dataclasses.replace(stats, dense_fallback=stats.dense_fallback | bad)), res
  return _exact_rows(x_MxD, w_gate, w_up, w_down, out), res


def _inference(x_MxD, w_gate, w_up, w_down, cfg: SparseFFNConfig):
  """The inference primal. In the decode regime (``cfg.decode_path``) the dense FFN or the
  decode kernels: both exact on non-finite rows by themselves, so no conditional is added (a
  ``lax.cond`` per layer would stall every generation step on a host round trip)."""
  m, d = x_MxD.shape
  if m <= cfg.decode_max_tokens and cfg.mode == "auto":
    if (cfg.decode_path == "kernel"
        and decode.kernel_supports(m, d, w_gate.shape[0]) is None):
      return decode.kernel_forward(x_MxD, w_gate, w_up, w_down, cfg)
    if cfg.decode_path in ("dense", "kernel"):
      return dense_with_stats(x_MxD, w_gate, w_up, w_down)
  return _exact_rows(x_MxD, w_gate, w_up, w_down, twell_forward(x_MxD, w_gate, w_up, w_down, cfg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gated_ffn(x_MxD, w_gate, w_up, w_down, cfg: SparseFFNConfig):
  return _inference(x_MxD, w_gate, w_up, w_down, cfg)


gated_ffn.defvjp(lambda x, wg, wu, wd, cfg: _train_forward(x, wg, wu, wd, cfg),
                 lambda cfg, res, ct: training_backward(res, ct, cfg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def relu_ffn(x_MxD, w_up, w_down, cfg: SparseFFNConfig):
  return _inference(x_MxD, w_up, None, w_down, cfg)


relu_ffn.defvjp(lambda x, wu, wd, cfg: _train_forward(x, wu, None, wd, cfg),
                lambda cfg, res, ct: training_backward(res, ct, cfg))
