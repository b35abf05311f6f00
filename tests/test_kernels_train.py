"""Training kernels on the CPU: the backward kernel in GPU interpret mode against the per-entry
math, the whole Pallas training path against jax.grad of the dense float32 FFN (overflowed rows
included), and cross-lowering of the real GPU path."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ffn_problem_without_gate_ties, rel_err

from pallas_kernels import common, twell_backward
from sparse_jax import ops
from sparse_jax.formats import twell
from sparse_jax.ops import pallas_backend
from sparse_jax.ops.dense import dense_grads_neuron_chunked, ffn_with_l1
from sparse_jax.synthetic import make_ffn_problem


@pytest.mark.parametrize("gated,entries_per_step", [(True, 4), (False, 4), (True, 2)])
def test_backward_kernel_interpret_matches_entry_math(pallas_interpret, key, gated,
                                                      entries_per_step):
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 256, 256, 512, active_per_token=12, distribution="skewed")
  dy = jax.random.normal(k2, p.x.shape, jnp.bfloat16)
  pre = jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32)
  g = jnp.maximum(pre, 0).astype(jnp.bfloat16)
  tw = twell.encode(g, capacity=8)
  flagged = np.asarray(tw.row_overflow())
  assert flagged.any() and not flagged.all()
  u = jnp.dot(p.x, p.w_up.T, preferred_element_type=jnp.float32)
  cols = tw.global_indices().reshape(256, -1)
  r = jnp.take_along_axis(u, cols, axis=1).reshape(tw.values_MxTxC.shape)
  coeff = jnp.float32(0.013)
  dx, du, dr = twell_backward.backward_kernel(p.x, dy, p.w_gate, p.w_up if gated else None,
                                              p.w_down, tw, r if gated else None, coeff,
                                              config=twell_backward.BackwardConfig(
                                                  entries_per_step=entries_per_step))
  # Reference: dense math on the pattern.
  f32 = lambda a: a.astype(jnp.float32)
  pf = f32(g)
  t = common.round_bf16(pf * u) if gated else pf
  d_t = (f32(dy) @ f32(p.w_down).T + coeff * jnp.where(t >= 0, 1.0, -1.0)) * (pf != 0)
  d_u = jnp.where(pf > 0, d_t * (u if gated else 1.0), 0.0)
  dx_ref = d_u @ f32(p.w_gate) + ((d_t * pf) @ f32(p.w_up) if gated else 0.0)
  ok = ~flagged
  assert dx.dtype == p.x.dtype  # rounded once from f32 registers
  assert rel_err(dx[ok], dx_ref[ok]) < 4e-3
  assert float(jnp.abs(dx[flagged]).max()) == 0.0  # flagged rows belong to the dense row path
  valid = np.asarray(tw.valid_mask()) & ok[:, None, None]
  du_ref = jnp.take_along_axis(d_u, cols, axis=1).reshape(du.shape)
  np.testing.assert_allclose(np.asarray(du)[valid], np.asarray(du_ref)[valid], rtol=1e-4, atol=1e-6)
  if gated:
    dr_ref = jnp.take_along_axis(d_t * pf, cols, axis=1).reshape(dr.shape)
    np.testing.assert_allclose(np.asarray(dr)[valid], np.asarray(dr_ref)[valid], rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("gated", [True, False])
def test_dx_kernel_interpret_matches_slot_sums(pallas_interpret, key, gated):
  """dx_kernel (the neuron-major backward's token pass): dx_i = sum_j dR_ij Wu[j] + dU_ij Wg[j]
  over each row's TwELL entries with random slot values; flagged rows stay 0."""
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 256, 256, 512, active_per_token=12, distribution="skewed")
  g = jnp.maximum(jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32), 0)
  tw = twell.encode(g.astype(jnp.bfloat16), capacity=8)
  flagged = np.asarray(tw.row_overflow())
  assert flagged.any() and not flagged.all()
  k = 2 if gated else 1
  slots = jax.random.normal(k2, tw.values_MxTxC.shape + (k,), jnp.float32)
  dx = twell_backward.dx_kernel(p.w_gate, p.w_up if gated else None, tw, slots,
                                out_dtype=jnp.float32)
  ok = ~flagged
  dense = lambda v: twell.densify(tw, v, keep_rows=jnp.asarray(ok)).astype(jnp.float32)
  f32 = lambda a: a.astype(jnp.float32)
  ref = dense(slots[..., 0]) @ f32(p.w_gate)
  if gated:
    ref = ref + dense(slots[..., 1]) @ f32(p.w_up)
  assert rel_err(dx[ok], ref[ok]) < 1e-5, rel_err(dx[ok], ref[ok])
  assert float(jnp.abs(dx[flagged]).max()) == 0.0
  with pytest.raises(ValueError, match="slot gradients of shape"):
    twell_backward.dx_kernel(p.w_gate, p.w_up if gated else None, tw, slots[..., :1] if gated
                             else jnp.concatenate([slots, slots], -1), out_dtype=jnp.float32)


