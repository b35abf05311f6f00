"""The Llama-style decoder of the paper: tied or untied embeddings, pre-norm blocks, RoPE, FFNs.

``Transformer.__call__`` runs whole sequences (training, evaluation); ``Transformer.decode`` runs
new tokens against per-layer ``KVCache``s (text generation, ``sparse_jax.nn.generate``). Both go
through the same blocks, so the FFN (sparse or not) and its sown statistics are the same.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sparse_jax.config import ModelConfig
from sparse_jax.nn.ffn import FFN, STATS_NAME
from sparse_jax.nn.layers import F32, Attention, KVCache, RMSNorm, normal
from sparse_jax.nn.rope import rope_inv_freq
from sparse_jax.ops.base import SPARSE_RESIDUALS


class Block(nnx.Module):
  """x + attn(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None,
               layer: int = 0):
    cdt, pdt = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    # Residual-branch outputs start smaller with depth so the stream's scale stays ~1 at init.
    out_scale = (2 * cfg.n_layers) ** -0.5
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    scaled_rope = cfg.rope_scaling != "none"
    self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim,
                          rope_theta=cfg.rope_theta, implementation=cfg.attention_impl,
                          out_std_scale=out_scale, compute_dtype=cdt, param_dtype=pdt, rngs=rngs,
                          rope_inv_freq=tuple(rope_inv_freq(cfg).tolist()) if scaled_rope else None,
                          rope_scale=cfg.rope_attention_factor, sliding_window=cfg.sliding_window)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    self.ffn = FFN(cfg.d_model, cfg.d_ff, kind=cfg.ffn, implementation=cfg.ffn_impl,
                   sparse=cfg.sparse, out_std_scale=out_scale, compute_dtype=cdt,
                   param_dtype=pdt, rngs=rngs, mesh=mesh,
                   hot_neurons=None if cfg.sparse_hot_neurons is None
                   else cfg.sparse_hot_neurons[layer])

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD))
    return x_BxLxD + self.ffn(self.ffn_norm(x_BxLxD))

  def decode(self, x_BxTxD: jax.Array, cache: KVCache, start: jax.Array
             ) -> tuple[jax.Array, KVCache]:
    attn_BxTxD, cache = self.attn.decode(self.attn_norm(x_BxTxD), cache, start)
    x_BxTxD = x_BxTxD + attn_BxTxD
    return x_BxTxD + self.ffn(self.ffn_norm(x_BxTxD)), cache


def _call_block(block: Block, x_BxLxD: jax.Array) -> jax.Array:
  return block(x_BxLxD)


def remat_policy(cfg: ModelConfig):
  """The ``jax.checkpoint`` policy of a rematerialised block (``cfg.remat_policy``):
  "keep_sparse_ffn" saves the sparse FFN op's named residuals (``ops.base.SPARSE_RESIDUALS``) and
  recomputes the rest; "recompute_all" saves nothing."""
  if cfg.remat_policy == "keep_sparse_ffn":
    return jax.checkpoint_policies.save_only_these_names(SPARSE_RESIDUALS)
  return None


