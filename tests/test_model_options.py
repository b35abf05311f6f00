"""Model options that imported checkpoints need: the FATReLU gate threshold (op, dense paths,
gradients, backend choice), an untied output head (training, sharding), sliding-window attention
and scaled RoPE in incremental decoding."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx

from sparse_jax import ops
from sparse_jax.ops import decode as ops_decode, hotcold
from sparse_jax.config import ModelConfig
from sparse_jax.nn import Transformer
from sparse_jax.ops.dense import ffn_with_l1

THRESHOLD = 0.3


def _weights(key, m=48, d=32, f=160):
  kx, kg, ku, kd = jax.random.split(key, 4)
  return (jax.random.normal(kx, (m, d)), jax.random.normal(kg, (f, d)) * d ** -0.5,
          jax.random.normal(ku, (f, d)) * d ** -0.5, jax.random.normal(kd, (f, d)) * f ** -0.5)


def _fatrelu_ffn(x, wg, wu, wd):
  """Float32 definition: FATReLU(x Wg^T) * (x Wu^T) @ Wd, active iff pre > THRESHOLD."""
  pre = x @ wg.T
  return (jnp.where(pre > THRESHOLD, pre, 0.0) * (x @ wu.T)) @ wd


@pytest.mark.parametrize("gated", [True, False])
def test_threshold_op_matches_definition_forward_and_backward(key, gated):
  x, wg, wu, wd = _weights(key)
  cfg = ops.SparseFFNConfig(gate_threshold=THRESHOLD, ell_width=16)
  if gated:
    op = lambda x, wg, wu, wd: ops.gated_sparse_ffn(x, wg, wu, wd, implementation="xla",  # noqa
                                                    config=cfg)
    want = _fatrelu_ffn
    args = (x, wg, wu, wd)
  else:
    op = lambda x, wu, wd: ops.sparse_ffn(x, wu, wd, implementation="xla", config=cfg)  # noqa
    want = lambda x, wu, wd: jnp.where(x @ wu.T > THRESHOLD, x @ wu.T, 0.0) @ wd  # noqa
    args = (x, wu, wd)
  y, stats = op(*args)
  assert rel_err(y, want(*args)) < 1e-5
  pre = x @ (wg if gated else wu).T
  active = pre > THRESHOLD
  np.testing.assert_allclose(stats.l0, jnp.mean(jnp.sum(active, 1)), rtol=1e-6)
  assert jnp.sum((pre > 0) & ~active) > 0  # the threshold really silences some neurons
  # Training path (Hybrid forward, sparse backward): gradients of the definition.
  probe = jax.random.normal(jax.random.fold_in(key, 1), y.shape)
  grads = jax.grad(lambda *a: jnp.sum(op(*a)[0] * probe), argnums=tuple(range(len(args))))(*args)
  ref = jax.grad(lambda *a: jnp.sum(want(*a) * probe), argnums=tuple(range(len(args))))(*args)
  for g, r in zip(grads, ref):
    assert rel_err(g, r) < 1e-5


def test_threshold_dense_helper_and_l1():
  x, wg, wu, wd = _weights(jax.random.key(3))
  y, l1 = ffn_with_l1(x, wg, wu, wd, THRESHOLD)
  assert rel_err(y, _fatrelu_ffn(x, wg, wu, wd)) < 1e-5
  pre = x @ wg.T
  h = jnp.where(pre > THRESHOLD, pre, 0.0) * (x @ wu.T)
  np.testing.assert_allclose(l1, jnp.mean(jnp.abs(h)), rtol=1e-5)


def test_pallas_backend_refuses_a_threshold_so_auto_falls_back():
  from pallas_kernels import common
  from sparse_jax.ops import pallas_backend
  x = jnp.zeros((256, 256), jnp.bfloat16)
  w = jnp.zeros((512, 256), jnp.bfloat16)
  with common.interpret_mode(True):  # "can run here" without a GPU
    reason = pallas_backend.supports(x, (w, w, w), ops.SparseFFNConfig(gate_threshold=0.1))
    assert reason is not None and "gate_threshold" in reason
    assert pallas_backend.supports(x, (w, w, w), ops.SparseFFNConfig()) is None


@pytest.mark.parametrize("path", ["dense_mode", "decode", "hot_cold"])
@pytest.mark.parametrize("gated", [True, False])
def test_threshold_on_every_other_path(key, path, gated):
  """The static dense mode, the decode (union) path and the hot/cold split compute FATReLU
  exactly, forward, statistics and gradients."""
  x, wg, wu, wd = _weights(key, m=6)
  cfg = ops.SparseFFNConfig(gate_threshold=THRESHOLD,
                            mode="dense" if path == "dense_mode" else "auto",
                            # the union path even at this small d_ff (real models: U << d_ff)
                            decode_path="union", decode_union_capacity=wg.shape[0], decode_max_union_fraction=1.0)
  if path == "decode":
    assert ops_decode.use_decode(x.shape[0], wg.shape[0], cfg)
  if path == "hot_cold":
    run = lambda x, g, u, d: hotcold.hot_cold_ffn(x, g, u, d, n_hot=64,  # noqa: E731
                                                      implementation="xla", config=cfg)
  elif gated:
    run = lambda x, g, u, d: ops.gated_sparse_ffn(x, g, u, d, config=cfg)  # noqa: E731
  else:
    run = lambda x, g, u, d: ops.sparse_ffn(x, g, d, config=cfg)  # noqa: E731
  if gated:
    want = _fatrelu_ffn
  else:
    want = lambda x, g, u, d: jnp.where(x @ g.T > THRESHOLD, x @ g.T, 0.0) @ d  # noqa: E731
    if path == "hot_cold":
      run_gated = run
      run = lambda x, g, u, d: run_gated(x, g, None, d)  # noqa: E731
  args = (x, wg, wu, wd)
  y, stats = run(*args)
  assert rel_err(y, want(*args)) < 1e-5
  active = x @ wg.T > THRESHOLD
  np.testing.assert_array_equal(stats.active_per_neuron, jnp.sum(active, 0))
  assert jnp.sum((x @ wg.T > 0) & ~active) > 0
  if path == "decode":
    assert not bool(stats.dense_fallback)  # the union path itself, not its dense fallback
  probe = jax.random.normal(jax.random.fold_in(key, 2), y.shape)
  argnums = (0, 1, 2, 3) if gated else (0, 1, 3)
  grads = jax.grad(lambda *a: jnp.sum(run(*a)[0] * probe), argnums=argnums)(*args)
  ref = jax.grad(lambda *a: jnp.sum(want(*a) * probe), argnums=argnums)(*args)
  for g, r in zip(grads, ref):
    assert rel_err(g, r) < 1e-5


def test_model_and_op_threshold_are_one_field():
  m = ModelConfig(gate_threshold=0.2)
  assert m.sparse.gate_threshold == 0.2
  m = ModelConfig(sparse=ops.SparseFFNConfig(gate_threshold=0.2))
  assert m.gate_threshold == 0.2
  with pytest.raises(ValueError, match="model.sparse.gate_threshold"):
    ModelConfig(gate_threshold=0.1, sparse=ops.SparseFFNConfig(gate_threshold=0.2))
  with pytest.raises(ValueError, match="SparseFFNConfig.gate_threshold"):
    ops.SparseFFNConfig(gate_threshold=-1.0)


def _model(key, **changes):
  cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                    compute_dtype="float32", **changes)
  return Transformer(cfg, rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 1 << 30))))


def test_untied_head_is_its_own_parameter_trained_and_sharded(key):
  from sparse_jax.parallel.sharding import fsdp_spec
  model = _model(key, tie_embeddings=False)
  assert model.lm_head_VxD.shape == model.embed_VxD.shape
  tokens = jax.random.randint(key, (2, 12), 0, 97)

  def loss(m):
    logits = m(tokens[:, :-1])
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  grads = nnx.jit(nnx.grad(loss))(model)
  assert float(jnp.abs(grads.lm_head_VxD[...]).sum()) > 0
  # The FSDP rule is by shape: the head is split like the embedding.
  assert fsdp_spec(model.lm_head_VxD.shape, 4) == fsdp_spec(model.embed_VxD.shape, 4)
  # The head, not the embedding, makes the logits.
  tied = nnx.merge(*nnx.split(_model(key)))
  nnx.update(tied, {k: v for k, v in nnx.to_pure_dict(nnx.state(model)).items()
                    if k != "lm_head_VxD"})
  call = nnx.jit(lambda m, t: m(t))
  assert rel_err(call(model, tokens), call(tied, tokens)) > 1e-2


@pytest.mark.parametrize("changes", [
    dict(sliding_window=3),
    dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=4, rope_beta_fast=8.0,
         rope_attention_factor=1.2),
    dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=8),
])
def test_decode_matches_the_full_forward(key, changes):
  """Token-by-token decoding with the KV cache sees the same window and positions."""
  model = _model(key, **changes)
  length = 7
  tokens = jax.random.randint(key, (2, length), 0, 97)
  call = nnx.jit(lambda m, t: m(t))
  step = nnx.jit(lambda m, t, c, s: m.decode(t, c, s))
  full = call(model, tokens)
  caches = model.init_cache(2, length)
  steps = []
  for i in range(length):
    logits, caches = step(model, tokens[:, i:i + 1], caches, jnp.asarray(i))
    steps.append(logits[:, 0])
  assert rel_err(jnp.stack(steps, 1), full) < 1e-5
  if "sliding_window" in changes:  # and the window bites: the full context differs
    wide = nnx.merge(nnx.split(_model(key, **{**changes, "sliding_window": None}))[0],
                     nnx.state(model))
    assert rel_err(call(wide, tokens), full) > 1e-3


@pytest.mark.parametrize("changes", [
    dict(tie_embeddings=False),
    dict(sliding_window=3),
    dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=4, rope_beta_fast=8.0,
         rope_attention_factor=1.2),
    dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=8),
    dict(rope_scaling="linear", rope_factor=2.0),
    dict(gate_threshold=0.05),
], ids=["untied", "sliding_window", "yarn", "llama3", "linear", "gate_threshold"])
def test_generator_greedy_equals_full_forward_argmax(key, changes):
  """The Generator's own block step (scanned over the layers; test_generate checks unrolled =
  scanned), with ragged prompts, sees the same head, RoPE, window and gate as the full forward:
  its greedy tokens are the uncached argmax tokens."""
  from sparse_jax.nn.generate import Generator
  model = _model(key, **changes)
  for block in model.blocks:  # branches that matter, so positions and window change the tokens
    block.attn.w_o_NxHxD[...] = 6 * block.attn.w_o_NxHxD[...]
    block.ffn.w_down_FxD[...] = 6 * block.ffn.w_down_FxD[...]
  rows = [np.asarray(jax.random.randint(key, (6,), 0, 97)),
          np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (3,), 0, 97))]
  n = 8
  got = Generator(model, scan_layers=True).generate(rows, max_new_tokens=n)
  call = nnx.jit(lambda m, t: m(t))
  for b, prompt in enumerate(rows):
    p = len(prompt)
    tokens = jnp.zeros((1, p + n), jnp.int32).at[0, :p].set(jnp.asarray(prompt))
    for t in range(p, p + n):
      tokens = tokens.at[:, t].set(jnp.argmax(call(model, tokens)[:, t - 1], axis=-1))
    np.testing.assert_array_equal(got.tokens_BxN[b], np.asarray(tokens[0, p:]))


def test_config_validates_the_new_fields():
  with pytest.raises(ValueError, match="model.gate_threshold"):
    ModelConfig(gate_threshold=-0.1)
  with pytest.raises(ValueError, match="model.gate_threshold.*silu_dense"):
    ModelConfig(gate_threshold=0.1, ffn="silu_dense")
  with pytest.raises(ValueError, match="model.rope_original_max_len"):
    ModelConfig(rope_scaling="llama3", rope_factor=8.0)
  with pytest.raises(ValueError, match="model.rope_scaling"):
    ModelConfig(rope_scaling="dynamic")
  with pytest.raises(ValueError, match="model.rope_attention_factor"):
    ModelConfig(rope_attention_factor=1.5)
  with pytest.raises(ValueError, match="model.sliding_window"):
    ModelConfig(sliding_window=0)
  from sparse_jax.config import Config, apply_overrides
  cfg = apply_overrides(Config(), ["model.tie_embeddings=false", "model.gate_threshold=0.05",
                                   "model.rope_scaling=linear", "model.rope_factor=2",
                                   "model.sliding_window=64"])
  m = cfg.model
  assert (m.tie_embeddings, m.gate_threshold, m.rope_scaling, m.rope_factor, m.sliding_window) \
      == (False, 0.05, "linear", 2.0, 64)
  assert Config.from_dict(dataclasses.asdict(cfg)).model == m  # recorded and read back
