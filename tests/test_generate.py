"""KV-cache decoding and generation: cached equals uncached, seeded sampling, top-p, end tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.config import ModelConfig
from sparse_jax.nn import Transformer, forward_with_stats
from sparse_jax import ops
from sparse_jax.nn.generate import Generator, generate, sample_logits

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
  # Each row is compared up to its first near-tie of the uncached logits (top two within 1e-4):
  # there the cached program's summation order may pick the other token, and the rows diverge.
  tokens = jnp.zeros((2, p + n), jnp.int32).at[:, :p].set(prompt)
  tied = np.zeros((2, n), bool)
  for t in range(p, p + n):
    logits = full_forward(model, tokens)[:, t - 1]
    top2 = np.sort(np.asarray(logits, np.float64), axis=-1)[:, -2:]
    tied[:, t - p] = top2[:, 1] - top2[:, 0] < 1e-4
    tokens = tokens.at[:, t].set(jnp.argmax(logits, axis=-1))
  want = np.asarray(tokens[:, p:])
  for b in range(2):
    upto = int(np.argmax(tied[b])) if tied[b].any() else n
    np.testing.assert_array_equal(got.tokens_BxN[b, :upto], want[b, :upto])
  assert tied.sum() <= 2, "too many near-ties: a weak check"
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


# ----------------------------------------------------------------- ragged batches, layers, top-k


def test_ragged_prompt_rows_generate_what_they_generate_alone(key):
  k_model, k_tok = jax.random.split(key)
  model = tiny_model(k_model, ffn="relu_dense")  # the FFN kind plays no part here
  gen = Generator(model)
  rows = [random_prompt(k_tok, 1, 9)[0], random_prompt(jax.random.fold_in(k_tok, 1), 1, 3)[0]]
  batch = gen.generate(rows, max_new_tokens=8)
  np.testing.assert_array_equal(batch.prompt_lengths_B, [9, 3])
  for b, r in enumerate(rows):
    alone = gen.generate(r[None], max_new_tokens=8)
    np.testing.assert_array_equal(batch.tokens_BxN[b], alone.tokens_BxN[0])
  # Pads fire no FFN neuron: the prompt's activity is that of the real tokens alone.
  assert np.all(batch.prompt_active_L > 0)


def test_scanned_layers_equal_the_unrolled_block_steps(key):
  k_model, k_tok = jax.random.split(key)
  model = tiny_model(k_model, n_layers=3, ffn="relu_dense")
  prompts = [random_prompt(k_tok, 1, 6)[0], random_prompt(k_tok, 1, 3)[0]]
  kw = dict(max_new_tokens=7, temperature=1.3, top_k=50, top_p=0.95, seed=3)
  scanned = generate(model, prompts, scan_layers=True, **kw)
  unrolled = generate(model, prompts, scan_layers=False, **kw)
  np.testing.assert_array_equal(scanned.tokens_BxN, unrolled.tokens_BxN)
  # scanned prefill, decode over static slices of the stacked layers
  sliced = Generator(model, scan_layers=True, unroll_decode=True).generate(prompts, **kw)
  np.testing.assert_array_equal(sliced.tokens_BxN, unrolled.tokens_BxN)
  np.testing.assert_allclose(sliced.step_active_SxL, unrolled.step_active_SxL, rtol=1e-6)
  np.testing.assert_allclose(scanned.prompt_active_L, unrolled.prompt_active_L, rtol=1e-6)
  np.testing.assert_allclose(scanned.step_active_SxL, unrolled.step_active_SxL, rtol=1e-6)


def test_programs_do_not_grow_with_depth(key):
  """The scanned prefill and decode are one while loop over the layers: their program text is
  (nearly) the same size for 2 and 24 layers, where the unrolled one grows with depth."""
  prompt = random_prompt(key, 2, 5)

  def sizes(n_layers, scan):
    model = tiny_model(key, n_layers=n_layers, ffn="relu_dense")
    prefill, decode = Generator(model, scan_layers=scan).lower(prompt, max_new_tokens=4)
    return len(prefill.as_text()), len(decode.as_text()), decode.as_text()

  p2, d2, _ = sizes(2, True)
  p24, d24, text = sizes(24, True)
  assert "while" in text
  assert p24 < 1.1 * p2 and d24 < 1.1 * d2, (p2, p24, d2, d24)
  p24u, d24u, _ = sizes(24, False)
  assert p24u > 5 * p2 and d24u > 5 * d2  # the unrolled reference does grow


def _dense_generator_and_ragged_prompts(key):
  """A tiny dense model's Generator and two prompts of 5 and 2 tokens."""
  k_model, k_tok = jax.random.split(key)
  gen = Generator(tiny_model(k_model, ffn="relu_dense"))
  return gen, [random_prompt(k_tok, 1, 5)[0], random_prompt(k_tok, 1, 2)[0]]