class Transformer(nnx.Module):
  """tokens [B, L] int -> logits [B, L, vocab] fp32.

  ``mesh``: the device mesh of a sharded run; the sparse FFNs then run their op per device
  (``sparse_jax.parallel.per_device``). None: one device, or the compiler's partitioning.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
    if cfg.vocab_size is None:
      raise ValueError("ModelConfig.vocab_size is None: resolve it against the tokenizer first "
                       "(cfg.resolve_vocab(tokenizer.vocab_size))")
    self.cfg = cfg
    self.compute_dtype = jnp.dtype(cfg.compute_dtype)
    # Tied embeddings with unit-norm rows: logits = norm(x) E^T start at ~unit scale. The input
    # side is not scaled up (Gemma does), else each token's own row dominates the residual
    # stream at init and the model starts by predicting its input token (initial loss >> ln V).
    self.embed_VxD = normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.d_model ** -0.5,
                            jnp.dtype(cfg.param_dtype))
    self.blocks = nnx.List([Block(cfg, rngs=rngs, mesh=mesh, layer=i)
                            for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))
    if not cfg.tie_embeddings:  # an output head of its own (imported Llama 2/3 checkpoints)
      self.lm_head_VxD = normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.d_model ** -0.5,
                                jnp.dtype(cfg.param_dtype))

  def __call__(self, tokens_BxL: jax.Array, *, logits: bool = True) -> jax.Array:
    """Logits [B, L, V] fp32; with ``logits=False`` the final-normed hidden states [B, L, D] (in
    the compute dtype) that the head multiplies, for a loss that forms the logits in chunks
    (``sparse_jax.train.loss.head_cross_entropy`` with ``output_head()``)."""
    x_BxLxD = self._embed(tokens_BxL)
    # Rematerialisation recomputes each block's activations in the backward pass instead of
    # keeping them: less memory for deeper models, one extra forward of compute.
    call = nnx.remat(_call_block, policy=remat_policy(self.cfg)) if self.cfg.remat else _call_block
    for block in self.blocks:
      x_BxLxD = call(block, x_BxLxD)
    return self._logits(x_BxLxD) if logits else self.final_norm(x_BxLxD)

  def output_head(self) -> jax.Array:
    """The output head [V, D] in the parameter dtype: the embedding when tied, else lm_head."""
    return (self.embed_VxD if self.cfg.tie_embeddings else self.lm_head_VxD)[...]

  def _embed(self, tokens_BxL: jax.Array) -> jax.Array:
    return jnp.take(self.embed_VxD[...].astype(self.compute_dtype), tokens_BxL, axis=0)

  def _logits(self, x_BxLxD: jax.Array) -> jax.Array:
    return jnp.einsum("bld,vd->blv", self.final_norm(x_BxLxD),
                      self.output_head().astype(self.compute_dtype), preferred_element_type=F32)

  def init_cache(self, batch: int, length: int) -> list[KVCache]:
    """Empty per-layer caches for ``length`` positions, in the compute dtype."""
    cfg = self.cfg
    return [KVCache.zeros(batch, length, cfg.kv_heads, cfg.attn_head_dim, self.compute_dtype)
            for _ in self.blocks]

  def decode(self, tokens_BxT: jax.Array, caches: list[KVCache], start: jax.Array
             ) -> tuple[jax.Array, list[KVCache]]:
    """Logits [B, T, V] of T new tokens at positions start..start+T-1, and the updated caches.

    A prompt is one call with start=0 (prefill); each generated token is one call with T=1.
    """
    x_BxTxD = self._embed(tokens_BxT)
    new_caches = []
    for block, cache in zip(self.blocks, caches, strict=True):
      x_BxTxD, cache = block.decode(x_BxTxD, cache, start)
      new_caches.append(cache)
    return self._logits(x_BxTxD), new_caches


def forward_with_stats(model: Transformer, tokens_BxL: jax.Array, *, logits: bool = True):
  """(logits [B, L, V] fp32, FFNStats with a leading [n_layers] axis on every field); with
  ``logits=False`` the final-normed hidden states [B, L, D] instead of the logits.

  The blocks sow their FFN statistics; nnx.capture collects them here, so no return value has to
  carry them through the model. ``stats.l1`` keeps its gradient (the L1 penalty trains on it).
  """
  out, inter = nnx.capture(model, nnx.Intermediate)(tokens_BxL, logits=logits)
  return out, sown_ffn_stats(model, inter)


def sown_ffn_stats(model: Transformer, intermediates: nnx.State):
  """The FFNStats the blocks sowed under ``nnx.capture``, stacked over layers."""
  sown = nnx.to_pure_dict(intermediates)["blocks"]
  per_layer = [sown[i]["ffn"][STATS_NAME][-1] for i in range(len(model.blocks))]
  return jax.tree.map(lambda *a: jnp.stack(a), *per_layer)


def count_params(model_or_state) -> int:
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) \
      else model_or_state
  return sum(int(x.size) for x in jax.tree.leaves(state))


def abstract_param_count(cfg: ModelConfig) -> int:
  """Parameter count of a config without allocating it (works for the 2B presets too)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return count_params(abstract)

