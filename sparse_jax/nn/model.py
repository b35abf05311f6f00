"""The Llama-style decoder of the paper: tied embeddings, pre-norm blocks, RoPE, sparse FFNs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax.config import ModelConfig
from sparse_jax.nn.ffn import FFN, STATS_NAME
from sparse_jax.nn.layers import F32, Attention, RMSNorm, normal


class Block(nnx.Module):
  """x + attn(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cdt, pdt = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    # Residual-branch outputs start smaller with depth so the stream's scale stays ~1 at init.
    out_scale = (2 * cfg.n_layers) ** -0.5
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim,
                          rope_theta=cfg.rope_theta, implementation=cfg.attention_impl,
                          out_std_scale=out_scale, compute_dtype=cdt, param_dtype=pdt, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    self.ffn = FFN(cfg.d_model, cfg.d_ff, kind=cfg.ffn, implementation=cfg.ffn_impl,
                   ell_width=cfg.sparse_ell_width, out_std_scale=out_scale, compute_dtype=cdt,
                   param_dtype=pdt, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD))
    return x_BxLxD + self.ffn(self.ffn_norm(x_BxLxD))


def _call_block(block: Block, x_BxLxD: jax.Array) -> jax.Array:
  return block(x_BxLxD)


class Transformer(nnx.Module):
  """tokens [B, L] int -> logits [B, L, vocab] fp32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
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
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    embed_VxD = self.embed_VxD[...].astype(self.compute_dtype)
    x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0)
    # Rematerialisation recomputes each block's activations in the backward pass instead of
    # keeping them: less memory for deeper models, one extra forward of compute.
    call = nnx.remat(_call_block) if self.cfg.remat else _call_block
    for block in self.blocks:
      x_BxLxD = call(block, x_BxLxD)
    x_BxLxD = self.final_norm(x_BxLxD)
    return jnp.einsum("bld,vd->blv", x_BxLxD, embed_VxD, preferred_element_type=F32)


def forward_with_stats(model: Transformer, tokens_BxL: jax.Array):
  """(logits [B, L, V] fp32, FFNStats with a leading [n_layers] axis on every field).

  The blocks sow their FFN statistics; nnx.capture collects them here, so no return value has to
  carry them through the model. ``stats.l1`` keeps its gradient (the L1 penalty trains on it).
  """
  logits, inter = nnx.capture(model, nnx.Intermediate)(tokens_BxL)
  sown = nnx.to_pure_dict(inter)["blocks"]
  per_layer = [sown[i]["ffn"][STATS_NAME][-1] for i in range(len(model.blocks))]
  return logits, jax.tree.map(lambda *a: jnp.stack(a), *per_layer)


def count_params(model_or_state) -> int:
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) \
      else model_or_state
  return sum(int(x.size) for x in jax.tree.leaves(state))


def abstract_param_count(cfg: ModelConfig) -> int:
  """Parameter count of a config without allocating it (works for the 2B presets too)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return count_params(abstract)

