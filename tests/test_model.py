"""The decoder: shapes, causality, FFN variants, sown statistics, remat, GQA, presets."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax import ops
from sparse_jax.config import FFN_KINDS, PRESETS, REMAT_POLICIES, ModelConfig
from sparse_jax.nn import Transformer, abstract_param_count, forward_with_stats
from sparse_jax.nn.layers import apply_rope, attention_implementation

VOCAB = 259


def small_model_cfg(**kw) -> ModelConfig:
  base = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, d_ff=176,
              compute_dtype="float32")
  return ModelConfig(**{**base, **kw})


def rngs(key) -> nnx.Rngs:
  """Model initialisation from the test's fresh random key."""
  return nnx.Rngs(int(jax.random.randint(key, (), 0, 1 << 30)))


def random_tokens(key, b=2, length=24):
  return jax.random.randint(key, (b, length), 0, VOCAB)


forward = nnx.jit(forward_with_stats)


def test_shapes_and_stats(key):
  cfg = small_model_cfg(compute_dtype="bfloat16", n_layers=3)
  model = Transformer(cfg, rngs=rngs(key))
  logits, stats = forward(model, random_tokens(key, 3, 16))
  assert logits.shape == (3, 16, VOCAB) and logits.dtype == jnp.float32
  assert stats.l0.shape == stats.l1.shape == stats.overflow_rows.shape == (3,)
  assert stats.active_per_neuron.shape == (3, 176)
  # Untrained ReLU gates fire on about half the neurons; the counts agree with l0.
  assert np.all((stats.l0 > 0.2 * 176) & (stats.l0 < 0.8 * 176))
  np.testing.assert_allclose(stats.active_per_neuron.sum(axis=1) / (3 * 16), stats.l0, rtol=1e-5)
  # fp32 master weights whatever the compute dtype.
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_plain_call_keeps_module_state_clean(key):
  model = Transformer(small_model_cfg(), rngs=rngs(key))
  logits = model(random_tokens(key))
  assert logits.shape == (2, 24, VOCAB)
  assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))


@pytest.mark.parametrize("ffn", FFN_KINDS)
def test_causal(key, ffn):
  """Changing tokens from position t on leaves every logit before t unchanged."""
  model = Transformer(small_model_cfg(ffn=ffn), rngs=rngs(jax.random.fold_in(key, 1)))
  k1, k2 = jax.random.split(key)
  tokens = random_tokens(k1)
  t = 11
  changed = tokens.at[:, t:].set(random_tokens(k2)[:, t:])
  a, _ = forward(model, tokens)
  b, _ = forward(model, changed)
  # The sparse op may take its sparse or dense path depending on the whole batch, so past
  # positions can differ by fp32 rounding only; the future must really change.
  np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=2e-5)
  assert float(jnp.max(jnp.abs(a[:, t:] - b[:, t:]))) > 1e-2


def test_sparse_ffn_matches_dense_relu_baseline(key):
  """relu_sparse (through sparse_jax.ops) and relu_dense compute the same model."""
  sparse = Transformer(small_model_cfg(ffn="relu_sparse"), rngs=rngs(jax.random.fold_in(key, 2)))
  dense = Transformer(small_model_cfg(ffn="relu_dense"), rngs=rngs(jax.random.fold_in(key, 3)))
  nnx.update(dense, nnx.state(sparse, nnx.Param))
  tokens = random_tokens(key)
  (ls, ss), (ld, sd) = forward(sparse, tokens), forward(dense, tokens)
  np.testing.assert_allclose(ls, ld, rtol=0, atol=1e-4)
  np.testing.assert_allclose(ss.l1, sd.l1, rtol=1e-5)
  np.testing.assert_array_equal(ss.active_per_neuron, sd.active_per_neuron)


def _loss_and_grads(model, tokens):
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    logits, stats = forward_with_stats(nnx.merge(graphdef, p), tokens[:, :-1])
    ce = jnp.mean(jax.nn.logsumexp(logits, -1)
                  - jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0])
    return ce + 0.1 * jnp.mean(stats.l1)

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", REMAT_POLICIES)
@pytest.mark.parametrize("ell_width", [None, 176])
def test_remat_gives_same_loss_and_grads(key, policy, ell_width):
  """ell_width 176 (= d_ff): the op's sparse path (an ELL that never overflows); None: the
  default width, where the untrained model's dense gate takes the dense fallback."""
  tokens = random_tokens(key, 2, 17)
  kw = {} if ell_width is None else dict(sparse=ops.SparseFFNConfig(ell_width=ell_width))
  plain = Transformer(small_model_cfg(**kw), rngs=rngs(jax.random.fold_in(key, 4)))
  remat = Transformer(small_model_cfg(remat=True, remat_policy=policy, **kw),
                      rngs=rngs(jax.random.fold_in(key, 4)))
  (l1, g1), (l2, g2) = _loss_and_grads(plain, tokens), _loss_and_grads(remat, tokens)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  # The L1 term reaches the gate weights through the sown statistics.
  assert float(jnp.abs(g1["blocks"][0]["ffn"]["w_gate_FxD"][...]).sum()) > 0