# The default order on every case; the others where rows overflow (test_backward_orders_agree
# compares the orders directly).
@pytest.mark.parametrize("dist,capacity,budget,order", [
    ("uniform", 32, None, "neuron_major"), ("skewed", 8, 256, "neuron_major"),
    ("skewed", 8, 1, "neuron_major"), ("skewed", 8, 256, "token_major"),
    ("skewed", 8, 256, "neuron_major_fused")])
def test_training_path_gradients_match_dense_float32(pallas_interpret, key, dist, capacity,
                                                    budget, order):
  """capacity 8 makes rows overflow: with room in the row path they are exact there; with a
  budget of 1 row the whole backward runs dense. Both must match jax.grad of the dense FFN."""
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 128, 256, 512, active_per_token=12, distribution=dist)
  cot = jax.random.normal(k2, p.x.shape, jnp.float32)
  cfg = ops.SparseFFNConfig(twell_capacity=capacity, max_active_fraction=None,
                            overflow_capacity=budget, train_backward=order)

  def loss(x, wg, wu, wd):
    y, st = pallas_backend.gated_ffn(x, wg, wu, wd, cfg)
    # L1 weight 7000: ~0.1 per entry after the 1 / (M d_ff) mean, of the size of dOut . Wd[j],
    # so a wrong L1 term fails the check.
    return jnp.sum(y.astype(jnp.float32) * cot) + 7000.0 * st.l1, st

  def loss_ref(x, wg, wu, wd):
    y, l1 = ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y * cot) + 7000.0 * l1

  grads, st = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(p.x, p.w_gate, p.w_up, p.w_down)
  ref = jax.grad(loss_ref, argnums=(0, 1, 2, 3))(
      *(a.astype(jnp.float32) for a in (p.x, p.w_gate, p.w_up, p.w_down)))
  for name, g, r in zip(["dx", "dw_gate", "dw_up", "dw_down"], grads, ref):
    assert rel_err(g, r) < 1e-2, (name, rel_err(g, r))
  if capacity == 8:
    assert int(st.overflow_rows) > 0
  # The sparse path (entry lists, sparse weight gradients) ran unless the row budget was exceeded.
  assert bool(st.dense_fallback) == (budget == 1)


@pytest.mark.parametrize("order", ["neuron_major", "token_major"])
def test_relu_training_path_gradients_match_dense_float32(pallas_interpret, key, order):
  """The non-gated FFN (P = relu(x Wu^T) itself, dWu = dU^T X, dWd = P^T dOut) with rows that
  overflow their tiles (capacity 8), both backward orders against jax.grad in float32."""
  k1, k2 = jax.random.split(key)
  p = ffn_problem_without_gate_ties(k1, 128, 256, 512, active_per_token=12, distribution="skewed")
  cot = jax.random.normal(k2, p.x.shape, jnp.float32)
  cfg = ops.SparseFFNConfig(twell_capacity=8, max_active_fraction=None, overflow_capacity=256,
                            train_backward=order)

  def loss(x, wu, wd):
    y, st = pallas_backend.relu_ffn(x, wu, wd, cfg)
    # L1 weight 7000: ~0.1 per entry after the 1 / (M d_ff) mean, of the size of dOut . Wd[j],
    # so a wrong L1 term fails the check.
    return jnp.sum(y.astype(jnp.float32) * cot) + 7000.0 * st.l1, st

  def loss_ref(x, wu, wd):
    y, l1 = ffn_with_l1(x, wu, None, wd)
    return jnp.sum(y * cot) + 7000.0 * l1

  grads, st = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(p.x, p.w_gate, p.w_down)
  ref = jax.grad(loss_ref, argnums=(0, 1, 2))(
      *(a.astype(jnp.float32) for a in (p.x, p.w_gate, p.w_down)))
  assert int(st.overflow_rows) > 0 and not bool(st.dense_fallback)
  for name, g, r in zip(["dx", "dw_up", "dw_down"], grads, ref):
    assert rel_err(g, r) < 1e-2, (name, rel_err(g, r))


def test_training_dispatcher_takes_dense_branch(pallas_interpret, key):
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 128, 256, 512, active_per_token=40)
  cot = jax.random.normal(k2, p.x.shape, jnp.float32)
  cfg = ops.SparseFFNConfig(max_active_fraction=0.001)
  loss = lambda *a: jnp.sum(pallas_backend.gated_ffn(*a, cfg)[0].astype(
      jnp.float32) * cot)
  loss_ref = lambda *a: jnp.sum(ffn_with_l1(*a)[0] * cot)
  g = jax.grad(loss, argnums=(1, 3))(p.x, p.w_gate, p.w_up, p.w_down)
  r = jax.grad(loss_ref, argnums=(1, 3))(*(a.astype(jnp.float32) for a in (
      p.x, p.w_gate, p.w_up, p.w_down)))
  assert all(rel_err(a, b) < 1e-2 for a, b in zip(g, r))


