"""Calibrated gate sparsity in a whole model (sparse_jax.calibrate): the target activity is hit on
tokens the calibration never saw, the constant channel is exact, the model stays finite and its
dense and sparse FFNs agree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.calibrate import calibrate_gates, measure_activity
from sparse_jax.config import Config, ModelConfig
from sparse_jax.checkpoints import rebuild
from sparse_jax.nn import Transformer, forward_with_stats

VOCAB = 384


def tiny_cfg(**kw) -> ModelConfig:
  base = dict(vocab_size=VOCAB, d_model=128, n_layers=3, n_heads=4, d_ff=352,
              compute_dtype="bfloat16", ffn_impl="xla")
  return ModelConfig(**{**base, **kw})


def seeds(key) -> tuple[int, np.random.Generator]:
  seed = int(jax.random.randint(key, (), 0, 1 << 30))
  return seed, np.random.default_rng(seed)


forward = nnx.jit(forward_with_stats)


@pytest.mark.parametrize("profile", ["uniform", "skewed", "zipf"])
def test_hits_target_on_fresh_tokens(key, profile):
  seed, rng = seeds(key)
  model = Transformer(tiny_cfg(), rngs=nnx.Rngs(seed))
  target = 0.02  # ~7 of 352 neurons per token
  cal = calibrate_gates(model, rng.integers(0, VOCAB, (16, 128)), target_active_fraction=target,
                        profile=profile, seed=seed)
  assert cal.firing_prob_LxF.shape == (3, 352)
  np.testing.assert_allclose(cal.firing_prob_LxF.mean(axis=1), target, rtol=1e-6)
  np.testing.assert_allclose(cal.check_active_fraction_L, target, rtol=0.05)
  fresh = rng.integers(0, VOCAB, (16, 128))
  act = measure_activity(model, fresh)
  frac = act["active_fraction_L"]
  assert abs(frac.mean() / target - 1) < 0.12, frac
  assert np.all(np.abs(frac / target - 1) < 0.2), frac
  # The sparse op's own statistics (XLA reference) on the same tokens count the same activity.
  logits, stats = forward(model, jnp.asarray(fresh))
  assert bool(jnp.all(jnp.isfinite(logits)))
  np.testing.assert_allclose(np.asarray(stats.l0), act["active_per_token_L"], rtol=0.02)
  # The skewed profile keeps ~30% of the neurons dead; uniform fires nearly all of them.
  never = np.mean(np.asarray(stats.active_per_neuron) == 0, axis=1)
  if profile == "skewed":
    assert np.all(never > 0.25), never
  elif profile == "uniform":
    assert np.all(never < 0.1), never
  else:  # zipf: a few hot neurons carry a large share of the activity
    counts = np.sort(np.asarray(stats.active_per_neuron), axis=1)[:, ::-1]
    assert np.all(counts[:, :10].sum(axis=1) > 0.2 * counts.sum(axis=1))


def test_constant_channel_is_exact_and_models_agree(key):
  seed, rng = seeds(key)
  model = Transformer(tiny_cfg(), rngs=nnx.Rngs(seed))
  calibrate_gates(model, rng.integers(0, VOCAB, (8, 64)), target_active_fraction=0.05,
                  profile="skewed", seed=seed, constant=1.0)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (4, 64)))
  x = model._embed(tokens)
  for block in model.blocks:  # through the model's own blocks and sparse FFN
    x = block(x)
    np.testing.assert_array_equal(np.asarray(x[..., 0], np.float32), 1.0)
  # A dense model around the same weights computes the same function.
  cfg = Config(model=model.cfg)
  dense, _ = rebuild(model, cfg, ffn="relu_dense")
  a, b = model(tokens), dense(tokens)
  assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-2


def test_bad_arguments(key):
  model = Transformer(tiny_cfg(n_layers=1), rngs=nnx.Rngs(0))
  tokens = np.zeros((4, 16), np.int32)
  with pytest.raises(ValueError, match="profile"):
    calibrate_gates(model, tokens, target_active_fraction=0.1, profile="bimodal")
  with pytest.raises(ValueError, match="clustered"):  # d_ff 352 < three TwELL tiles
    calibrate_gates(model, tokens, target_active_fraction=0.1, profile="clustered")
  with pytest.raises(ValueError, match="target_active_fraction"):
    calibrate_gates(model, tokens, target_active_fraction=1.5)
  with pytest.raises(ValueError, match="batch >= 2"):
    calibrate_gates(model, tokens[:1], target_active_fraction=0.1)
  with pytest.raises(ValueError, match="constant"):
    calibrate_gates(model, tokens, target_active_fraction=0.1, constant=0.0)


def test_float32_model(key):
  """f32 compute (no bf16 rounding of the thresholds) hits the target as well."""
  seed, rng = seeds(key)
  model = Transformer(tiny_cfg(compute_dtype="float32", n_layers=2), rngs=nnx.Rngs(seed))
  calibrate_gates(model, rng.integers(0, VOCAB, (16, 128)), target_active_fraction=0.05,
                  profile="uniform", seed=seed)
  frac = measure_activity(model, rng.integers(0, VOCAB, (16, 128)))["active_fraction_L"]
  assert np.all(np.abs(frac / 0.05 - 1) < 0.2), frac
