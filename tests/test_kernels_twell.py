"""TwELL kernels on the CPU: GPU interpret mode (pipeline, TMA, wgmma, stores; outputs start as
NaN) against the XLA reference, and CPU cross-lowering of the real GPU paths (inline_mgpu)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from ffn_checks import PallasChecks

from pallas_kernels import common, twell_ffn, twell_gate
from sparse_jax import ops
from sparse_jax.formats import twell
from sparse_jax.ops import base, pallas_backend
from sparse_jax.ops.dense import ffn_with_l1
from sparse_jax.synthetic import make_ffn_problem


def _gate_ref(x, w):
  return jnp.maximum(jnp.dot(x, w.T, preferred_element_type=jnp.float32), 0).astype(jnp.bfloat16)


def _clear_rows(x, w):
  """Rows with no gate pre-activation within f32 accumulation-order noise of zero: only there is
  the active set independent of the order in which wgmma and XLA sum."""
  pre = jnp.dot(x, w.T, preferred_element_type=jnp.float32)
  return ~np.asarray(jnp.any(jnp.abs(pre) < 1e-4, axis=1))


def _entries(tw, r, t):
  n = min(int(tw.counts_MxT[r, t]), tw.capacity)
  return sorted(zip(np.asarray(tw.indices_MxTxC[r, t, :n]).tolist(),
                    np.asarray(tw.values_MxTxC[r, t, :n], np.float32).tolist()))


@pytest.mark.parametrize("dist,capacity", [("uniform", 16), ("skewed", 8)])
def test_gate_kernel_interpret_matches_encode(pallas_interpret, key, dist, capacity):
  p = make_ffn_problem(key, 256, 128, 512, active_per_token=14, distribution=dist)
  x = p.x.at[7, 5].set(jnp.nan)  # a NaN row: every gate neuron is active, never dropped
  tw = twell_gate.gate_twell(x, p.w_gate, capacity=capacity)
  ref = twell.encode(_gate_ref(x, p.w_gate), capacity=capacity)
  clear = _clear_rows(x, p.w_gate)
  clear[7] = True
  assert clear.mean() > 0.8
  np.testing.assert_array_equal(tw.counts_MxT[clear], ref.counts_MxT[clear])  # written, exact
  assert bool(tw.row_overflow()[7]) and int(tw.counts_MxT[7].min()) == 256
  flagged = np.asarray(tw.row_overflow())
  assert flagged.any() and not flagged.all(), "the test needs both kinds of rows"
  ok = ~flagged & clear
  np.testing.assert_allclose(np.asarray(twell.decode(tw, on_overflow="nan")[ok], np.float32),
                             np.asarray(twell.decode(ref, on_overflow="nan")[ok], np.float32),
                             rtol=8e-3, atol=0)
  for r in np.nonzero(flagged)[0][:4]:  # overflowed rows still hold `capacity` true entries
    for t in range(tw.n_tiles):
      got = _entries(tw, r, t)
      full = twell.encode(_gate_ref(x[r:r + 1], p.w_gate), capacity=256)
      want = dict(_entries(full, 0, t))
      for col, val in got:
        assert col in want and (np.isnan(val) or abs(val - want[col]) <= 8e-3 * abs(want[col]))


@pytest.mark.parametrize("gated", [True, False])
def test_fused_kernel_interpret_matches_reference(pallas_interpret, key, gated):
  """Every row exact, including rows whose tiles overflowed the capacity (recomputed in-kernel)."""
  p = make_ffn_problem(key, 256, 256, 512, active_per_token=12, distribution="skewed")
  g = _gate_ref(p.x, p.w_gate)
  tw = twell.encode(g, capacity=8)
  assert bool(tw.row_overflow().any())
  y, l1 = twell_ffn.fused_up_down(p.x, p.w_gate, p.w_up if gated else None, p.w_down, tw)
  u = jnp.dot(p.x, p.w_up.T, preferred_element_type=jnp.float32)
  h = (g.astype(jnp.float32) * u).astype(jnp.bfloat16) if gated else g
  ref = jnp.dot(h.astype(jnp.float32), p.w_down.astype(jnp.float32))
  assert rel_err(y, ref) < 1e-2
  np.testing.assert_allclose(l1, jnp.sum(jnp.abs(h.astype(jnp.float32)), axis=1), rtol=8e-3)
  assert not np.isnan(np.asarray(y, np.float32)).any()  # every output row was written


@pytest.mark.parametrize("capacity", [8, 32])
def test_gate_kernel_cross_lowers(key, capacity):
  x = jax.random.normal(key, (256, 256), jnp.bfloat16)
  w = jax.random.normal(key, (512, 256), jnp.bfloat16)
  f = jax.jit(lambda x, w: twell_gate.gate_twell(x, w, capacity=capacity))
  assert "mosaic_gpu" in f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("gated,balanced", [(True, False), (False, False), (True, True)])
def test_fused_kernel_cross_lowers(key, gated, balanced):
  """(balanced: the CTAs' token ranges from ``common.token_bounds``, an extra int32 input.)"""
  p = make_ffn_problem(key, 256, 512, 768, active_per_token=12)
  tw = twell.encode(_gate_ref(p.x, p.w_gate), capacity=32)
  wu = p.w_up if gated else None
  cfg = twell_ffn.FusedConfig(balanced=balanced)
  f = jax.jit(lambda x, wg, wu, wd, tw: twell_ffn.fused_up_down(x, wg, wu, wd, tw, config=cfg,
                                                                return_r=gated))
  text = f.trace(p.x, p.w_gate, wu, p.w_down, tw).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  with pytest.raises(ValueError, match="balanced needs dynamic"):
    twell_ffn.fused_up_down(p.x, p.w_gate, wu, p.w_down, tw,
                            config=twell_ffn.FusedConfig(balanced=True, dynamic=False))


@pytest.mark.parametrize("dist", ["uniform", "heavy_tail", "dense_starts"])
def test_token_bounds_balance_the_ctas(key, dist):
  """common.token_bounds: contiguous token ranges covering every token once, each CTA's work
  within one token of the mean, where equal token counts leave the busiest CTA well above it on
  heavy-tailed activity. Rows with an overflowed tile cost their recomputation in the forward
  and nothing past the fixed cost in the backward kernels (which skip them)."""
  m, n_ctas = 4096, 33
  p = make_ffn_problem(key, m, 256, 1024, active_per_token=24, distribution=dist)
  tw = twell.encode(_gate_ref(p.x, p.w_gate), capacity=8)
  counts = np.asarray(tw.counts_MxT, np.int64)
  over = counts > tw.capacity
  for skipped in (False, True):
    b = np.asarray(common.token_bounds(tw.counts_MxT, tw.capacity, n_ctas,
                                       overflowed_rows_skipped=skipped))
    assert b[0] == 0 and b[-1] == m and np.all(np.diff(b) >= 0) and len(b) == n_ctas + 1
    if skipped:
      work = np.where(over.any(1), 0, counts.sum(1))
    else:
      work = (counts + np.where(over, common.OVERFLOW_TILE_COST, 0)).sum(1)
    work = work + common.TOKEN_COST
    per_cta = np.array([work[b[c]:b[c + 1]].sum() for c in range(n_ctas)])
    assert per_cta.sum() == work.sum()
    assert per_cta.max() <= work.sum() / n_ctas + work.max(), (per_cta.max(), work.sum() / n_ctas)
    equal = np.add.reduceat(work, np.arange(0, m, -(-m // n_ctas)))
    print(f"{dist} skipped={skipped}: busiest CTA / mean, balanced "
          f"{per_cta.max() / per_cta.mean():.3f}, equal token counts "
          f"{equal.max() / equal.mean():.3f}")
    if dist == "heavy_tail":
      assert per_cta.max() / per_cta.mean() < equal.max() / equal.mean()


def test_pallas_op_with_gradients_cross_lowers(key):
  p = make_ffn_problem(key, 300, 256, 512, active_per_token=12)

  def step(x, wg, wu, wd):
    y, st = pallas_backend.gated_ffn(x, wg, wu, wd, ops.SparseFFNConfig())
    g = jax.grad(lambda wd: jnp.sum(pallas_backend.gated_ffn(
        x, wg, wu, wd, ops.SparseFFNConfig())[0].astype(jnp.float32)))(wd)
    return y, st, g

  lowered = jax.jit(step).trace(p.x, p.w_gate, p.w_up, p.w_down).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_twell_tile_128_cross_lowers(key):
  """The TwELL tile is a config value: the real GPU paths of the gate and fused kernels lower
  with 128-neuron tiles too."""
  p = make_ffn_problem(key, 256, 256, 384, active_per_token=12)
  gcfg = twell_gate.GateConfig(tile_n=128)
  f = jax.jit(lambda x, w: twell_gate.gate_twell(x, w, capacity=16, config=gcfg))
  assert "mosaic_gpu" in f.trace(p.x, p.w_gate).lower(lowering_platforms=("cuda",)).as_text()
  tw = twell.encode(_gate_ref(p.x, p.w_gate), tile=128, capacity=16)
  g = jax.jit(lambda x, wg, wu, wd, tw: twell_ffn.fused_up_down(x, wg, wu, wd, tw))
  assert "mosaic_gpu" in g.trace(p.x, p.w_gate, p.w_up, p.w_down, tw).lower(
      lowering_platforms=("cuda",)).as_text()


def test_twell_tile_is_a_config_change(pallas_interpret, key):
  """SparseFFNConfig.tile=128 alone moves every kernel of the Pallas backend to 128-neuron tiles:
  forward and gradients (overflowed rows included) match the dense float32 FFN."""
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 128, 256, 384, active_per_token=12, distribution="skewed")
  cot = jax.random.normal(k2, p.x.shape, jnp.float32)
  cfg = ops.SparseFFNConfig(tile=128, twell_capacity=8, max_active_fraction=None,
                            overflow_capacity=128, decode_max_tokens=0)  # kernels, not the
  # decode regime's dense path, for these few tokens

  def loss(x, wg, wu, wd):
    y, st = pallas_backend.gated_ffn(x, wg, wu, wd, cfg)
    return jnp.sum(y.astype(jnp.float32) * cot) + 0.5 * st.l1, st

  def loss_ref(x, wg, wu, wd):
    y, l1 = ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y * cot) + 0.5 * l1

  args = (p.x, p.w_gate, p.w_up, p.w_down)
  y, st = pallas_backend.gated_ffn(*args, cfg)
  y_ref, _ = ffn_with_l1(*(a.astype(jnp.float32) for a in args))
  assert rel_err(y, y_ref) < 1e-2 and int(st.overflow_rows) > 0
  grads, st = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)
  ref = jax.grad(loss_ref, argnums=(0, 1, 2, 3))(*(a.astype(jnp.float32) for a in args))
  assert not bool(st.dense_fallback)
  for name, g, r in zip(["dx", "dw_gate", "dw_up", "dw_down"], grads, ref):
    assert rel_err(g, r) < 1e-2, (name, rel_err(g, r))


def test_unsupported_twell_tile_raises_naming_it(key):
  x = jax.random.normal(key, (128, 256), jnp.bfloat16)
  w = jax.random.normal(key, (384, 256), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="tile_n=96"):
    twell_gate.gate_twell(x, w, capacity=8, config=twell_gate.GateConfig(tile_n=96))
  with common.interpret_mode(True), pytest.raises(NotImplementedError, match="tile_n=96"):
    ops.gated_sparse_ffn(x, w, w, w, implementation="pallas",
                         config=ops.SparseFFNConfig(tile=96, twell_capacity=8))


def test_fused_kernel_rejects_bad_shapes(key):
  p = make_ffn_problem(key, 128, 128, 256, active_per_token=4)
  tw = twell.encode(_gate_ref(p.x, p.w_gate), capacity=8)
  with pytest.raises(ValueError, match="multiple of 256"):
    twell_ffn.fused_up_down(p.x, p.w_gate, p.w_up, p.w_down, tw)
  with pytest.raises(ValueError, match="multiple of 128"):
    twell_gate.gate_twell(p.x[:100], p.w_gate, capacity=8)
  with pytest.raises(NotImplementedError, match="bf16"):
    twell_gate.gate_twell(p.x.astype(jnp.float32), p.w_gate.astype(jnp.float32), capacity=8)


@pytest.mark.usefixtures("pallas_interpret")
class TestPallasBackendInterpret(PallasChecks):
  """The whole check suite through the Pallas backend, kernels in interpret mode."""
  implementation = "pallas-interpret"
  M, D, N = 96, 256, 512

  def call(self, x, wg, wu, wd, cfg, gated):
    base.check_weights(x, [("w_gate", wg), ("w_up", wu), ("w_down", wd)])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if gated:
      y, st = pallas_backend.gated_ffn(x2, wg, wu, wd, cfg)
    else:
      y, st = pallas_backend.relu_ffn(x2, wg, wd, cfg)
    return y.reshape(*lead, y.shape[-1]), st

  def test_bad_arguments_raise_clear_errors(self, key):
    pytest.skip("argument checks live in sparse_jax.ops (tested with the XLA backend)")

  def test_dispatcher_runs_dense_when_too_dense(self, key):
    p = self.problem(key, jnp.bfloat16, active=12.0)
    y, st = self.op(p.x, p.w_gate, p.w_up, p.w_down,
                    config=ops.SparseFFNConfig(max_active_fraction=0.001), dispatch=True)
    y_ref, st_ref = ops.gated_sparse_ffn(p.x, p.w_gate, p.w_up, p.w_down, implementation="xla")
    pre32 = jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32)
    n_near = int(jnp.sum(jnp.abs(pre32) < 1e-4))  # may flip with the summation order
    assert bool(st.dense_fallback) and abs(float(st.l0) - float(st_ref.l0)) <= n_near / self.M + 1e-5
    assert rel_err(y, y_ref) < 1e-2
