"""XLA reference of the sparse FFN: the definition every Pallas kernel must match.

It computes what the kernels compute, on the same formats, in the same order:

* inference (the primal, no gradient): gate -> TwELL; the up projection sampled at the active
  entries; the gated product; the sparse down projection. Rows whose TwELL tile overflowed are
  recomputed exactly on a dense row path (up to ``overflow_capacity`` rows; beyond that the whole
  call runs dense under ``lax.cond``).
* training (``jax.custom_vjp`` forward): gate -> Hybrid (ELL + dense tail); R = X Wu^T sampled at
  P's pattern; T = R * P; out = T Wd. Residuals are x, the weights, and the sparse P and R; no
  dense M x d_ff activation is kept. Tail overflow takes the dense path, forward and backward.
* backward: dT = (dOut Wd^T) sampled at T's pattern + coeff * d|T|; dR = dT * P;
  dU = dT * R * [P > 0]; dX = dR Wu + dU Wg; dWu = dR^T X, dWg = dU^T X, dWd = T^T dOut, the ELL
  part through its column-sorted transpose and the tail rows through dense matmuls.

Sampled and sparse-dense products are evaluated here with dense XLA matmuls followed by gathers or
preceded by scatters: every entry is the same dot product the kernels take, so the results agree to
rounding, while the structure (formats, residuals, fallbacks) is the kernels'.

Non-gated FFN (``w_up is None``): P = relu(X Wu^T) is the hidden activation itself (T = P).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_jax.formats import hybrid, twell
from sparse_jax.ops.base import (F32, FFNStats, SparseFFNConfig, make_stats,
                                 named_sparse_residuals)
from sparse_jax.ops.dense import (ffn_with_l1, gate_activation, hidden, matmul_nn, matmul_nt,
                                  matmul_tn)
from sparse_jax.ops.nonfinite import with_dense_nonfinite_rows


def _abs_grad(t):
  # jax.grad(jnp.abs) convention (+1 at 0), so the op matches jax.grad of the dense FFN exactly.
  return jnp.where(t >= 0, 1.0, -1.0).astype(t.dtype)


def supports(x_MxD, weights, cfg: SparseFFNConfig) -> str | None:
  """The reference runs every argument that passes ``base.check_weights``, on any device."""
  del x_MxD, weights, cfg
  return None


def _stats(l0, l1, overflow_rows, dense_fallback, active_MxN) -> FFNStats:
  return make_stats(l0=l0, l1=l1, overflow_rows=overflow_rows, dense_fallback=dense_fallback,
                    active_per_neuron=jnp.sum(active_MxN, axis=0, dtype=jnp.int32))


_dense_path = ffn_with_l1  # (x, w_gate, w_up, w_down, threshold)


# --------------------------------------------------------------------------- inference: TwELL


def twell_forward(x_MxD, w_gate, w_up, w_down, cfg: SparseFFNConfig):
  """Inference forward on TwELL with exact overflow handling. Returns (y [M, D], FFNStats)."""
  m, _ = x_MxD.shape
  n = w_gate.shape[0]
  dt = x_MxD.dtype
  # the gate kernel's packed values
  p = gate_activation(matmul_nt(x_MxD, w_gate), cfg.gate_threshold).astype(dt)
  tw = twell.encode(p, tile=cfg.tile, capacity=cfg.twell_capacity)
  flagged = tw.row_overflow()
  n_flagged = jnp.sum(flagged, dtype=jnp.int32)
  budget = cfg.overflow_rows_for(m)

  def sparse():
    valid = tw.valid_mask() & ~flagged[:, None, None]
    cols = tw.global_indices()
    t = tw.values_MxTxC.astype(F32)
    if w_up is not None:
      u = matmul_nt(x_MxD, w_up)  # sampled below at the active entries only
      r = jnp.take_along_axis(u, cols.reshape(m, -1), axis=1).reshape(cols.shape)
      t = t * r
    t = jnp.where(valid, t, 0.0)
    dense_h = twell.densify(tw, t.astype(dt), keep_rows=~flagged)
    y = matmul_nn(dense_h, w_down)
    l1_sum = jnp.sum(jnp.abs(t))
    # Exact row path for the flagged rows: recomputed densely from x, never dropped.
    (rows,) = jnp.nonzero(flagged, size=budget, fill_value=m)
    x_o = jnp.take(x_MxD, rows, axis=0, mode="fill", fill_value=0)
    h_o = hidden(x_o, w_gate, w_up, threshold=cfg.gate_threshold)
    y_o = matmul_nn(h_o.astype(dt), w_down)
    y = y.at[rows].set(y_o, mode="drop")
    l1_sum = l1_sum + jnp.sum(jnp.where((rows < m)[:, None], jnp.abs(h_o), 0.0))
    return y.astype(dt), l1_sum / (m * n)

  def dense():
    return _dense_path(x_MxD, w_gate, w_up, w_down, cfg.gate_threshold)

  fallback = n_flagged > budget
  y, l1 = jax.lax.cond(fallback, dense, sparse)
  l0 = jnp.sum(tw.counts_MxT) / m
  return y, _stats(l0, l1, n_flagged, fallback, p != 0)


# --------------------------------------------------------------------------- training: Hybrid


def hybrid_forward(x_MxD, w_gate, w_up, w_down, cfg: SparseFFNConfig):
  """Training forward on the Hybrid format. Returns ((y, FFNStats), residuals)."""
  m, _ = x_MxD.shape
  n = w_gate.shape[0]
  dt = x_MxD.dtype
  p = gate_activation(matmul_nt(x_MxD, w_gate), cfg.gate_threshold).astype(dt)
  hy = hybrid.encode(p, width=min(cfg.ell_width, n), tail_capacity=cfg.tail_rows_for(m))
  if w_up is not None:
    r_ell, r_tail = hy.sample(matmul_nt(x_MxD, w_up).astype(dt))
  else:
    r_ell = r_tail = None
  overflow = hy.overflow()

  def sparse():
    t_ell, t_tail = _gated_values(hy, r_ell, r_tail)
    y = matmul_nn(hy.densify(t_ell.astype(dt), t_tail.astype(dt)), w_down)
    return y.astype(dt), (jnp.sum(jnp.abs(t_ell)) + jnp.sum(jnp.abs(t_tail))) / (m * n)

  def dense():
    return _dense_path(x_MxD, w_gate, w_up, w_down, cfg.gate_threshold)

  y, l1 = jax.lax.cond(overflow, dense, sparse)
  stats = _stats(hy.nnz() / m, l1, jnp.maximum(hy.n_tail - hy.tail_capacity, 0), overflow, p != 0)
  hy, r_ell, r_tail = named_sparse_residuals((hy, r_ell, r_tail))
  return (y, stats), (x_MxD, w_gate, w_up, w_down, hy, r_ell, r_tail)


def _gated_values(hy: hybrid.Hybrid, r_ell, r_tail):
  """T = R * P on the pattern (f32), masked: ELL slots past the count and empty tail slots are 0."""
  p_ell = jnp.where(hy.ell_mask(), hy.values_MxW.astype(F32), 0.0)
  p_tail = jnp.where(hy.tail_mask()[:, None], hy.tail_values_RxN.astype(F32), 0.0)
  if r_ell is None:
    return p_ell, p_tail
  return p_ell * r_ell.astype(F32), p_tail * r_tail.astype(F32)


def _weight_grad(tr: hybrid.EllTranspose, hy: hybrid.Hybrid, v_ell, v_tail, b_MxD, dt):
  """S^T B for a sparse S on the pattern: ELL part via the column-sorted transpose, tail rows via
  a dense matmul. Returns [N, D] f32."""
  s_t = tr.densify_t(v_ell.astype(dt), hy.n_cols)  # [N, M]
  g = matmul_nn(s_t, b_MxD)
  b_tail = jnp.take(b_MxD, hy.tail_rows_R, axis=0, mode="fill", fill_value=0)
  return g + matmul_tn(v_tail.astype(dt), b_tail)


def hybrid_backward(residuals, cotangents, threshold: float = 0.0, defer: bool = False):
  """Gradients on the Hybrid pattern; an overflowed call takes the dense backward, or with
  ``defer`` (``SparseFFNConfig.defers_overflow``) keeps the capped pattern's inexact gradients
  (the call's ``FFNStats.dense_fallback`` says so)."""
  # P > 0 is the gate's derivative for ReLU and for FATReLU (P is non-zero iff pre > threshold).
  x, w_gate, w_up, w_down, hy, r_ell, r_tail = residuals
  d_y, d_stats = cotangents
  m, _ = x.shape
  n = w_gate.shape[0]
  dt = x.dtype
  g_l1 = d_stats.l1.astype(F32)

  def sparse():
    a = matmul_nt(d_y.astype(dt), w_down)  # dOut Wd^T, sampled below at the pattern
    a_ell, a_tail = hy.sample(a)
    t_ell, t_tail = _gated_values(hy, r_ell, r_tail)
    scale = g_l1 / (m * n)
    ell_mask, tail_mask = hy.ell_mask(), hy.tail_mask()[:, None]
    dt_ell = jnp.where(ell_mask, a_ell + scale * _abs_grad(t_ell), 0.0)
    dt_tail = jnp.where(tail_mask, a_tail + scale * _abs_grad(t_tail), 0.0)
    p_ell, p_tail = _gated_values(hy, None, None)
    if w_up is not None:
      du_ell = dt_ell * r_ell.astype(F32) * (p_ell > 0)
      du_tail = dt_tail * r_tail.astype(F32) * (p_tail > 0)
      dr_ell, dr_tail = dt_ell * p_ell, dt_tail * p_tail
    else:
      du_ell, du_tail = dt_ell * (p_ell > 0), dt_tail * (p_tail > 0)
    d_x = matmul_nn(hy.densify(du_ell.astype(dt), du_tail.astype(dt)), w_gate)
    if w_up is not None:
      d_x = d_x + matmul_nn(hy.densify(dr_ell.astype(dt), dr_tail.astype(dt)), w_up)
    tr = hybrid.transpose_ell(hy)
    d_wg = _weight_grad(tr, hy, du_ell, du_tail, x, dt)
    d_wd = _weight_grad(tr, hy, t_ell, t_tail, d_y.astype(dt), dt)
    d_wu = None if w_up is None else _weight_grad(tr, hy, dr_ell, dr_tail, x, dt)
    return d_x, d_wg, d_wu, d_wd

  def dense():
    if w_up is None:
      _, vjp = jax.vjp(lambda a, b, c: _dense_path(a, b, None, c, threshold), x, w_gate, w_down)
      d_x, d_wg, d_wd = vjp((d_y, g_l1))
      return _f32((d_x, d_wg, None, d_wd))
    _, vjp = jax.vjp(lambda a, b, c, d: _dense_path(a, b, c, d, threshold), x, w_gate, w_up,
                     w_down)
    return _f32(vjp((d_y, g_l1)))

  if defer:
    d_x, d_wg, d_wu, d_wd = _f32(sparse())
  else:
    d_x, d_wg, d_wu, d_wd = jax.lax.cond(hy.overflow(), dense, lambda: _f32(sparse()))
  grads = (d_x.astype(x.dtype), d_wg.astype(w_gate.dtype))
  if w_up is not None:
    grads += (d_wu.astype(w_up.dtype),)
  return grads + (d_wd.astype(w_down.dtype),)


def _f32(tree):
  return jax.tree.map(lambda a: a.astype(F32), tree)


# --------------------------------------------------------------------------- custom_vjp ops
# The implementation's entry points (``api.IMPLEMENTATIONS["xla"]``): x [M, D], checked weights.


# Rows of x with +-Inf or NaN take the dense FFN's output (sparse_jax.ops.nonfinite: the sparse
# formats drop the inactive neurons whose 0 * Inf makes the dense row NaN).


def _dense_nonfinite_rows(x_MxD, w_gate, w_up, w_down, out):
  y, stats = out
  return with_dense_nonfinite_rows(x_MxD, w_gate, w_up, w_down, y), stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gated_ffn(x_MxD, w_gate, w_up, w_down, cfg: SparseFFNConfig):
  return _dense_nonfinite_rows(x_MxD, w_gate, w_up, w_down,
                               twell_forward(x_MxD, w_gate, w_up, w_down, cfg))


def _gated_fwd(x_MxD, w_gate, w_up, w_down, cfg):
  out, res = hybrid_forward(x_MxD, w_gate, w_up, w_down, cfg)
  return _dense_nonfinite_rows(x_MxD, w_gate, w_up, w_down, out), res


def _gated_bwd(cfg, residuals, cotangents):
  return hybrid_backward(residuals, cotangents, cfg.gate_threshold, cfg.defers_overflow)


gated_ffn.defvjp(_gated_fwd, _gated_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def relu_ffn(x_MxD, w_up, w_down, cfg: SparseFFNConfig):
  return _dense_nonfinite_rows(x_MxD, w_up, None, w_down,
                               twell_forward(x_MxD, w_up, None, w_down, cfg))


def _relu_fwd(x_MxD, w_up, w_down, cfg):
  out, res = hybrid_forward(x_MxD, w_up, None, w_down, cfg)
  return _dense_nonfinite_rows(x_MxD, w_up, None, w_down, out), res


def _relu_bwd(cfg, residuals, cotangents):
  return hybrid_backward(residuals, cotangents, cfg.gate_threshold, cfg.defers_overflow)


relu_ffn.defvjp(_relu_fwd, _relu_bwd)
