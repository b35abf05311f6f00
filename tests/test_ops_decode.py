"""The decode-regime path of the sparse FFN (sparse_jax.ops.decode): exact against the float32
dense FFN, union overflow -> dense, the op's NaN rules and statistics, dispatch, gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from sparse_jax import ops
from sparse_jax.ops import decode
from sparse_jax.ops.dense import ffn_with_l1
from sparse_jax.synthetic import make_ffn_problem

# U = d_ff: never overflows (the dispatcher's union-fraction line lifted so the path is taken).
ROOMY = ops.SparseFFNConfig(decode_path="union", decode_union_capacity=10**6, decode_max_union_fraction=1.0)


def run(p, gated, config, implementation=None):
  if gated:
    return jax.jit(lambda x, g, u, d: ops.gated_sparse_ffn(
        x, g, u, d, implementation=implementation, config=config))(p.x, p.w_gate, p.w_up, p.w_down)
  return jax.jit(lambda x, u, d: ops.sparse_ffn(
      x, u, d, implementation=implementation, config=config))(p.x, p.w_gate, p.w_down)


def dense32(p, gated):
  f32 = lambda a: a.astype(jnp.float32)
  return ffn_with_l1(f32(p.x), f32(p.w_gate), f32(p.w_up) if gated else None, f32(p.w_down))


@pytest.mark.parametrize("m,gated", [(1, True), (3, False), (8, True), (64, False), (256, True)])
def test_decode_path_matches_dense_and_the_ops_stats(key, m, gated):
  k_shape, k_p = jax.random.split(key)
  d, n = (int(v) for v in jax.random.choice(k_shape, jnp.array([32, 48, 64, 96]), (2,)))
  n = 8 * n  # d_ff 256..768
  p = make_ffn_problem(k_p, m, d, n, active_per_token=6.0, distribution="skewed",
                       dtype=jnp.float32)
  y, stats = run(p, gated, ROOMY)
  y_ref, l1_ref = dense32(p, gated)
  assert not bool(stats.dense_fallback) and int(stats.overflow_rows) == 0
  assert rel_err(y, y_ref) < 2e-6
  assert rel_err(stats.l1, l1_ref) < 2e-6
  # The op's own statistics (XLA reference, TwELL): the same counts of the same gate.
  _, ref = run(p, gated, ROOMY, implementation="xla")
  assert float(stats.l0) == float(ref.l0) > 0
  np.testing.assert_array_equal(stats.active_per_neuron, ref.active_per_neuron)
  assert rel_err(stats.l1, ref.l1) < 2e-6


@pytest.mark.parametrize("gated", [True, False])
def test_union_overflow_runs_dense_and_is_reported(key, gated):
  m = 8
  p = make_ffn_problem(key, m, 32, 256, active_per_token=6.0, dtype=jnp.float32)
  cfg = ops.SparseFFNConfig(decode_path="union", decode_union_capacity=2, decode_max_union_fraction=1.0)
  y, stats = run(p, gated, cfg)
  y_ref, l1_ref = dense32(p, gated)
  assert bool(stats.dense_fallback) and int(stats.overflow_rows) == m
  assert rel_err(y, y_ref) < 2e-6 and rel_err(stats.l1, l1_ref) < 2e-6
  _, ref = run(p, gated, cfg, implementation="xla")
  np.testing.assert_array_equal(stats.active_per_neuron, ref.active_per_neuron)


def test_nan_rules_are_the_ops(key):
  m, n = 4, 256
  p = make_ffn_problem(key, m, 32, n, active_per_token=6.0, dtype=jnp.float32)
  # A NaN token: every gate is NaN, hence active; the union overflows, dense gives a NaN row.
  x = p.x.at[2, 5].set(jnp.nan)
  cfg = ops.SparseFFNConfig(decode_path="union", decode_union_capacity=64, decode_max_union_fraction=1.0)
  y, stats = ops.gated_sparse_ffn(x, p.w_gate, p.w_up, p.w_down, config=cfg)
  assert bool(stats.dense_fallback)
  assert np.all(np.isnan(y[2])) and np.all(np.isfinite(np.delete(np.asarray(y), 2, axis=0)))
  # A NaN in the up row of a neuron no token fires is never read (the op samples Wu at the
  # active entries only): the output is the dense FFN's without the NaN, finite.
  # Feature 0 of make_ffn_problem's x is 1: a gate row of (-1, 0, ...) never fires.
  dead = 17
  w_gate = p.w_gate.at[dead].set(0.0).at[dead, 0].set(-1.0)
  p = dataclasses.replace(p, w_gate=w_gate)
  w_up = p.w_up.at[dead, 0].set(jnp.nan)
  cfg = ops.SparseFFNConfig(decode_path="union", decode_union_capacity=n, decode_max_union_fraction=1.0)
  y, stats = ops.gated_sparse_ffn(p.x, p.w_gate, w_up, p.w_down, config=cfg)
  y_ref, _ = dense32(p, True)
  assert not bool(stats.dense_fallback) and np.all(np.isfinite(y))
  assert rel_err(y, y_ref) < 2e-6


def test_dispatch_by_tokens_and_union_capacity():
  cfg = ops.SparseFFNConfig(decode_path="union", decode_density=0.005)
  assert decode.use_decode(1, 5632, cfg) and decode.use_decode(8, 5632, cfg)
  assert decode.union_capacity(1, 5632, cfg) == 128
  assert not decode.use_decode(257, 5632, cfg)  # past decode_max_tokens
  assert not decode.use_decode(256, 5632, cfg)  # the expected union is most of d_ff
  assert decode.union_fits(8, 5632, cfg) and not decode.union_fits(64, 5632, cfg)
  assert not decode.use_decode(1, 5632, ops.SparseFFNConfig(decode_max_tokens=0))
  assert decode.union_capacity(4, 256, ops.SparseFFNConfig(decode_path="union", decode_union_capacity=999)) == 256
  with pytest.raises(ValueError, match="decode_density"):
    ops.SparseFFNConfig(decode_path="union", decode_density=0.0)
  with pytest.raises(ValueError, match="decode_union_capacity"):
    ops.SparseFFNConfig(decode_path="union", decode_union_capacity=0)


def test_a_union_that_cannot_pay_runs_dense(key):
  p = make_ffn_problem(key, 4, 32, 256, active_per_token=6.0, dtype=jnp.float32)
  cfg = ops.SparseFFNConfig(decode_path="union", decode_union_capacity=128, decode_max_union_fraction=0.25)
  assert not decode.union_fits(4, 256, cfg) and not decode.use_decode(4, 256, cfg)
  y, stats = decode.gated_ffn_decode(p.x, p.w_gate, p.w_up, p.w_down, cfg)
  y_ref, l1_ref = dense32(p, True)
  assert bool(stats.dense_fallback) and int(stats.overflow_rows) == 0
  assert rel_err(y, y_ref) < 2e-6 and rel_err(stats.l1, l1_ref) < 2e-6


def test_public_op_takes_the_decode_path_only_when_asked_for_none(key):
  p = make_ffn_problem(key, 3, 32, 256, active_per_token=6.0, dtype=jnp.float32)
  tiny_union = ops.SparseFFNConfig(decode_path="union", decode_union_capacity=1, decode_max_union_fraction=1.0)
  _, auto = run(p, True, tiny_union)  # implementation=None: the decode path, which overflows U=1
  _, xla = run(p, True, tiny_union, implementation="xla")
  assert bool(auto.dense_fallback) and int(auto.overflow_rows) == 3
  assert not bool(xla.dense_fallback)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("cap", [10**6, 1])  # the sparse branch, and the overflow branch
def test_gradients_are_the_dense_ones(key, gated, cap):
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 5, 32, 256, active_per_token=6.0, dtype=jnp.float32)
  cot = jax.random.normal(k2, p.x.shape, jnp.float32)
  cfg = ops.SparseFFNConfig(decode_path="union", decode_union_capacity=cap, decode_max_union_fraction=1.0)
  fn = decode.gated_ffn_decode if gated else (
      lambda x, g, u, d, c: decode.relu_ffn_decode(x, g, d, c))

  def loss(f, x, g, u, d):
    y, l1 = f(x, g, u, d)
    return jnp.sum(y * cot) + 0.3 * l1

  sparse = lambda x, g, u, d: (lambda r: (r[0], r[1].l1))(fn(x, g, u, d, cfg))
  dense = lambda x, g, u, d: ffn_with_l1(x, g, u if gated else None, d)
  args = (p.x, p.w_gate, p.w_up, p.w_down)
  argnums = (0, 1, 2, 3) if gated else (0, 1, 3)
  got = jax.grad(lambda *a: loss(sparse, *a), argnums=argnums)(*args)
  want = jax.grad(lambda *a: loss(dense, *a), argnums=argnums)(*args)
  for g, w in zip(got, want):
    assert rel_err(g, w) < 1e-6


def test_bfloat16_decode_path_matches_dense(key):
  p = make_ffn_problem(key, 8, 64, 512, active_per_token=6.0, dtype=jnp.bfloat16)
  y, stats = run(p, True, ROOMY)
  y_ref, _ = dense32(p, True)
  assert y.dtype == jnp.bfloat16 and not bool(stats.dense_fallback)
  assert rel_err(y, y_ref) < 2e-2


@pytest.mark.parametrize("gated", [True, False])
def test_inf_and_nan_rows_match_dense(key, gated):
  """+-Inf and NaN tokens give the dense float32 FFN's rows on the union path (the same rule as
  every backend, sparse_jax.ops.nonfinite): an Inf feature that opens only a few neurons leaves
  the others at -Inf, where dense gives 0 * Inf = NaN; the union path would drop them. Checked in
  the inference call and in the training forward (vjp); the finite rows stay exact."""
  m, d, n = 8, 32, 256
  k_p, k_r = jax.random.split(key)
  p = make_ffn_problem(k_p, m, d, n, active_per_token=6.0, dtype=jnp.float32)
  rng = np.random.default_rng(int(jax.random.randint(k_r, (), 0, 2 ** 30)))
  rows = rng.choice(m, 4, replace=False)
  cols = rng.choice(np.arange(1, d), 3, replace=False)  # feature 0 of x is 1 (make_ffn_problem)
  few = rng.choice(n, 4, replace=False)
  w_gate = np.asarray(p.w_gate).copy()
  w_gate[:, cols[0]] = -np.abs(w_gate[:, cols[0]]) - 0.1  # +Inf opens only few[:2]
  w_gate[few[:2], cols[0]] *= -1
  w_gate[:, cols[1]] = np.abs(w_gate[:, cols[1]]) + 0.1   # -Inf opens only few[2:]
  w_gate[few[2:], cols[1]] *= -1
  p = dataclasses.replace(p, w_gate=jnp.asarray(w_gate))
  x = (p.x.at[rows[0], cols[0]].set(jnp.inf)
       .at[rows[1], cols[1]].set(-jnp.inf)
       .at[rows[2], cols[0]].set(jnp.inf).at[rows[2], cols[1]].set(-jnp.inf)
       .at[rows[3], cols[2]].set(jnp.nan))
  p = dataclasses.replace(p, x=x)
  y_ref = np.asarray(dense32(p, gated)[0])
  if gated:  # an inactive neuron's 0 * Inf makes the whole dense row NaN
    assert np.isnan(y_ref[rows]).all()
  ok = np.ones(m, bool)
  ok[rows] = False
  fn = (lambda x: decode.gated_ffn_decode(x, p.w_gate, p.w_up, p.w_down, ROOMY)) if gated else (
      lambda x: decode.relu_ffn_decode(x, p.w_gate, p.w_down, ROOMY))
  y_infer, stats = jax.jit(fn)(x)
  y_train, _ = jax.vjp(lambda x: fn(x)[0], x)
  # The union (U = d_ff) holds every active neuron: the rows come from the rule, not a fallback.
  assert not bool(stats.dense_fallback)
  for y in (y_infer, y_train):
    y = np.asarray(y)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(y_ref))
    np.testing.assert_array_equal(y[np.isinf(y_ref)], y_ref[np.isinf(y_ref)])
    assert rel_err(y[ok], y_ref[ok]) < 2e-6
