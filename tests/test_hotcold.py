"""Hot/cold split of the sparse FFN (sparse_jax.ops.hotcold) and the dispatcher's probe
(sparse_jax.ops.dispatch): exactness against the unsplit op, gradients, the plan's choices."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from sparse_jax import ops
from sparse_jax.ops import dispatch, hotcold
from sparse_jax.ops.dense import ffn_with_l1
from sparse_jax.synthetic import make_ffn_problem

M, D, N = 96, 64, 512


def _problem(key, dtype=jnp.float32, dist="skewed", active=24.0, n=N):
  p = make_ffn_problem(key, M, D, n, active_per_token=active, distribution=dist, dtype=dtype)
  # The synthetic thresholds are empirical quantiles: one token per neuron sits at a pre-activation
  # of ~0, where matmuls over different row slices may round to either side of the ReLU. Moving
  # the thresholds off those tokens makes "active" a property of the problem, not of the rounding.
  return dataclasses.replace(p, w_gate=p.w_gate.at[:, 0].add(jnp.asarray(1e-2, dtype)))


def _unsplit(p, gated):
  if gated:
    return ops.gated_sparse_ffn(p.x, p.w_gate, p.w_up, p.w_down, implementation="xla")
  return ops.sparse_ffn(p.x, p.w_gate, p.w_down, implementation="xla")


@pytest.mark.parametrize("gated,n_hot", [(True, 0), (True, 256), (True, 300), (True, N - 1),
                                         (True, N), (False, 128), (False, N)])
def test_split_equals_unsplit_op(key, gated, n_hot):
  """Every split (none, one tile, an odd cold count, all neurons) computes the unsplit op's
  output and statistics over all d_ff neurons, in float32 to rounding."""
  p = _problem(key)
  y_ref, st_ref = _unsplit(p, gated)
  y, st = hotcold.hot_cold_ffn(p.x, p.w_gate, p.w_up if gated else None, p.w_down, n_hot=n_hot,
                               implementation="xla")
  assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
  assert rel_err(y, y_ref) < 2e-6
  np.testing.assert_allclose(float(st.l0), float(st_ref.l0), rtol=1e-6)
  np.testing.assert_allclose(float(st.l1), float(st_ref.l1), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(st.active_per_neuron),
                                np.asarray(st_ref.active_per_neuron))
  assert st.active_per_neuron.dtype == jnp.int32
  assert not bool(st.dense_fallback)


def test_split_bf16_against_float32_dense(key):
  p = _problem(key, jnp.bfloat16)
  y, _ = hotcold.hot_cold_ffn(p.x, p.w_gate, p.w_up, p.w_down, n_hot=128, implementation="xla")
  f32 = lambda a: a.astype(jnp.float32)
  y_ref, _ = ffn_with_l1(f32(p.x), f32(p.w_gate), f32(p.w_up), f32(p.w_down))
  assert rel_err(y, y_ref) < 1e-2


def test_split_keeps_leading_axes_and_nan_rows(key):
  p = _problem(key)
  x = p.x.at[5, 3].set(jnp.nan).reshape(4, M // 4, D)
  y, st = hotcold.hot_cold_ffn(x, p.w_gate, p.w_up, p.w_down, n_hot=128, implementation="xla")
  assert y.shape == x.shape
  y = y.reshape(M, D)
  assert bool(jnp.all(jnp.isnan(y[5]))) and bool(jnp.all(jnp.isfinite(jnp.delete(y, 5, axis=0))))
  assert int(st.active_per_neuron.min()) >= 1  # the NaN token is active everywhere, as in the op


@pytest.mark.parametrize("gated,n_hot", [(True, 0), (True, 128), (True, N), (False, 128)])
def test_split_gradients_equal_unsplit(key, gated, n_hot):
  """jax.grad through the split (hot: XLA autodiff, cold: the op's custom_vjp), L1 term included,
  equals jax.grad of the unsplit op."""
  p = _problem(key, active=16.0)
  cot = jax.random.normal(jax.random.fold_in(key, 1), p.x.shape, jnp.float32)
  wu = p.w_up if gated else None

  def loss(fn, x, wg, wu, wd):
    y, st = fn(x, wg, wu, wd)
    return jnp.sum(y * cot) + 3.0 * st.l1

  def split(x, wg, wu, wd):
    return hotcold.hot_cold_ffn(x, wg, wu, wd, n_hot=n_hot, implementation="xla")

  def unsplit(x, wg, wu, wd):
    if wu is None:
      return ops.sparse_ffn(x, wg, wd, implementation="xla")
    return ops.gated_sparse_ffn(x, wg, wu, wd, implementation="xla")

  argnums = (1, 2, 3, 4) if gated else (1, 2, 4)
  g = jax.grad(loss, argnums=argnums)(split, p.x, p.w_gate, wu, p.w_down)
  g_ref = jax.grad(loss, argnums=argnums)(unsplit, p.x, p.w_gate, wu, p.w_down)
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5


def test_split_bad_n_hot_raises(key):
  p = _problem(key)
  for bad in (-1, N + 1, 1.5, True):
    with pytest.raises(ValueError, match="n_hot"):
      hotcold.hot_cold_ffn(p.x, p.w_gate, p.w_up, p.w_down, n_hot=bad)
  with pytest.raises(ValueError, match="w_up"):
    hotcold.hot_cold_ffn(p.x, p.w_gate, p.w_up.T, p.w_down, n_hot=N)


def test_permuted_weights_compute_the_same_ffn(key):
  p = _problem(key)
  perm = np.random.default_rng(0).permutation(N)
  wg, wu, wd = hotcold.permute_neurons(perm, p.w_gate, p.w_up, p.w_down)
  y, st = hotcold.hot_cold_ffn(p.x, wg, wu, wd, n_hot=128, implementation="xla")
  y_ref, st_ref = _unsplit(p, True)
  assert rel_err(y, y_ref) < 2e-6
  np.testing.assert_array_equal(np.asarray(st.active_per_neuron),
                                np.asarray(st_ref.active_per_neuron)[perm])


# --------------------------------------------------------------------------- the plan


def test_spread_over_tiles_deals_round_robin():
  order = np.arange(10)[::-1]  # hottest first: 9, 8, ...
  laid = hotcold.spread_over_tiles(order, tile=4)  # tiles [0,4) [4,8) [8,10)
  assert sorted(laid) == list(range(10))
  # Ranks 0, 1, 2 open the three tiles; rank 3 is slot 1 of tile 0.
  assert laid[0] == 9 and laid[4] == 8 and laid[8] == 7 and laid[1] == 6
  assert list(hotcold.spread_over_tiles(np.zeros(0, np.int64), 4)) == []


def test_poisson_tail_matches_sampling():
  rng = np.random.default_rng(1)
  for lam in (2.0, 30.0, 40.0):
    got = hotcold.poisson_tail(np.array([lam]), 32)[0]
    assert abs(got - np.mean(rng.poisson(lam, 200_000) > 32)) < 5e-3


def test_plan_uniform_stays_sparse_and_skewed_takes_hot_neurons():
  d_ff, d_model = 5632, 2048
  uniform = np.full(d_ff, 28 / d_ff)
  plan = hotcold.plan_layer(uniform, d_model=d_model)
  assert plan.n_hot == 0
  assert sorted(plan.perm) == list(range(d_ff))
  # Skewed: 256 neurons at 10% of the tokens, the rest rare.
  skewed = np.full(d_ff, 2e-3)
  hot = np.random.default_rng(0).choice(d_ff, 256, replace=False)
  skewed[hot] = 0.1
  plan = hotcold.plan_layer(skewed, d_model=d_model)
  assert plan.n_hot == 256 and set(plan.perm[:256]) == set(hot)
  assert plan.predicted["total_s"] < plan.predicted["unsplit_s"]
  # Everything hot: the whole layer goes dense.
  assert hotcold.plan_layer(np.full(d_ff, 0.5), d_model=d_model).n_hot == d_ff


def test_plan_threshold_is_the_cost_crossover():
  """A group of round_to neurons turns hot exactly when its gathers cost more than its matmuls:
  freq > dense_s / gather_s per token and neuron (~1.2% with the H200 defaults)."""
  cost = hotcold.CostModel()
  crossover = (4 * 2048 / cost.dense_flops_per_s) / (2 * 2048 * 2 / cost.gather_bytes_per_s)
  assert 0.01 < crossover < 0.015
  base = np.full(1024, 1e-4)
  for f, want in ((crossover * 1.2, 128), (crossover * 0.8, 0)):
    freq = base.copy()
    freq[100:228] = f
    assert hotcold.plan_layer(freq, d_model=2048, cost=cost).n_hot == want


def test_plan_spreads_clustered_cold_neurons():
  """Warm neurons adjacent in the checkpoint (below the dense crossover, so they stay cold) pile
  into two tiles, which overflow a small capacity; after the plan's layout the cold tiles hold
  equal shares and the predicted overflow falls ~25x."""
  d_ff = 2048
  freq = np.full(d_ff, 1e-3)
  freq[256:512] = 0.006  # 1.5 per token in tile 1
  freq[512:768] = 0.004
  cost = hotcold.CostModel(capacity=4)
  plan = hotcold.plan_layer(freq, d_model=2048, cost=cost)
  assert plan.n_hot == 0
  laid = freq[plan.perm]
  per_tile = laid.reshape(-1, 256).sum(axis=1)
  assert per_tile.max() - per_tile.min() < 1e-9
  clustered = hotcold.poisson_tail(freq.reshape(-1, 256).sum(axis=1), 4).mean()
  assert plan.predicted["cold_overflow_tile_fraction"] < clustered / 10


def test_plan_is_pure_and_checks_its_input():
  freq = np.random.default_rng(3).random(700) ** 8
  a, b = hotcold.plan_layer(freq, d_model=256), hotcold.plan_layer(freq.copy(), d_model=256)
  np.testing.assert_array_equal(a.perm, b.perm)
  assert a.n_hot == b.n_hot and a.n_hot % 128 == 0
  for bad in (np.zeros((2, 3)), np.array([0.5, 1.5]), np.array([np.nan]), np.zeros(0)):
    with pytest.raises(ValueError, match="freq_F"):
      hotcold.plan_layer(bad, d_model=256)
  with pytest.raises(ValueError, match="round_to"):
    hotcold.CostModel(round_to=0)


# --------------------------------------------------------------------------- the dispatcher


def test_probe_rows_are_seeded_and_not_aligned_to_sequences():
  rows = dispatch.probe_rows(16384, 256, 7)
  np.testing.assert_array_equal(rows, dispatch.probe_rows(16384, 256, 7))
  assert len(set(rows.tolist())) == 256 and rows.min() >= 0 and rows.max() < 16384
  # Sequence starts of 2048-token sequences: 8 of 16384 tokens; a strided probe took all 8.
  assert np.sum(rows % 2048 == 0) <= 2
  assert list(dispatch.probe_rows(5, 256, 7)) == [0, 1, 2, 3, 4]


def test_probe_sees_dense_sequence_starts_at_their_share(key):
  """Dense first tokens (every 64th row here, ~50% active) weigh in with their true share, not
  with the 100% an every-64th-row probe gives them."""
  m, d, n = 2048, 64, 512
  k1, k2 = jax.random.split(key)
  x = jax.random.normal(k1, (m, d), jnp.float32).at[:, 0].set(1.0)
  w = (jax.random.normal(k2, (n, d), jnp.float32) * d ** -0.5).at[:, 0].set(-2.5)  # ~0.6% fire
  starts = np.arange(0, m, 64)
  x = x.at[starts, 0].set(0.0)  # feature 0 carries the thresholds: without them ~50% fire
  pre = jnp.dot(x, w.T)
  true = float(jnp.mean(pre > 0))
  active, overflow = dispatch.probe(x, w, dispatch.ProbeConfig(rows=512))
  strided = float(jnp.mean(pre[starts] > 0))
  assert strided > 5 * true
  assert abs(float(active) - true) < 0.5 * true
  assert 0.0 <= float(overflow) <= 1.0


def test_probe_counts_overflowed_tiles(key):
  m, d, n = 512, 64, 512
  p = make_ffn_problem(key, m, d, n, active_per_token=4.0, distribution="uniform")
  # Neurons [0, 64) fire on every token: tile 0 of every row holds >= 64 > capacity 32.
  wg = p.w_gate.at[:64, 0].set(1e3)
  x = p.x.at[:, 0].set(1.0)
  active, overflow = dispatch.probe(x, wg)
  np.testing.assert_allclose(float(overflow), 0.5, atol=1e-6)  # tile 0 of 2 tiles
  eff = dispatch.effective_active_fraction(active, overflow, n)
  np.testing.assert_allclose(float(eff), float(active) + 0.5, rtol=1e-6)
  assert bool(dispatch.too_dense(x, wg, 0.3)) and not bool(dispatch.too_dense(x, wg, 0.99))


# --------------------------------------------------------------------------- the Pallas backend


def test_split_with_pallas_kernels_interpret(key, pallas_interpret):
  """The cold part on the Pallas kernels (Mosaic GPU interpret mode), an odd cold count (384 of a
  768-column padded range): equal to the unsplit XLA reference."""
  from sparse_jax.ops import pallas_backend
  p = make_ffn_problem(key, 128, 256, 512, active_per_token=12.0, distribution="skewed")
  p = dataclasses.replace(p, w_gate=p.w_gate.at[:, 0].add(jnp.asarray(1e-2, jnp.bfloat16)))
  cfg = ops.SparseFFNConfig(max_active_fraction=None, decode_max_tokens=0)  # the kernels, tested
  y, st = hotcold.hot_cold_ffn(p.x, p.w_gate, p.w_up, p.w_down, n_hot=128, config=cfg,
                               cold_op=pallas_backend.gated_ffn)
  y_ref, st_ref = ops.gated_sparse_ffn(p.x, p.w_gate, p.w_up, p.w_down, implementation="xla")
  assert rel_err(y, y_ref) < 1e-2
  np.testing.assert_array_equal(np.asarray(st.active_per_neuron),
                                np.asarray(st_ref.active_per_neuron))


def test_split_with_pallas_kernels_cross_lowers(key):
  """The split with the Pallas cold part, forward and gradients, lowers for a CUDA GPU."""
  from sparse_jax.ops import pallas_backend
  p = make_ffn_problem(key, 256, 256, 768, active_per_token=12.0)
  cfg = ops.SparseFFNConfig()
  op = pallas_backend.gated_ffn

  def step(x, wg, wu, wd):
    split = lambda wd: hotcold.hot_cold_ffn(x, wg, wu, wd, n_hot=256, config=cfg, cold_op=op)
    y, st = split(wd)
    g = jax.grad(lambda wd: jnp.sum(split(wd)[0].astype(jnp.float32)))(wd)
    return y, st, g

  lowered = jax.jit(step).trace(p.x, p.w_gate, p.w_up, p.w_down).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()
