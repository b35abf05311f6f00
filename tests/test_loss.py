"""The chunked cross-entropy (train.loss_chunk, ``head_cross_entropy``): value and gradients
against a float32 reference, the train step's gradients against the unchunked step's, the
compiled step's memory, bad settings."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from sparse_jax.config import apply_overrides, get_config
from sparse_jax.train import cross_entropy, head_cross_entropy, init_state, resolve_config
from sparse_jax.train.step import _accumulate

F32 = jnp.float32


def draw(key, b=2, seq=64, d=32, v=300):
  kx, kw, kt = jax.random.split(key, 3)
  x = jax.random.normal(kx, (b, seq, d), F32).astype(jnp.bfloat16)
  head = jax.random.normal(kw, (v, d), F32) * d ** -0.5
  targets = jax.random.randint(kt, (b, seq), 0, v)
  return x, head, targets


def reference(x, head, targets):
  """The float32 loss: logits of float32 operands at full precision."""
  logits = jnp.einsum("bld,vd->blv", x.astype(F32), head, precision="highest")
  return cross_entropy(logits, targets)


@pytest.mark.parametrize("chunk", [0, 8, 24, 32, 64])  # 24: a shorter last chunk
def test_chunked_loss_and_gradients_match_the_float32_reference(key, chunk):
  x, head, targets = draw(key)
  loss_and_grads = jax.jit(jax.value_and_grad(
      lambda x, h: head_cross_entropy(x, h, targets, chunk=chunk), argnums=(0, 1)))
  loss, (dx, dhead) = loss_and_grads(x, head)
  want, (dx_ref, dhead_ref) = jax.value_and_grad(reference, argnums=(0, 1))(x, head, targets)
  assert dx.dtype == x.dtype and dhead.dtype == head.dtype
  np.testing.assert_allclose(loss, want, rtol=2e-3)
  assert rel_err(dx, dx_ref) < 1e-2
  assert rel_err(dhead, dhead_ref) < 1e-2
  # and the chunks sum to the whole: the same value as the unchunked bf16 path
  plain = head_cross_entropy(x, head, targets, chunk=0)
  np.testing.assert_allclose(loss, plain, rtol=1e-5)
  # without a gradient (the primal function, no gradient work) the same value
  np.testing.assert_allclose(jax.jit(lambda x, h: head_cross_entropy(
      x, h, targets, chunk=chunk))(x, head), loss, rtol=1e-6)


def test_cotangent_scales_the_chunked_gradients(key):
  x, head, targets = draw(key, seq=32)
  grad = lambda s: jax.grad(lambda h: s * head_cross_entropy(x, h, targets, chunk=8))(head)  # noqa: E731
  np.testing.assert_allclose(grad(2.5), 2.5 * grad(1.0), rtol=1e-5, atol=1e-9)


def test_bad_chunks_are_refused(key):
  x, head, targets = draw(key, seq=24)
  for bad in (-1, 2.0, True):
    with pytest.raises(ValueError, match="non-negative int"):
      head_cross_entropy(x, head, targets, chunk=bad)
  with pytest.raises(ValueError, match="disagree"):
    head_cross_entropy(x, head, targets[:, :20], chunk=8)
  cfg = get_config("tiny")
  with pytest.raises(ValueError, match="train.loss_chunk=-2"):
    apply_overrides(cfg, ["train.loss_chunk=-2"])
  assert apply_overrides(cfg, ["train.loss_chunk=100"]).train.loss_chunk == 100  # 128 % 100 != 0


def _tiny(key, *overrides):
  cfg, _ = resolve_config(apply_overrides(get_config("tiny"), [
      "model.d_model=32", "model.d_ff=64", "model.n_heads=2", "train.batch_size=4",
      "data.seq_len=32", "train.l1_coeff=0.01", *overrides]))
  return cfg, jax.random.randint(key, (1, 4, 33), 0, cfg.model.vocab_size)


@pytest.mark.parametrize("tied", [True, False])
def test_train_step_with_chunked_loss_matches_the_unchunked_step(key, tied):
  """fp32 compute: the two steps differ only in summation order (the gradient's matmuls take
  the softmax gradient in the compute dtype)."""
  cfg, batch = _tiny(key, "model.compute_dtype=float32", "model.ffn=relu_dense",
                     f"model.tie_embeddings={tied}")
  chunked = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss_chunk=8))
  graphdef, state = init_state(cfg)
  accumulate = jax.jit(_accumulate, static_argnames=("graphdef", "cfg"))
  a = accumulate(state.params, graphdef, batch, 0.01, cfg)
  b = accumulate(state.params, graphdef, batch, 0.01, chunked)
  for x, y in zip(a[1:4], b[1:4]):  # loss, cross-entropy, L1
    np.testing.assert_allclose(x, y, rtol=1e-5)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a[0]), jax.tree.leaves(b[0]),
                          strict=True):
    assert rel_err(y, x) < 1e-4, jax.tree_util.keystr(path)


def _temp_bytes(cfg, batch) -> int:
  graphdef, state = init_state(cfg)
  compiled = jax.jit(_accumulate, static_argnames=("graphdef", "cfg")).trace(
      state.params, graphdef, batch, 0.01, cfg).lower().compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_loss_keeps_one_chunk_of_logits_in_the_compiled_step(key):
  """A vocabulary large enough that the logits dominate the step: 4 x 256 tokens x 16384 ids,
  16 MB of fp32 logits (and as much of their gradient) unchunked, 1 MB per 16-position chunk."""
  cfg, _ = _tiny(key, "model.vocab_size=16384", "data.seq_len=256")
  batch = jax.random.randint(key, (1, 4, 257), 0, cfg.model.vocab_size)
  logits_bytes = 4 * 256 * 16384 * 4
  plain = _temp_bytes(cfg, batch)
  chunked = _temp_bytes(dataclasses.replace(
      cfg, train=dataclasses.replace(cfg.train, loss_chunk=16)), batch)
  print(f"compiled temp: unchunked {plain / 2**20:.1f} MiB, chunked {chunked / 2**20:.1f} MiB")
  assert plain >= logits_bytes
  assert chunked <= plain - logits_bytes


def test_chunked_loss_on_a_device_mesh_matches_one_device(key):
  """The chunks run along the sequence axis: a batch split over devices (FSDP head) keeps its
  split, and the sharded step's loss and gradients are one device's (fp32 compute)."""
  from sparse_jax import parallel
  cfg, batch = _tiny(key, "model.compute_dtype=float32", "model.ffn=relu_dense",
                     "train.batch_size=8", "train.loss_chunk=8")
  batch = jax.random.randint(key, (1, 8, 33), 0, cfg.model.vocab_size)
  graphdef, state = init_state(cfg)
  accumulate = jax.jit(_accumulate, static_argnames=("graphdef", "cfg"))
  one = jax.device_get(accumulate(state.params, graphdef, batch, 0.01, cfg))
  mesh = parallel.make_mesh("data:2,fsdp:4")
  graphdef, sharded = init_state(cfg, mesh)
  on_mesh = parallel.put(np.asarray(batch), parallel.batch_sharding(mesh, ndim=3, axis=1))
  many = jax.device_get(accumulate(sharded.params, graphdef, on_mesh, 0.01, cfg))
  np.testing.assert_allclose(many[1:4], one[1:4], rtol=1e-5)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(one[0]), jax.tree.leaves(many[0]),
                          strict=True):
    assert rel_err(y, x) < 1e-4, jax.tree_util.keystr(path)


def test_eval_step_with_chunked_loss_gives_the_unchunked_metrics(key):
  from sparse_jax.train.step import eval_step
  cfg, batch = _tiny(key)
  chunked = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss_chunk=4))
  graphdef, state = init_state(cfg)
  a = eval_step(state.params, batch[0], graphdef=graphdef, cfg=cfg)
  b = eval_step(state.params, batch[0], graphdef=graphdef, cfg=chunked)
  np.testing.assert_allclose(b["ce"], a["ce"], rtol=1e-5)
  np.testing.assert_array_equal(b["active_per_neuron_LxF"], a["active_per_neuron_LxF"])