def _kernel_calls(jaxpr) -> int:
  """Mosaic GPU kernel launches (``mpmd_map`` equations: the kernels' ``plgpu.kernel`` bodies) in
  ``jaxpr`` and every jaxpr nested in its equations' parameters."""
  def subs(v):
    if isinstance(v, (tuple, list)):
      for u in v:
        yield from subs(u)
    elif hasattr(v, "eqns"):
      yield v
    elif hasattr(getattr(v, "jaxpr", None), "eqns"):
      yield v.jaxpr
  return sum((eqn.primitive.name in ("mpmd_map", "pallas_call"))
             + sum(_kernel_calls(j) for p in eqn.params.values() for j in subs(p))
             for eqn in jaxpr.eqns)


def test_remat_keeps_the_sparse_ffn_residuals(key, monkeypatch):
  """With remat_policy="keep_sparse_ffn" the backward pass of a rematerialised block does not run
  the sparse op's forward kernels again (gate + fused: 2 per layer): the training step's program
  holds 2 x n_layers fewer kernel calls than with "recompute_all" (traced for the GPU's kernels
  on the CPU: interpret mode's callbacks cannot be rematerialised)."""
  from pallas_kernels import common
  monkeypatch.setattr(common, "hopper_available", lambda: True)  # as on the GPU
  tokens = random_tokens(key, 2, 129)
  sparse = ops.SparseFFNConfig(mode="sparse")

  def calls(policy):
    model = Transformer(small_model_cfg(remat=True, remat_policy=policy, ffn_impl="pallas",
                                        compute_dtype="bfloat16", sparse=sparse, d_model=256,
                                        d_ff=512),
                        rngs=rngs(key))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
      logits, stats = forward_with_stats(nnx.merge(graphdef, p), tokens[:, :-1])
      return jnp.mean(logits) + jnp.mean(stats.l1)

    return _kernel_calls(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)

  keep, recompute = calls("keep_sparse_ffn"), calls("recompute_all")
  print(f"kernel calls in the step: keep_sparse_ffn {keep}, recompute_all {recompute}")
  assert keep > 0 and recompute - keep == 2 * small_model_cfg().n_layers


def test_grouped_query_attention(key):
  cfg = small_model_cfg(n_heads=8, n_kv_heads=2, head_dim=16)
  model = Transformer(cfg, rngs=rngs(jax.random.fold_in(key, 5)))
  assert model.blocks[0].attn.w_k_DxKxH.shape == (64, 2, 16)
  logits, _ = forward(model, random_tokens(key))
  assert logits.shape == (2, 24, VOCAB) and bool(jnp.all(jnp.isfinite(logits)))


def test_rope_preserves_norm_and_relative_positions(key):
  q = jax.random.normal(key, (1, 6, 2, 8))
  pos = jnp.arange(6)
  rq = apply_rope(q, pos, 1e5)
  np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  # <rope(q, i), rope(k, j)> depends on i - j only.
  k = jax.random.normal(jax.random.fold_in(key, 1), (1, 1, 2, 8))
  qq = jnp.broadcast_to(q[:, :1], (1, 6, 2, 8))
  kk = jnp.broadcast_to(k, (1, 6, 2, 8))
  d1 = jnp.sum(apply_rope(qq, pos + 3, 1e5) * apply_rope(kk, pos, 1e5), -1)
  d2 = jnp.sum(apply_rope(qq, pos + 10, 1e5) * apply_rope(kk, pos + 7, 1e5), -1)
  np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-5)


def test_attention_implementation_choice():
  assert attention_implementation("auto", jnp.bfloat16) == "xla"  # tests run on the CPU
  assert attention_implementation("cudnn", jnp.float32) == "cudnn"


def test_reinit_gate_rows_touches_only_dead_rows(key):
  model = Transformer(small_model_cfg(), rngs=rngs(jax.random.fold_in(key, 6)))
  ffn = model.blocks[0].ffn
  before = np.asarray(ffn.w_gate_FxD[...])
  dead = jax.random.bernoulli(key, 0.3, (176,))
  ffn.reinit_gate_rows(dead, jax.random.fold_in(key, 9))
  after = np.asarray(ffn.w_gate_FxD[...])
  dead = np.asarray(dead)
  np.testing.assert_array_equal(after[~dead], before[~dead])
  assert np.all(np.any(after[dead] != before[dead], axis=1))


@pytest.mark.parametrize("name,low,high", [("tiny", 0.3e6, 0.7e6), ("small", 23e6, 28e6),
                                           ("base", 115e6, 135e6), ("0.5b", 0.45e9, 0.56e9),
                                           ("1b", 0.95e9, 1.1e9), ("1.5b", 1.45e9, 1.6e9),
                                           ("2b", 1.95e9, 2.15e9)])
def test_preset_sizes(name, low, high):
  cfg = PRESETS[name].model.resolve_vocab(VOCAB)
  assert low < abstract_param_count(cfg) < high


def test_paper_presets_follow_the_paper():
  for name, layers in (("0.5b", 8), ("1b", 18), ("1.5b", 28), ("2b", 38)):
    m = PRESETS[name].model
    assert (m.d_model, m.d_ff, m.n_heads, m.attn_head_dim, m.n_layers, m.vocab_size,
            m.rope_theta) == (2048, 5632, 32, 64, layers, 49152, 1e5)


def test_model_needs_resolved_vocab():
  with pytest.raises(ValueError, match="vocab_size"):
    Transformer(dataclasses.replace(small_model_cfg(), vocab_size=None), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="smaller than the tokenizer"):
    small_model_cfg(vocab_size=200).resolve_vocab(VOCAB)
  assert small_model_cfg(vocab_size=None).resolve_vocab(VOCAB).vocab_size == 384