def test_decode_step_program_is_the_loops_step(key):
  gen, prompts = _dense_generator_and_ragged_prompts(key)
  ref = gen.generate(prompts, max_new_tokens=4)
  f, args = gen.decode_step_program(prompts, max_new_tokens=4)
  nxt, _, _, stats = f(*args)
  np.testing.assert_array_equal(np.asarray(nxt), ref.tokens_BxN[:, 1])
  np.testing.assert_allclose(np.asarray(stats)[:, 0], ref.step_active_SxL[0], rtol=1e-6)
  nxt2, *_ = f(*args)  # nothing donated: callable again
  np.testing.assert_array_equal(np.asarray(nxt2), np.asarray(nxt))
  with pytest.raises(ValueError, match="step"):
    gen.decode_step_program(prompts, max_new_tokens=4, step=3)


def test_top_k_one_is_greedy(key):
  k_model, k_tok = jax.random.split(key)
  model = tiny_model(k_model, ffn="relu_dense")
  gen = Generator(model)
  prompt = random_prompt(k_tok)
  greedy = gen.generate(prompt, max_new_tokens=8)
  top1 = gen.generate(prompt, max_new_tokens=8, temperature=2.0, top_k=1, seed=9)
  np.testing.assert_array_equal(top1.tokens_BxN, greedy.tokens_BxN)
  wide = gen.generate(prompt, max_new_tokens=8, temperature=2.0, top_k=0, seed=9)
  assert not np.array_equal(wide.tokens_BxN, greedy.tokens_BxN)  # sampling does sample
  with pytest.raises(ValueError, match="top_k"):
    gen.generate(prompt, max_new_tokens=2, top_k=-1)


def test_finished_rows_emit_pad_and_the_loop_stops(key):
  gen, prompts = _dense_generator_and_ragged_prompts(key)
  free = gen.generate(prompts, max_new_tokens=10)
  eos = int(free.tokens_BxN[0, 2])
  stopped = gen.generate(prompts, max_new_tokens=10, eos_id=eos, pad_id=7)
  for b in range(2):
    hits = np.flatnonzero(free.tokens_BxN[b] == eos)
    end = int(hits[0]) + 1 if hits.size else 10
    assert stopped.finished_B[b] == bool(hits.size) and stopped.lengths_B[b] == end
    assert stopped.row(b) == free.row(b)[:end]
    assert np.all(stopped.tokens_BxN[b, end:] == 7)
  # Every row finished by the last of their end tokens: the loop ran no further step.
  if stopped.finished_B.all():
    assert len(stopped.step_active_SxL) == stopped.lengths_B.max() - 1


def test_sparse_decode_path_generates_the_dense_models_tokens(key):
  """Generation through the decode-regime FFN path (the batch's union of active neurons) gives
  the tokens of the same weights run as a dense FFN (greedy, float32)."""
  k_model, k_tok = jax.random.split(key)
  sparse = tiny_model(k_model, ffn="relu_sparse", ffn_impl="auto")
  dense = tiny_model(k_model, ffn="relu_dense")
  nnx.update(dense, nnx.state(sparse, nnx.Param))
  cfg = ops.SparseFFNConfig(decode_path="union", decode_union_capacity=64, decode_max_union_fraction=1.0)
  for block in sparse.blocks:
    block.ffn.sparse_config = cfg
  prompt = random_prompt(k_tok, 3, 4)
  got = generate(sparse, prompt, max_new_tokens=8)
  want = generate(dense, prompt, max_new_tokens=8)
  np.testing.assert_array_equal(got.tokens_BxN, want.tokens_BxN)
  np.testing.assert_allclose(got.step_active_SxL, want.step_active_SxL, rtol=1e-6)