@pytest.mark.parametrize("gated,order", [(True, "token_major"), (False, "token_major"),
                                         (True, "neuron_major"), (False, "neuron_major"),
                                         (True, "neuron_major_fused"),
                                         (False, "neuron_major_fused")])
def test_training_path_cross_lowers(key, gated, order):
  p = make_ffn_problem(key, 300, 512, 768, active_per_token=12)
  cfg = ops.SparseFFNConfig(train_backward=order)
  if gated:
    f = lambda *a: pallas_backend.gated_ffn(*a, cfg)
    args = (p.x, p.w_gate, p.w_up, p.w_down)
  else:
    f = lambda *a: pallas_backend.relu_ffn(*a, cfg)
    args = (p.x, p.w_gate, p.w_down)
  loss = lambda *a: jnp.sum(f(*a)[0].astype(jnp.float32)) + f(*a)[1].l1
  g = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
  assert "mosaic_gpu" in g.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("gated", [True, False])
def test_dense_branch_neuron_chunks_match_dense_float32(key, gated):
  """The backward's dense branch (d_ff chunks of at most 256 here: 3 chunks, padded) against
  jax.grad of the float32 dense FFN."""
  k1, k2 = jax.random.split(key)
  p = ffn_problem_without_gate_ties(k1, 128, 256, 600, active_per_token=40, distribution="skewed")
  dy = jax.random.normal(k2, p.x.shape, jnp.float32)
  coeff = 0.3 / (128 * 600)
  wu = p.w_up if gated else None
  g = dense_grads_neuron_chunked(p.x, dy, p.w_gate, wu, p.w_down, coeff, max_chunk=256)

  def loss_ref(x, wg, wu, wd):
    y, l1 = ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y * dy) + 0.3 * l1

  f32 = lambda a: a.astype(jnp.float32)
  argnums = (0, 1, 2, 3) if gated else (0, 1, 3)
  ref = jax.grad(loss_ref, argnums=argnums)(f32(p.x), f32(p.w_gate), f32(wu) if gated else None,
                                            f32(p.w_down))
  assert len(g) == len(ref)
  for a, b in zip(g, ref):
    assert a.shape == b.shape
    assert rel_err(a, b) < 1e-2, rel_err(a, b)


def _grads_and_stats(cfg, p, cot):
  def loss(x, wg, wu, wd):
    y, st = pallas_backend.gated_ffn(x, wg, wu, wd, cfg)
    return jnp.sum(y.astype(jnp.float32) * cot) + 0.7 * st.l1, (st, y)
  return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(p.x, p.w_gate, p.w_up, p.w_down)


@pytest.mark.parametrize("budget", [256, 1])
def test_deferred_overflow_matches_cond_or_flags_the_call(pallas_interpret, key, budget):
  """overflow_fallback="defer" (mode sparse): overflowed rows within the row budget are corrected
  with no conditional, as exactly as with "cond"; over the budget the call's gradients are
  inexact and FFNStats.dense_fallback says so (the training loop then redoes the step)."""
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 128, 256, 512, active_per_token=12, distribution="skewed")
  cot = jax.random.normal(k2, p.x.shape, jnp.float32)
  base = dict(twell_capacity=8, max_active_fraction=None, overflow_capacity=budget, mode="sparse")
  g_cond, (st_cond, y_cond) = _grads_and_stats(
      ops.SparseFFNConfig(**base, overflow_fallback="cond"), p, cot)
  g_def, (st_def, y_def) = _grads_and_stats(
      ops.SparseFFNConfig(**base, overflow_fallback="defer"), p, cot)
  assert int(st_def.overflow_rows) == int(st_cond.overflow_rows) > 1
  np.testing.assert_allclose(np.asarray(y_def, np.float32), np.asarray(y_cond, np.float32),
                             rtol=1e-6, atol=0)  # the forward is exact either way
  errs = [rel_err(a, b) for a, b in zip(g_def, g_cond)]
  if budget == 256:
    assert not bool(st_def.dense_fallback)
    assert max(errs) < 1e-5, errs
    np.testing.assert_array_equal(st_def.active_per_neuron, st_cond.active_per_neuron)
  else:
    assert bool(st_def.dense_fallback) and bool(st_cond.dense_fallback)
    assert max(errs) > 1e-2, errs  # the dense backward was needed and not taken


