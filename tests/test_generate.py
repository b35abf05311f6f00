"""KV-cache decoding and generation: cached equals uncached, seeded sampling, top-p, end tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.config import ModelConfig
from sparse_jax.nn import Transformer, forward_with_stats
from sparse_jax.nn.generate import generate, sample_logits

VOCAB = 259


def tiny_model(key, **kw) -> Transformer:
  base = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176,
              compute_dtype="float32")
  seed = int(jax.random.randint(key, (), 0, 1 << 30))
  model = Transformer(ModelConfig(**{**base, **kw}), rngs=nnx.Rngs(seed))
  # At init each token's own (tied) embedding dominates the residual stream, so a random model
  # keeps predicting its input; larger branch outputs make it depend on the context.
  for block in model.blocks:
    block.attn.w_o_NxHxD[...] = 6 * block.attn.w_o_NxHxD[...]
    block.ffn.w_down_FxD[...] = 6 * block.ffn.w_down_FxD[...]
  return model


@nnx.jit
def full_forward(model, tokens_BxL):
  return model(tokens_BxL)


@nnx.jit
def decode(model, tokens_BxT, caches, start):
  return model.decode(tokens_BxT, caches, start)


def random_prompt(key, b=2, length=7) -> np.ndarray:
  return np.asarray(jax.random.randint(key, (b, length), 0, VOCAB))


@pytest.mark.parametrize("ffn", ["relu_sparse", "silu_dense"])
def test_decode_in_chunks_matches_the_full_forward(key, ffn):
  k_model, k_tok = jax.random.split(key)
  model = tiny_model(k_model, ffn=ffn)
  tokens = jnp.asarray(random_prompt(k_tok, 2, 12))
  full_BxLxV = full_forward(model, tokens)
  caches = model.init_cache(2, 16)  # longer than needed: the empty slots must stay masked
  pieces = []
  for start, stop in ((0, 4), (4, 8), (8, 9), (9, 10), (10, 11), (11, 12)):
    logits, caches = decode(model, tokens[:, start:stop], caches, jnp.int32(start))
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full_BxLxV, rtol=0, atol=5e-5)


def test_cached_greedy_generation_equals_uncached_argmax(key):
  k_model, k_tok = jax.random.split(key)
  model = tiny_model(k_model)
  prompt = random_prompt(k_tok)
  p, n = prompt.shape[1], 10
  got = generate(model, prompt, max_new_tokens=n)
  # Uncached: the whole sequence through the plain forward at every step. The sequence is padded
  # to its final length (one compilation); causality keeps the padding out of position t's logits.
  tokens = jnp.zeros((2, p + n), jnp.int32).at[:, :p].set(prompt)
  for t in range(p, p + n):
    tokens = tokens.at[:, t].set(jnp.argmax(full_forward(model, tokens)[:, t - 1], axis=-1))
  np.testing.assert_array_equal(got.tokens_BxN, np.asarray(tokens[:, p:]))
  assert len(set(got.tokens_BxN.ravel().tolist())) > 4, "degenerate sequence: a weak check"
  # The prefill's statistics are those of the plain forward of the prompt.
  _, stats = forward_with_stats(model, jnp.asarray(prompt))
  np.testing.assert_allclose(got.prompt_active_L, stats.l0, rtol=1e-6)
  assert got.step_active_SxL.shape == (n - 1, 2)
  assert np.all((got.step_active_SxL > 0) & (got.step_active_SxL < 176))


def test_sampling_is_reproducible_with_a_seed(key):
  k_model, k_tok = jax.random.split(key)
  model = tiny_model(k_model)
  prompt = random_prompt(k_tok)
  kw = dict(max_new_tokens=10, temperature=1.3, top_p=0.95)
  a = generate(model, prompt, seed=11, **kw)
  b = generate(model, prompt, seed=11, **kw)
  c = generate(model, prompt, seed=12, **kw)
  np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
  assert not np.array_equal(a.tokens_BxN, c.tokens_BxN)
  # A nucleus smaller than the top token's probability is greedy decoding.
  np.testing.assert_array_equal(
      generate(model, prompt, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=3).tokens_BxN,
      generate(model, prompt, max_new_tokens=10).tokens_BxN)


def test_top_p_samples_only_the_nucleus_in_proportion(key):
  logits_V = jax.random.normal(key, (12,)) * 2
  probs = np.asarray(jax.nn.softmax(logits_V))
  order = np.argsort(-probs)
  top_p = 0.7
  before = np.cumsum(probs[order]) - probs[order]
  nucleus = order[before < top_p]
  n = 20000
  keys = jax.random.split(jax.random.fold_in(key, 1), n)
  draws = jax.jit(jax.vmap(
      lambda k: sample_logits(logits_V[None], k, temperature=1.0, top_p=top_p)))(keys)
  counts = np.bincount(np.asarray(draws).ravel(), minlength=12)
  assert set(np.flatnonzero(counts)) == set(nucleus.tolist())
  expected = probs[nucleus] / probs[nucleus].sum()
  np.testing.assert_allclose(counts[nucleus] / n, expected, atol=0.02)
  # Temperature 0 is argmax whatever top_p.
  assert int(sample_logits(logits_V[None], key, temperature=0.0, top_p=0.3)[0]) == order[0]


def test_ids_past_the_tokenizer_are_never_drawn(key):
  k_model, k_tok = jax.random.split(key)
  model = tiny_model(k_model)
  prompt = random_prompt(k_tok)
  got = generate(model, prompt, max_new_tokens=10, temperature=3.0, seed=1, n_ids=17)
  assert got.tokens_BxN.max() < 17 and len(np.unique(got.tokens_BxN)) > 3
  with pytest.raises(ValueError, match="n_ids=300"):
    generate(model, prompt, max_new_tokens=2, n_ids=300)


def test_rows_stop_at_the_end_token(key):
  k_model, k_tok = jax.random.split(key)
  model = tiny_model(k_model)
  prompt = random_prompt(k_tok)
  free = generate(model, prompt, max_new_tokens=10, temperature=1.0, seed=4)
  eos = int(free.tokens_BxN[0, 3])
  stopped = generate(model, prompt, max_new_tokens=10, temperature=1.0, seed=4, eos_id=eos)
  for b in range(2):
    hits = np.flatnonzero(free.tokens_BxN[b] == eos)
    end = int(hits[0]) + 1 if hits.size else 10
    assert stopped.lengths_B[b] == end
    assert stopped.row(b) == free.row(b)[:end]
    assert np.all(stopped.tokens_BxN[b, end - 1:] == (eos if hits.size else free.tokens_BxN[b, -1]))


def test_bad_generation_arguments(key):
  model = tiny_model(key)
  prompt = random_prompt(key)
  with pytest.raises(ValueError, match="temperature"):
    generate(model, prompt, max_new_tokens=2, temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, prompt, max_new_tokens=2, temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, prompt, max_new_tokens=0)
  with pytest.raises(ValueError, match=r"in \[0, 259\)"):
    generate(model, prompt + VOCAB, max_new_tokens=2)
  with pytest.raises(ValueError, match="at least one token"):
    generate(model, prompt[:, :0], max_new_tokens=2)
