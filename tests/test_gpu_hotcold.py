"""The hot/cold split with the Pallas kernels on a Hopper GPU (skipped elsewhere): exact against
float32 at the paper's FFN shape on skewed, Zipf-like and clustered activity, gradients, and the
model path of a prepared checkpoint's FFN."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from pallas_kernels import common
from sparse_jax import ops
from sparse_jax.ops import dispatch, hotcold
from sparse_jax.ops.dense import ffn_with_l1

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not common.hopper_available(), reason="needs a Hopper GPU")]

M, D, N = 2048, 2048, 5632


def _problem(profile, active, seed=0):
  from experiments.bench_hotcold import make_problem
  p = make_problem(jax.random.key(seed), profile, M, D, N, active)
  # The synthetic thresholds are empirical quantiles: one token per neuron sits at a pre-activation
  # of ~0, where the Pallas gate and an XLA matmul may round to either side of the ReLU. Moving the
  # thresholds by a few bf16 ulps makes the statistics comparable across implementations.
  return dataclasses.replace(p, w_gate=p.w_gate.at[:, 0].add(jnp.asarray(0.05, p.w_gate.dtype)))


def _f32_ref(p, rows):
  f32 = lambda a: a.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    y, _ = ffn_with_l1(f32(p.x[rows]), f32(p.w_gate), f32(p.w_up), f32(p.w_down))
  return y


@pytest.mark.parametrize("profile,active", [("skewed", 28), ("zipf", 28), ("clustered", 56),
                                            ("uniform", 28)])
def test_planned_split_is_exact_at_paper_shape(profile, active):
  p = _problem(profile, active)
  pre = jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32).astype(p.x.dtype)
  freq = np.asarray(jnp.mean(pre > 0, axis=0, dtype=jnp.float32), np.float64)
  plan = hotcold.plan_layer(freq, d_model=D, m=16384)
  wg, wu, wd = hotcold.permute_neurons(plan.perm, p.w_gate, p.w_up, p.w_down)
  cfg = ops.SparseFFNConfig(max_active_fraction=None)
  f = jax.jit(lambda *a: hotcold.hot_cold_ffn(*a, n_hot=plan.n_hot, implementation="pallas",
                                              config=cfg))
  y, st = f(p.x, wg, wu, wd)
  rows = np.arange(0, M, 4)
  assert rel_err(y[rows], _f32_ref(p, rows)) < 1e-2
  _, st_ref = ops.gated_sparse_ffn(p.x, p.w_gate, p.w_up, p.w_down, implementation="xla")
  np.testing.assert_allclose(float(st.l0), float(st_ref.l0), rtol=1e-3)
  np.testing.assert_allclose(np.asarray(st.active_per_neuron).sum(),
                             np.asarray(st_ref.active_per_neuron).sum(), rtol=1e-3)


@pytest.mark.parametrize("n_hot", [0, 256, 1000, N])
def test_split_sizes_with_pallas_equal_unsplit(n_hot):
  p = _problem("skewed", 28, seed=1)
  cfg = ops.SparseFFNConfig(max_active_fraction=None)
  y, _ = jax.jit(lambda *a: hotcold.hot_cold_ffn(*a, n_hot=n_hot, implementation="pallas",
                                                 config=cfg))(p.x, p.w_gate, p.w_up, p.w_down)
  y_ref, _ = jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas", config=cfg))(
      p.x, p.w_gate, p.w_up, p.w_down)
  assert rel_err(y, y_ref) < 1e-2
  rows = np.arange(0, M, 4)
  assert rel_err(y[rows], _f32_ref(p, rows)) < 1e-2


def test_split_gradients_with_pallas():
  """jax.grad through the split (hot: XLA, cold: the Pallas training kernels) against jax.grad of
  the float32 dense FFN, L1 term included."""
  p = _problem("zipf", 28, seed=2)
  x = p.x[:512]
  cot = jax.random.normal(jax.random.key(3), x.shape, jnp.float32)
  cfg = ops.SparseFFNConfig(max_active_fraction=None)

  def split(x, wg, wu, wd):
    y, st = hotcold.hot_cold_ffn(x, wg, wu, wd, n_hot=256, implementation="pallas", config=cfg)
    return y, st.l1

  def loss(fn, x, wg, wu, wd):
    y, l1 = fn(x, wg, wu, wd)
    return jnp.sum(y.astype(jnp.float32) * cot) + 1e3 * l1

  g = jax.jit(jax.grad(lambda *w: loss(split, x, *w), argnums=(0, 1, 2)))(
      p.w_gate, p.w_up, p.w_down)
  f32 = lambda a: a.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    g_ref = jax.grad(lambda *w: loss(ffn_with_l1, f32(x), *w), argnums=(0, 1, 2))(
        f32(p.w_gate), f32(p.w_up), f32(p.w_down))
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 3e-2


def test_probe_on_gpu_matches_cpu_definition():
  p = _problem("skewed", 28, seed=4)
  active, overflow = jax.jit(dispatch.probe)(p.x, p.w_gate)
  rows = dispatch.probe_rows(M, max(256, M // 64), dispatch.ProbeConfig().seed)
  pre = jnp.dot(p.x[rows], p.w_gate.T, preferred_element_type=jnp.float32)
  np.testing.assert_allclose(float(active), float(jnp.mean(pre > 0)), rtol=1e-2)
  assert 0.0 <= float(overflow) <= 1.0


def test_prepared_model_ffn_on_pallas_matches_xla():
  """A model whose config carries sparse_hot_neurons runs the split with the Pallas cold part (no
  dispatcher) and gives the XLA reference's logits."""
  from flax import nnx

  from sparse_jax.config import ModelConfig
  from sparse_jax.nn import Transformer
  logits = {}
  for impl in ("pallas", "xla"):
    cfg = ModelConfig(vocab_size=384, d_model=256, n_layers=2, n_heads=4, d_ff=1024,
                      ffn_impl=impl, sparse_hot_neurons=(256, 128))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 128)), jnp.int32)
    logits[impl] = nnx.jit(lambda m, t: m(t))(model, tokens)
  assert rel_err(logits["pallas"], logits["xla"]) < 2e-2