@pytest.mark.parametrize("order", ["token_major", "neuron_major_fused"])
def test_balanced_token_kernels_cross_lower(key, order):
  """BackwardConfig(balanced=True): the per-token backward kernel (token_major) and dx_kernel
  (neuron-major orders) take their CTAs' token ranges from ``common.token_bounds``."""
  from pallas_kernels import twell_ffn, twell_gate, twell_wgrad
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 256, 512, 768, active_per_token=12, distribution="heavy_tail")
  dy = jax.random.normal(k2, p.x.shape, jnp.bfloat16)
  cfg = twell_backward.BackwardConfig(balanced=True)

  def run(x, dy, wg, wu, wd):
    tw = twell_gate.gate_twell(x, wg, capacity=16)
    r = twell_ffn.fused_up_down(x, wg, wu, wd, tw, return_r=True,
                                config=twell_ffn.FusedConfig(balanced=True))[2]
    lists = twell_wgrad.entry_lists(tw, jnp.ones((x.shape[0],), bool), 256 * 32)
    return pallas_backend.sparse_backward(order, x, dy, wg, wu, wd, tw, r, lists,
                                          jnp.float32(0.01), jnp.bfloat16, bwd_config=cfg)

  text = jax.jit(run).trace(p.x, dy, p.w_gate, p.w_up, p.w_down).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 4


def test_deferred_overflow_training_call_holds_no_conditional(key):
  """Cross-lowered for the GPU, value and gradients (so no output is dead code): mode sparse
  with overflow_fallback="defer" has no conditional and no loop (the host never waits for the
  device inside the step); with "cond" the rare-overflow conditionals are there."""
  p = make_ffn_problem(key, 300, 512, 768, active_per_token=12)

  def lowered(fallback):
    cfg = ops.SparseFFNConfig(mode="sparse", overflow_fallback=fallback)

    def loss(*a):
      y, st = pallas_backend.gated_ffn(*a, cfg)
      return jnp.sum(y.astype(jnp.float32)) + st.l1 + jnp.sum(st.active_per_neuron)
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    return f.trace(p.x, p.w_gate, p.w_up, p.w_down).lower(
        lowering_platforms=("cuda",)).as_text()

  control = ("stablehlo.case", "stablehlo.if", "stablehlo.while")
  deferred, cond = lowered("defer"), lowered("cond")
  assert "mosaic_gpu" in deferred
  assert not any(c in deferred for c in control), [c for c in control if c in deferred]
  assert any(c in cond for c in control)


@pytest.mark.parametrize("gated", [True, False])
def test_backward_orders_agree(pallas_interpret, key, gated):
  """pallas_backend.sparse_backward in each order (SparseFFNConfig.train_backward) from the
  same forward residuals: dx and the weight gradients agree to float32 summation order (dx
  within one bf16 rounding)."""
  from pallas_kernels import twell_ffn, twell_gate, twell_wgrad
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 256, 256, 512, active_per_token=12, distribution="skewed")
  dy = jax.random.normal(k2, p.x.shape, jnp.bfloat16)
  wu = p.w_up if gated else None
  tw = twell_gate.gate_twell(p.x, p.w_gate if gated else p.w_up, capacity=8)
  assert bool(tw.row_overflow().any())  # overflowed rows: both orders leave them to the row path
  r = twell_ffn.fused_up_down(p.x, p.w_gate, p.w_up, p.w_down, tw, return_r=True)[2] if gated \
      else None
  lists = twell_wgrad.entry_lists(tw, jnp.ones((256,), bool), 256 * 64)
  wg = p.w_gate if gated else p.w_up
  run = lambda order, cfg=None, fused=None: pallas_backend.sparse_backward(
      order, p.x, dy, wg, wu, p.w_down, tw, r, lists, jnp.float32(0.05), jnp.float32,
      bwd_config=cfg, fused_config=fused)
  dx_t, dw_t = run("token_major")
  two = twell_backward.BackwardConfig(entries_per_step=2)
  # The fused pass with its own task table: small pieces (hot neurons split into partial rows).
  fine = dataclasses.replace(twell_wgrad.FUSED_PASS_FINE_CONFIG, piece=8)
  if gated:  # (non-gated, the up projection as gate: every row overflows, no entries)
    assert int(jnp.max(jnp.diff(lists.seg_start))) > 4 * fine.piece
  for order, cfg, fused in (("neuron_major", None, None), ("neuron_major_fused", None, None),
                            ("neuron_major", two, None), ("auto", None, None),
                            ("neuron_major_fused", None, fine)):
    dx_n, dw_n = run(order, cfg, fused)
    assert len(dw_t) == len(dw_n) == (3 if gated else 2)
    assert rel_err(dx_n, dx_t) < 4e-3, order
    for a, b in zip(dw_n, dw_t):
      assert rel_err(a, b) < 1e-5, (order, rel_err(a, b))
  with pytest.raises(ValueError, match="unknown train_backward"):
    run("by_column")
