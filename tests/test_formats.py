"""TwELL and Hybrid: exact round trips, capacity edges, overflow flags, layouts, pytrees."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_sparse

from sparse_jax.formats import hybrid, twell


@pytest.mark.parametrize("density", [0.0, 0.005, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_twell_round_trip(key, density, dtype):
  h = random_sparse(key, (37, 512), density, dtype)
  tw = twell.encode(h, tile=256, capacity=256)
  assert tw.values_MxTxC.shape == (37, 2, 256)
  assert tw.indices_MxTxC.dtype == jnp.int16 and tw.counts_MxT.dtype == jnp.int32
  np.testing.assert_array_equal(twell.decode(tw), h)
  np.testing.assert_array_equal(tw.nnz_per_row(), jnp.sum(h != 0, axis=1))
  assert int(tw.num_overflow_rows()) == 0


def test_twell_edges_zero_dense_at_capacity_and_overflow(key):
  cap, tile = 8, 64
  h = np.zeros((5, 128), np.float32)
  h[1, :] = 1.0                                    # fully dense: overflows both tiles
  h[2, np.arange(0, 64, 8)] = 2.0                  # exactly at capacity in tile 0
  h[3, 64 + np.arange(9)] = 3.0                    # capacity + 1 in tile 1
  h[4, [5, 70]] = -1.0                             # sparse, both tiles
  tw = twell.encode(jnp.asarray(h), tile=tile, capacity=cap)
  np.testing.assert_array_equal(tw.counts_MxT, [[0, 0], [64, 64], [8, 0], [0, 9], [1, 1]])
  np.testing.assert_array_equal(tw.row_overflow(), [False, True, False, True, False])
  assert int(tw.num_overflow_rows()) == 2
  dec = np.asarray(twell.decode(tw, on_overflow="nan"))
  np.testing.assert_array_equal(dec[[0, 2, 4]], h[[0, 2, 4]])
  assert np.isnan(dec[[1, 3]]).all()
  with pytest.raises(OverflowError, match="2 row"):
    twell.decode(tw)
  with pytest.raises(Exception, match="overflowed"):
    jax.jit(twell.decode)(tw).block_until_ready()


def test_twell_tile_local_indices_allow_wide_d_ff(key):
  n = 70_000  # > 65536: a uint16 global index would wrap
  h = random_sparse(key, (2, n), 0.001)
  h = h.at[0, n - 1].set(7.0)
  tw = twell.encode(h, tile=256, capacity=16)
  assert tw.n_cols == n and tw.n_tiles == -(-n // 256)
  np.testing.assert_array_equal(twell.decode(tw), h)
  assert int(tw.global_indices().max()) >= n - 1


def test_twell_keeps_nan_and_inf_active():
  h = jnp.zeros((1, 256)).at[0, 3].set(jnp.nan).at[0, 9].set(jnp.inf).at[0, 11].set(-jnp.inf)
  tw = twell.encode(h, capacity=8)
  assert int(tw.counts_MxT[0, 0]) == 3
  dec = twell.decode(tw)
  assert np.isnan(dec[0, 3]) and dec[0, 9] == jnp.inf and dec[0, 11] == -jnp.inf


def test_twell_is_a_pytree_under_jit_and_vmap(key):
  h = random_sparse(key, (4, 16, 512), 0.05)
  tw = jax.vmap(lambda a: twell.encode(a, capacity=64))(h)
  assert tw.values_MxTxC.shape == (4, 16, 2, 64)
  dense = jax.jit(jax.vmap(twell.decode))(tw)
  np.testing.assert_array_equal(dense, h)
  leaves = jax.tree_util.tree_leaves(tw)
  assert len(leaves) == 3


def test_twell_bad_arguments():
  with pytest.raises(ValueError, match="capacity"):
    twell.encode(jnp.zeros((2, 256)), capacity=0)
  with pytest.raises(ValueError, match="capacity"):
    twell.encode(jnp.zeros((2, 256)), tile=64, capacity=65)
  with pytest.raises(ValueError, match="2-D"):
    twell.encode(jnp.zeros((256,)))
  with pytest.raises(ValueError, match="on_overflow"):
    twell.decode(twell.encode(jnp.zeros((2, 256))), on_overflow="ignore")


def test_twell_capacity_for():
  assert twell.capacity_for(28, 5632) == 8
  assert twell.capacity_for(560, 5632) == 104
  assert twell.capacity_for(5632, 5632) == 256


@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_hybrid_round_trip(key, density):
  h = random_sparse(key, (50, 300), density)
  hy = hybrid.encode(h, width=32, tail_capacity=50)
  assert not bool(hy.overflow())
  np.testing.assert_array_equal(hybrid.decode(hy), h)
  assert int(hy.n_tail) == int(jnp.sum(jnp.sum(h != 0, axis=1) > 32))


def test_hybrid_long_rows_tail_and_overflow():
  h = np.zeros((6, 40), np.float32)
  h[0, :] = 1.0            # long
  h[1, :4] = 2.0           # exactly at width
  h[2, :5] = 3.0           # width + 1: long
  h[4, 7] = 4.0
  h[5, ::2] = 5.0          # long
  hy = hybrid.encode(jnp.asarray(h), width=4, tail_capacity=3)
  assert int(hy.n_tail) == 3 and not bool(hy.overflow())
  np.testing.assert_array_equal(hy.tail_rows_R, [0, 2, 5])
  np.testing.assert_array_equal(hybrid.decode(hy), h)
  assert not bool(hy.ell_mask()[0].any())
  small = hybrid.encode(jnp.asarray(h), width=4, tail_capacity=2)
  assert bool(small.overflow()) and int(small.n_tail) == 3
  with pytest.raises(OverflowError, match="1 long row"):
    hybrid.decode(small)
  dec = np.asarray(hybrid.decode(small, on_overflow="nan"))
  assert np.isnan(dec[5]).all()
  np.testing.assert_array_equal(dec[:5], h[:5])


def test_hybrid_transpose_matches_dense_transpose(key):
  h = random_sparse(key, (64, 200), 0.08)
  hy = hybrid.encode(h, width=24, tail_capacity=16)
  tr = hybrid.transpose_ell(hy)
  ell_only = jnp.where(hy.is_long()[:, None], 0.0, h)
  np.testing.assert_array_equal(tr.densify_t(hy.values_MxW, 200), ell_only.T)
  # Column pointers are a CSC: entries of column j are exactly its rows, ascending.
  col_ptr, rows = np.asarray(tr.col_ptr_P), np.asarray(tr.row_ids_E)
  for j in range(200):
    expect = np.nonzero(np.asarray(ell_only[:, j]))[0]
    np.testing.assert_array_equal(rows[col_ptr[j]:col_ptr[j + 1]], expect)
  assert int(tr.nnz) == int(jnp.sum(ell_only != 0))
  np.testing.assert_array_equal(np.asarray(tr.col_ids())[: int(tr.nnz)],
                                np.repeat(np.arange(200), np.diff(col_ptr)))


def test_hybrid_sample_and_densify(key):
  k1, k2 = jax.random.split(key)
  h = random_sparse(k1, (16, 64), 0.2)
  a = jax.random.normal(k2, (16, 64))
  hy = hybrid.encode(h, width=12, tail_capacity=16)
  assert not bool(hy.overflow())
  ell, tail = hy.sample(a)
  dense_pattern = np.asarray(hy.densify(jnp.where(hy.ell_mask(), ell, 0), tail))
  # ELL rows: a at h's nonzeros, zero elsewhere; tail rows: a's whole row.
  long = np.asarray(hy.is_long())
  expect = np.where(np.asarray(h) != 0, np.asarray(a), 0.0)
  expect[long] = np.asarray(a)[long]
  np.testing.assert_allclose(dense_pattern, expect)


def test_hybrid_bad_arguments():
  with pytest.raises(ValueError, match="width"):
    hybrid.encode(jnp.zeros((2, 8)), width=0)
  with pytest.raises(ValueError, match="tail_capacity"):
    hybrid.encode(jnp.zeros((2, 8)), width=2, tail_capacity=0)


@pytest.mark.parametrize("max_key", [7, 5632, 70000])
def test_argsort_small_keys_is_a_stable_argsort(max_key):
  """sorting.argsort_small_keys (unsigned 16- or 32-bit keys, CUB's radix sort on the GPU) equals
  a stable argsort, with many equal keys."""
  from sparse_jax.formats import sorting
  rng = np.random.default_rng(max_key)
  key = rng.integers(0, max_key + 1, size=3000).astype(np.int32)
  got_key, perm = sorting.argsort_small_keys(jnp.asarray(key), max_key)
  want = np.argsort(key, kind="stable")
  np.testing.assert_array_equal(np.asarray(perm), want)
  np.testing.assert_array_equal(np.asarray(got_key), key[want])
  assert perm.dtype == jnp.int32 and got_key.dtype == jnp.int32
  with pytest.raises(ValueError, match="1-D"):
    sorting.argsort_small_keys(jnp.zeros((2, 2), jnp.int32), 3)
