"""sparse_jax.synthetic: every distribution hits its mean active count on the inputs it returns,
and has the structure it promises (small shapes, CPU)."""
import jax
import numpy as np
import pytest

from sparse_jax import synthetic

M, D_MODEL, D_FF, TILE = 2048, 64, 1024, 128


def _problem(dist, active, m=M, seed=0, **kw):
  return synthetic.make_ffn_problem(jax.random.key(seed), m, D_MODEL, D_FF,
                                    active_per_token=active, distribution=dist, tile=TILE, **kw)


@pytest.mark.parametrize("dist", synthetic.DISTRIBUTIONS)
@pytest.mark.parametrize("active", [11, 56])
def test_mean_active_near_target(dist, active):
  p = _problem(dist, active, seq_len=512)
  got = p.active_per_token()
  assert abs(got - active) <= 0.1 * active + 0.5, (dist, active, got)
  # Never all-quiet or all-busy data: the op sees a real mix.
  counts = np.asarray(p.active_counts())
  assert counts.max() > active and counts.min() < active


def test_zipf_frequencies_follow_the_power_law():
  p = _problem("zipf", 28, m=4096)
  freq = np.sort(np.asarray(p.gate_active()).mean(axis=0))[::-1]
  ranks = np.arange(10, 200)  # below the clipped head, above the noisy tail
  slope = np.polyfit(np.log(ranks + 1), np.log(freq[ranks]), 1)[0]
  assert -synthetic.ZIPF_EXPONENT - 0.2 < slope < -synthetic.ZIPF_EXPONENT + 0.2, slope
  # Hot neurons in random index order, not the first columns.
  hot = np.argsort(-np.asarray(p.gate_active()).mean(axis=0))[:32]
  assert hot.max() - hot.min() > D_FF // 2


def test_clustered_hot_neurons_share_few_tiles():
  p = _problem("clustered", 28)
  per_tile = np.asarray(p.gate_active()).sum(axis=0).reshape(-1, TILE).sum(axis=1)
  top = np.sort(per_tile)[::-1]
  # CLUSTER_TILES adjacent tiles hold most activations (uniform placement: 2 / 8 = 25%).
  assert top[:synthetic.CLUSTER_TILES].sum() > 0.5 * per_tile.sum()
  hot_tiles = np.sort(np.argsort(-per_tile)[:synthetic.CLUSTER_TILES])
  assert np.all(np.diff(hot_tiles) == 1)
  # The skewed profile spread out fills no two tiles that much.
  s = _problem("skewed", 28)
  per_tile_s = np.asarray(s.gate_active()).sum(axis=0).reshape(-1, TILE).sum(axis=1)
  assert np.sort(per_tile_s)[::-1][:2].sum() < 0.4 * per_tile_s.sum()


def test_dense_starts_first_token_of_each_sequence_is_dense():
  seq = 512
  p = _problem("dense_starts", 28, seq_len=seq)
  counts = np.asarray(p.active_counts())
  starts = counts[::seq]
  assert len(starts) == M // seq
  lo, hi = synthetic.DENSE_START_FRACTION
  assert np.all(starts >= (lo - 0.05) * D_FF) and np.all(starts <= (hi + 0.05) * D_FF), starts
  rest = np.delete(counts, np.arange(0, M, seq))
  assert starts.min() > rest.max() and abs(rest.mean() - 28) < 5


def test_heavy_tail_has_a_long_tail_of_busy_tokens():
  counts = np.asarray(_problem("heavy_tail", 28).active_counts()).astype(float)
  skewed = np.asarray(_problem("skewed", 28).active_counts()).astype(float)
  tail = lambda c: np.percentile(c, 99) / max(np.median(c), 1)  # noqa: E731
  assert tail(counts) > 5 and tail(counts) > 1.5 * tail(skewed), (tail(counts), tail(skewed))


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="distribution"):
    _problem("bimodal", 28)
  with pytest.raises(ValueError, match="active_per_token"):
    _problem("uniform", 0)
  with pytest.raises(ValueError, match="clustered"):
    synthetic.firing_probabilities(np.random.default_rng(0), 256, 8, "clustered", tile=128)
  with pytest.raises(ValueError, match="too low"):
    _problem("dense_starts", 0.5, seq_len=8)


def test_gate_tie_rows_and_tie_free_cotangent(key):
  """The tie rows are exactly those with |x w_g| < tol |x| |w_g| somewhere (float64 check), and
  the tie-free cotangent zeroes those rows only; at the default tolerance few rows are ties."""
  import jax.numpy as jnp
  k1, k2 = jax.random.split(key)
  p = synthetic.make_ffn_problem(k1, 300, 64, 256, active_per_token=20, distribution="skewed")
  x, wg = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (p.x, p.w_gate))
  ratio = np.abs(x @ wg.T) / (np.abs(x) @ np.abs(wg).T)
  mins = np.sort(ratio.min(axis=1))
  gap = np.argmax(np.diff(mins[60:120])) + 60  # ~30% of rows are "ties", tol far from any row
  tol = float(0.5 * (mins[gap] + mins[gap + 1]))
  want = (ratio < tol).any(axis=1)
  got = np.asarray(synthetic.gate_tie_rows(p.x, p.w_gate, tol, chunk=128))
  assert 0 < want.sum() < len(want) and np.array_equal(got, want)
  cot = jax.random.normal(k2, p.x.shape, jnp.float32)
  free, n = synthetic.tie_free_cotangent(cot, p.x, p.w_gate, tol)
  assert n == want.sum()
  np.testing.assert_array_equal(np.asarray(free)[want], 0)
  np.testing.assert_array_equal(np.asarray(free)[~want], np.asarray(cot)[~want])
  assert int(np.sum(np.asarray(synthetic.gate_tie_rows(p.x, p.w_gate)))) < 30
