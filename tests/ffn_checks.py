"""Checks every sparse-FFN backend must pass. Each backend's test module subclasses
``SparseFFNChecks`` and sets ``implementation`` (and may narrow ``dtypes``)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from sparse_jax import ops
from sparse_jax.ops.dense import ffn_with_l1
from sparse_jax.synthetic import make_ffn_problem

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
GRAD_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def dense_loss_and_grads(x, wg, wu, wd, cot, coeff, gated=True):
  """jax.grad of the dense float32 FFN with the same L1 term: the ground truth."""
  f32 = lambda a: a.astype(jnp.float32)

  def loss(x, wg, wu, wd):
    y, l1 = ffn_with_l1(x, wg, wu if gated else None, wd)
    return jnp.sum(y * cot) + coeff * l1, (y, l1)

  argnums = (0, 1, 2, 3) if gated else (0, 1, 3)
  grads, (y, l1) = jax.grad(loss, argnums=argnums, has_aux=True)(f32(x), f32(wg), f32(wu), f32(wd))
  return y, l1, grads


class SparseFFNChecks:
  implementation = "xla"
  # The XLA reference recomputes at most overflow_capacity rows, then runs dense; the Pallas
  # kernels recompute overflowed tiles in place with no budget.
  row_budget = True
  dtypes = (jnp.float32, jnp.bfloat16)
  M, D, N = 96, 64, 512

  def long_row_configs(self):
    """(config whose long rows fit their exact sparse path, config that overflows it so the
    backward must run dense). The reference trains on Hybrid: ELL width + dense tail rows."""
    return (ops.SparseFFNConfig(ell_width=16, tail_capacity=self.M),
            ops.SparseFFNConfig(ell_width=16, tail_capacity=1))

  def roomy_config(self):
    """A config under which no row overflows its sparse format (every row on the sparse path)."""
    return ops.SparseFFNConfig(twell_capacity=ops.SparseFFNConfig().tile, tail_capacity=self.M)

  def op(self, x, wg, wu, wd, gated=True, config=None):
    if gated:
      return ops.gated_sparse_ffn(x, wg, wu, wd, implementation=self.implementation, config=config)
    return ops.sparse_ffn(x, wg, wd, implementation=self.implementation, config=config)

  def problem(self, key, dtype, dist="uniform", active=12.0, m=None, n=None):
    return make_ffn_problem(key, m or self.M, self.D, n or self.N, active_per_token=active,
                            distribution=dist, dtype=dtype)

  @pytest.mark.parametrize("dist", ["uniform", "skewed"])
  @pytest.mark.parametrize("gated", [True, False])
  def test_forward_matches_dense(self, key, dist, gated):
    for dtype in self.dtypes:
      p = self.problem(key, dtype, dist)
      y, stats = self.op(p.x, p.w_gate, p.w_up, p.w_down, gated)
      y_ref, l1_ref, _ = dense_loss_and_grads(p.x, p.w_gate, p.w_up, p.w_down, 0.0, 0.0, gated)
      assert y.dtype == dtype and y.shape == p.x.shape
      assert rel_err(y, y_ref) < TOL[dtype], (dtype, rel_err(y, y_ref))
      assert rel_err(stats.l1, l1_ref) < TOL[dtype]
      pre32 = jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32)
      pre = pre32.astype(dtype)
      # Another summation order (a kernel, or XLA compiling the dot inside other fusions) may
      # flip pre-activations within f32 noise of 0; only those may differ.
      n_near = int(jnp.sum(jnp.abs(pre32) < 1e-4))
      # (+1e-5: the two means of integer counts are summed in different f32 orders)
      assert abs(float(stats.l0) - float(jnp.mean(jnp.sum(pre > 0, axis=1)))) <= (
          n_near / self.M + 1e-5)
      assert int(jnp.sum(jnp.abs(stats.active_per_neuron - jnp.sum(pre > 0, axis=0)))) <= n_near

  @pytest.mark.parametrize("dist", ["uniform", "skewed"])
  @pytest.mark.parametrize("gated", [True, False])
  def test_gradients_match_dense_float32(self, key, dist, gated):
    for dtype in self.dtypes:
      k1, k2 = jax.random.split(key)
      p = self.problem(k1, dtype, dist)
      cot = jax.random.normal(k2, p.x.shape, jnp.float32)
      coeff = 0.37

      def loss(x, wg, wu, wd):
        y, stats = self.op(x, wg, wu, wd, gated)
        return jnp.sum(y.astype(jnp.float32) * cot) + coeff * stats.l1

      argnums = (0, 1, 2, 3) if gated else (0, 1, 3)
      grads = jax.jit(jax.grad(loss, argnums=argnums))(p.x, p.w_gate, p.w_up, p.w_down)
      _, _, ref = dense_loss_and_grads(p.x, p.w_gate, p.w_up, p.w_down, cot, coeff, gated)
      for name, g, r in zip(["dx", "dw_gate", "dw_up", "dw_down"] if gated else
                            ["dx", "dw_up", "dw_down"], grads, ref):
        assert g.dtype == dtype
        assert rel_err(g, r) < GRAD_TOL[dtype], (dtype, name, rel_err(g, r))

  def test_l1_gradient_alone(self, key):
    """With a zero output cotangent the weights still get the L1 gradient."""
    dtype = self.dtypes[0]
    p = self.problem(key, dtype)
    g = jax.grad(lambda wg: self.op(p.x, wg, p.w_up, p.w_down)[1].l1)(p.w_gate)
    _, _, ref = dense_loss_and_grads(p.x, p.w_gate, p.w_up, p.w_down, 0.0, 1.0)
    assert float(jnp.abs(g).max()) > 0
    assert rel_err(g, ref[1]) < GRAD_TOL[dtype]

  def test_jit_vmap_and_leading_dims(self, key):
    dtype = self.dtypes[0]
    p = self.problem(key, dtype, m=4 * 24)
    x3 = p.x.reshape(4, 24, self.D)
    y_batched, stats = jax.jit(jax.vmap(lambda x: self.op(x, p.w_gate, p.w_up, p.w_down)))(x3)
    assert stats.l0.shape == (4,)
    y_lead, _ = self.op(x3, p.w_gate, p.w_up, p.w_down)
    y_ref, _, _ = dense_loss_and_grads(p.x, p.w_gate, p.w_up, p.w_down, 0.0, 0.0)
    assert rel_err(y_batched.reshape(-1, self.D), y_ref) < TOL[dtype]
    assert rel_err(y_lead.reshape(-1, self.D), y_ref) < TOL[dtype]
    # Gradients through vmap.
    g = jax.grad(lambda wd: jnp.sum(jax.vmap(
        lambda x: self.op(x, p.w_gate, p.w_up, wd)[0])(x3).astype(jnp.float32)))(p.w_down)
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0

  @pytest.mark.parametrize("m,n", [(37, 300), (1, 256), (130, 768)])
  def test_odd_shapes(self, key, m, n):
    dtype = self.dtypes[0]
    p = self.problem(key, dtype, m=m, n=n, active=min(12.0, n / 4))
    y, _ = self.op(p.x, p.w_gate, p.w_up, p.w_down)
    y_ref, _, _ = dense_loss_and_grads(p.x, p.w_gate, p.w_up, p.w_down, 0.0, 0.0)
    assert y.shape == (m, self.D)
    assert rel_err(y, y_ref) < TOL[dtype]

  def test_twell_overflow_rows_are_exact_and_counted(self, key):
    dtype = self.dtypes[0]
    p = self.problem(key, dtype, dist="skewed", active=40.0)
    cfg = ops.SparseFFNConfig(twell_capacity=8, overflow_capacity=self.M)
    y, stats = self.op(p.x, p.w_gate, p.w_up, p.w_down, config=cfg)
    y_ref, l1_ref, _ = dense_loss_and_grads(p.x, p.w_gate, p.w_up, p.w_down, 0.0, 0.0)
    assert int(stats.overflow_rows) > 0 and not bool(stats.dense_fallback)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(stats.l1, l1_ref) < TOL[dtype]
    # More flagged rows than the row path holds: the whole call runs dense, still exact.
    cfg_small = ops.SparseFFNConfig(twell_capacity=8, overflow_capacity=1)
    y2, stats2 = self.op(p.x, p.w_gate, p.w_up, p.w_down, config=cfg_small)
    assert bool(stats2.dense_fallback) == self.row_budget
    assert int(stats2.overflow_rows) == int(stats.overflow_rows)
    assert rel_err(y2, y_ref) < TOL[dtype]

  def test_hybrid_tail_overflow_gradients_exact(self, key):
    dtype = jnp.float32 if jnp.float32 in self.dtypes else self.dtypes[0]
    k1, k2 = jax.random.split(key)
    p = self.problem(k1, dtype, dist="skewed", active=40.0)
    cot = jax.random.normal(k2, p.x.shape, jnp.float32)
    _, _, ref = dense_loss_and_grads(p.x, p.w_gate, p.w_up, p.w_down, cot, 0.5)
    fits, overflows = self.long_row_configs()
    for cfg, expect_fallback in [(fits, False), (overflows, True)]:
      def loss(x, wg, wu, wd):
        y, stats = self.op(x, wg, wu, wd, config=cfg)
        return jnp.sum(y.astype(jnp.float32) * cot) + 0.5 * stats.l1, stats

      grads, stats = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
          p.x, p.w_gate, p.w_up, p.w_down)
      assert bool(stats.dense_fallback) == expect_fallback
      for g, r in zip(grads, ref):
        assert rel_err(g, r) < GRAD_TOL[dtype]

  def test_nan_gate_propagates_like_dense(self, key):
    dtype = self.dtypes[0]
    p = self.problem(key, dtype)
    x = p.x.at[5, 3].set(jnp.nan)
    y, stats = self.op(x, p.w_gate, p.w_up, p.w_down)
    y_ref, _, _ = dense_loss_and_grads(x, p.w_gate, p.w_up, p.w_down, 0.0, 0.0)
    np.testing.assert_array_equal(np.isnan(np.asarray(y, np.float32)), np.isnan(np.asarray(y_ref)))
    assert np.isnan(np.asarray(y[5], np.float32)).all()
    ok = np.ones(self.M, bool)
    ok[5] = False
    assert rel_err(y[ok], y_ref[ok]) < TOL[dtype]

  @pytest.mark.parametrize("gated", [True, False])
  def test_inf_and_nan_rows_match_dense(self, key, gated):
    """+-Inf and NaN inputs give what the dense float32 FFN gives (gated: an Inf feature makes
    every gate pre-activation +-Inf or NaN, so inactive neurons give 0 * Inf = NaN and the row is
    all NaN; non-gated: +-Inf or NaN per output), in the inference forward and in the training
    forward; the other rows stay exact."""
    dtype = self.dtypes[0]
    p = self.problem(key, dtype)
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 30)))
    rows = rng.choice(self.M, 5, replace=False)
    cols = rng.choice(self.D, 3, replace=False)
    # Trained gates are mostly negative: an Inf feature then makes only a few neurons active
    # (their h is +-Inf) and all the others -Inf (h = 0 * Inf = NaN in dense). Here feature
    # cols[0] opens 2 neurons on +Inf, feature cols[1] 2 neurons on -Inf.
    w_gate = np.asarray(p.w_gate, np.float32).copy()
    few = rng.choice(self.N, 4, replace=False)
    w_gate[:, cols[0]] = -np.abs(w_gate[:, cols[0]]) - 0.1
    w_gate[few[:2], cols[0]] *= -1
    w_gate[:, cols[1]] = np.abs(w_gate[:, cols[1]]) + 0.1
    w_gate[few[2:], cols[1]] *= -1
    w_gate = jnp.asarray(w_gate, dtype)
    x = (p.x.at[rows[0], cols[0]].set(jnp.inf)
         .at[rows[1], cols[1]].set(-jnp.inf)
         .at[rows[2], cols[2]].set(jnp.nan)
         .at[rows[3], cols[0]].set(jnp.inf).at[rows[3], cols[1]].set(-jnp.inf)
         .at[rows[4], cols[0]].set(jnp.inf).at[rows[4], cols[2]].set(jnp.nan))
    p = dataclasses.replace(p, w_gate=w_gate)
    y_ref, _, _ = dense_loss_and_grads(x, p.w_gate, p.w_up, p.w_down, 0.0, 0.0, gated=gated)
    y_ref = np.asarray(y_ref)
    if gated:  # h = relu(g) * u: an inactive neuron's 0 * Inf makes the whole row NaN
      assert np.isnan(y_ref[rows]).all()
    ok = np.ones(self.M, bool)
    ok[rows] = False
    cfg = self.roomy_config()
    y_infer, _ = self.op(x, p.w_gate, p.w_up, p.w_down, gated=gated, config=cfg)
    y_train, _ = jax.vjp(
        lambda x: self.op(x, p.w_gate, p.w_up, p.w_down, gated=gated, config=cfg)[0], x)
    for y in (y_infer, y_train):
      y = np.asarray(y, np.float32)
      np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
      np.testing.assert_array_equal(np.isinf(y), np.isinf(y_ref))
      np.testing.assert_array_equal(y[np.isinf(y_ref)], y_ref[np.isinf(y_ref)])
      assert rel_err(y[ok], y_ref[ok]) < TOL[dtype]

  def test_bad_arguments_raise_clear_errors(self, key):
    p = self.problem(key, self.dtypes[0])
    with pytest.raises(ValueError, match=r"w_gate .*looks like the \[d_model, d_ff\] layout"):
      self.op(p.x, p.w_gate.T, p.w_up, p.w_down)
    with pytest.raises(ValueError, match="w_up has d_ff"):
      self.op(p.x, p.w_gate, p.w_up[:-8], p.w_down)
    with pytest.raises(ValueError, match="w_down must be 2-D"):
      self.op(p.x, p.w_gate, p.w_up, p.w_down[None])
    with pytest.raises(TypeError, match="x must be float32"):
      self.op(p.x.astype(jnp.int32), p.w_gate, p.w_up, p.w_down)
    other = jnp.float32 if p.x.dtype == jnp.bfloat16 else jnp.bfloat16
    with pytest.raises(TypeError, match="w_up has dtype"):
      self.op(p.x, p.w_gate, p.w_up.astype(other), p.w_down)
    with pytest.raises(ValueError, match="no tokens"):
      self.op(p.x[:0], p.w_gate, p.w_up, p.w_down)
    with pytest.raises(ValueError, match="implementation"):
      ops.gated_sparse_ffn(p.x, p.w_gate, p.w_up, p.w_down, implementation="cuda")
    with pytest.raises(ValueError, match="twell_capacity"):
      ops.SparseFFNConfig(twell_capacity=0)


class PallasChecks(SparseFFNChecks):
  """The check suite for the Pallas backend (bf16 kernels). Subclasses provide ``call``."""
  dtypes = (jnp.bfloat16,)
  row_budget = False

  def call(self, x_MxD, wg, wu, wd, cfg, gated):
    raise NotImplementedError

  def long_row_configs(self):
    # The Pallas path trains on TwELL: rows with a full tile go to a dense row path of
    # overflow_capacity rows; past that the backward runs dense.
    return (ops.SparseFFNConfig(twell_capacity=8, overflow_capacity=self.M),
            ops.SparseFFNConfig(twell_capacity=8, overflow_capacity=1))

  def roomy_config(self):
    return ops.SparseFFNConfig(twell_capacity=128, overflow_capacity=self.M)

  def op(self, x, wg, wu, wd, gated=True, config=None, dispatch=False):
    cfg = config or ops.SparseFFNConfig()
    if not dispatch:  # the small test FFNs are far denser than the dispatcher's threshold, and
      # their few tokens would be the decode regime (dense by default): the kernels are tested
      cfg = dataclasses.replace(cfg, max_active_fraction=None, decode_max_tokens=0)
    return self.call(x, wg, wu, wd, cfg, gated)

  def test_jit_vmap_and_leading_dims(self, key):
    pytest.skip("Pallas kernels have no vmap rule; the op folds leading dims into M instead")
