"""The TwELL kernels on a Hopper GPU (skipped elsewhere): the shared check suite through
implementation="pallas", and kernel-level checks at the paper's FFN shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from ffn_checks import PallasChecks

from pallas_kernels import common, twell_ffn, twell_gate
from sparse_jax import ops
from sparse_jax.formats import twell
from sparse_jax.synthetic import make_ffn_problem

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not common.hopper_available(), reason="needs a Hopper GPU")]


class TestPallasBackendGPU(PallasChecks):
  implementation = "pallas"
  M, D, N = 384, 256, 1024

  def call(self, x, wg, wu, wd, cfg, gated):
    if gated:
      return ops.gated_sparse_ffn(x, wg, wu, wd, implementation="pallas", config=cfg)
    return ops.sparse_ffn(x, wg, wd, implementation="pallas", config=cfg)


def _clear_rows(x, w):
  pre = jnp.dot(x, w.T, preferred_element_type=jnp.float32)
  return ~np.asarray(jnp.any(jnp.abs(pre) < 1e-4, axis=1))


@pytest.mark.parametrize("dist,capacity", [("uniform", 32), ("skewed", 32), ("skewed", 8)])
def test_gate_kernel_paper_shape(key, dist, capacity):
  p = make_ffn_problem(key, 2048, 2048, 5632, active_per_token=28, distribution=dist)
  x = p.x.at[3, 100].set(jnp.nan)
  tw = jax.jit(lambda x, w: twell_gate.gate_twell(x, w, capacity=capacity))(x, p.w_gate)
  ref = twell.encode(jnp.maximum(jnp.dot(x, p.w_gate.T, preferred_element_type=jnp.float32),
                                 0).astype(jnp.bfloat16), capacity=capacity)
  clear = _clear_rows(x, p.w_gate)
  clear[3] = True
  np.testing.assert_array_equal(tw.counts_MxT[clear], ref.counts_MxT[clear])
  assert int(tw.counts_MxT[3].min()) == 256
  ok = clear & ~np.asarray(tw.row_overflow())
  np.testing.assert_allclose(np.asarray(twell.decode(tw, on_overflow="nan")[ok], np.float32),
                             np.asarray(twell.decode(ref, on_overflow="nan")[ok], np.float32),
                             rtol=8e-3, atol=0)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dist,capacity", [("uniform", 32), ("skewed", 32), ("skewed", 8)])
def test_fused_kernel_paper_shape(key, gated, dist, capacity):
  """Every row exact; with capacity 8 many tiles overflow and are recomputed in the kernel."""
  p = make_ffn_problem(key, 2048, 2048, 5632, active_per_token=56, distribution=dist)
  x = p.x.at[11, 7].set(jnp.nan)  # a NaN token: every tile overflows, output row NaN like dense
  g = jnp.maximum(jnp.dot(x, p.w_gate.T, preferred_element_type=jnp.float32), 0).astype(jnp.bfloat16)
  g = jnp.where(jnp.isnan(jnp.dot(x, p.w_gate.T, preferred_element_type=jnp.float32)), jnp.nan, g)
  tw = twell.encode(g, capacity=capacity)
  y, l1 = jax.jit(lambda x, wg, wu, wd, tw: twell_ffn.fused_up_down(x, wg, wu, wd, tw))(
      x, p.w_gate, p.w_up if gated else None, p.w_down, tw)
  u = jnp.dot(x, p.w_up.T, preferred_element_type=jnp.float32)
  h = (g.astype(jnp.float32) * u).astype(jnp.bfloat16) if gated else g
  ref = jnp.dot(h.astype(jnp.float32), p.w_down.astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST)
  assert np.isnan(np.asarray(y[11], np.float32)).all()
  ok = np.ones(2048, bool)
  ok[11] = False
  assert rel_err(y[ok], ref[ok]) < 1e-2
  # A different dot-product order can flip the bf16 rounding of an h by an ulp (up to 2^-7
  # relative).
  np.testing.assert_allclose(l1[ok], jnp.sum(jnp.abs(h.astype(jnp.float32)), axis=1)[ok],
                             rtol=8e-3)


@pytest.mark.parametrize("dist", ["uniform", "skewed"])
def test_full_op_paper_shape_against_float32(key, dist):
  p = make_ffn_problem(key, 4096, 2048, 5632, active_per_token=28, distribution=dist)
  cfg = ops.SparseFFNConfig(max_active_fraction=None)
  y, st = jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas", config=cfg))(
      p.x, p.w_gate, p.w_up, p.w_down)
  f32 = lambda a: a.astype(jnp.float32)
  h = jnp.maximum(f32(p.x) @ f32(p.w_gate).T, 0) * (f32(p.x) @ f32(p.w_up).T)
  ref = h @ f32(p.w_down)
  assert rel_err(y, ref) < 1e-2
  assert not bool(st.dense_fallback)