def test_generator_decode_path_is_static_config_and_leaves_the_model_alone(key):
  """decode_path reaches the sparse FFNs through the block graphdefs the Generator compiles, and
  the model's own configs are restored; "auto" keeps them off a Hopper GPU."""
  model = tiny_model(key)
  before = [b.ffn.sparse_config for b in model.blocks]
  g = Generator(model, decode_path="kernel")
  assert g.decode_path == "kernel" and g.decode_path_for(64) == "kernel"
  assert [b.ffn.sparse_config for b in model.blocks] == before
  assert all("decode_path='kernel'" in repr(gd) for gd in g.block_graphdefs_for(1))
  assert Generator(model).decode_path is None  # CPU: "auto" keeps the model's config
  assert "decode_path='kernel'" not in repr(Generator(model).block_graphdefs_for(1))
  with pytest.raises(ValueError, match="decode_path"):
    Generator(model, decode_path="fast")


def test_auto_decode_path_by_layout_and_batch_on_hopper(key, monkeypatch):
  """On a Hopper GPU "auto" takes the decode kernels at every batch size when the layers are
  scanned, and up to UNROLLED_KERNEL_MAX_BATCH rows (then the dense FFN) when unrolled; the
  programs of each batch size compile the matching graphdefs, and the prefill the dense FFN up to
  PREFILL_DENSE_MAX_TOKENS tokens."""
  from pallas_kernels import common
  from sparse_jax.nn.generate import PREFILL_DENSE_MAX_TOKENS
  from sparse_jax.nn.generate import UNROLLED_KERNEL_MAX_BATCH as top
  monkeypatch.setattr(common, "hopper_available", lambda: True)
  model = tiny_model(key)
  before = [b.ffn.sparse_config for b in model.blocks]
  unrolled = Generator(model)
  assert not unrolled.scan_layers
  assert unrolled.decode_path_for(1) == unrolled.decode_path_for(top) == "kernel"
  assert unrolled.decode_path_for(top + 1) == unrolled.decode_path_for(256) == "dense"
  assert "decode_path='dense'" in repr(unrolled.block_graphdefs_for(top + 1)[0])
  assert "decode_path='kernel'" in repr(unrolled.block_graphdefs_for(top)[0])
  scanned = Generator(model, scan_layers=True)
  assert {scanned.decode_path_for(b) for b in (1, top + 1, 256)} == {"kernel"}
  # the prefill: the dense FFN up to PREFILL_DENSE_MAX_TOKENS tokens, either layout
  for g in (unrolled, scanned):
    cfgs = {repr(gd) for gd in g.prefill_graphdefs_for(1)}
    assert all("decode_path='dense'" in c and f"decode_max_tokens={PREFILL_DENSE_MAX_TOKENS}" in c
               for c in cfgs)
  forced = Generator(model, decode_path="model")
  assert forced.decode_path_for(1) is None
  assert forced.prefill_graphdefs_for(1) == forced.block_graphdefs_for(1)
  assert [b.ffn.sparse_config for b in model.blocks] == before


def test_hopper_auto_paths_generate_the_same_tokens(key, monkeypatch):
  """The graphdefs "auto" picks on a Hopper GPU (prefill widened to the dense decode regime,
  decode steps by batch size) generate what the model's own configuration generates (on the CPU
  the XLA backend runs both; batch 2 keeps the decode kernels out)."""
  from pallas_kernels import common
  k_model, k_tok = jax.random.split(key)
  model = tiny_model(k_model)
  prompts = random_prompt(k_tok, 2, 6)
  want = Generator(model).generate(prompts, max_new_tokens=6)
  monkeypatch.setattr(common, "hopper_available", lambda: True)
  g = Generator(model)
  assert g.decode_path_for(2) == "dense"
  got = g.generate(prompts, max_new_tokens=6)
  np.testing.assert_array_equal(got.tokens_BxN, want.tokens_BxN)
  np.testing.assert_allclose(got.prompt_active_L, want.prompt_active_L, rtol=1e-6)
