"""Transformer building blocks: RMSNorm, rotary position embeddings, causal MHA/GQA attention.

Parameters are kept in ``param_dtype`` (fp32 master weights) and cast to ``compute_dtype`` at
use, so the optimiser sees fp32 and the matmuls run in bf16 with fp32 accumulation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> nnx.Param:
  return nnx.Param((std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype))


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, with the statistics in fp32 whatever the compute dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(F32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(F32)).astype(x_BxLxD.dtype)


def apply_rope(x_BxLxNxH: jax.Array, positions_L: jax.Array, theta: float) -> jax.Array:
  """Rotary embeddings, rotate-half convention: feature i pairs with i + H/2."""
  half = x_BxLxNxH.shape[-1] // 2
  inv_freq_H2 = theta ** (-jnp.arange(half, dtype=F32) / half)
  angle_LxH2 = positions_L.astype(F32)[:, None] * inv_freq_H2[None, :]
  sin, cos = jnp.sin(angle_LxH2)[:, None, :], jnp.cos(angle_LxH2)[:, None, :]
  x = x_BxLxNxH.astype(F32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def attention_implementation(choice: str, dtype) -> str:
  """'auto' takes cuDNN flash attention where it runs (a GPU, 16-bit inputs), else XLA."""
  if choice != "auto":
    return choice
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


class Attention(nnx.Module):
  """Causal multi-head attention with RoPE; n_kv_heads < n_heads gives grouped-query attention."""

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
               rope_theta: float, implementation: str, out_std_scale: float, compute_dtype,
               param_dtype, rngs: nnx.Rngs):
    std_in = d_model ** -0.5
    self.w_q_DxNxH = normal(rngs, (d_model, n_heads, head_dim), std_in, param_dtype)
    self.w_k_DxKxH = normal(rngs, (d_model, n_kv_heads, head_dim), std_in, param_dtype)
    self.w_v_DxKxH = normal(rngs, (d_model, n_kv_heads, head_dim), std_in, param_dtype)
    self.w_o_NxHxD = normal(rngs, (n_heads, head_dim, d_model),
                            out_std_scale * (n_heads * head_dim) ** -0.5, param_dtype)
    self.rope_theta = rope_theta
    self.implementation = implementation
    self.compute_dtype = compute_dtype

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dt = self.compute_dtype
    w = lambda p: p[...].astype(dt)
    positions_L = jnp.arange(x_BxLxD.shape[1])
    q = jnp.einsum("bld,dnh->blnh", x_BxLxD, w(self.w_q_DxNxH))
    k = jnp.einsum("bld,dkh->blkh", x_BxLxD, w(self.w_k_DxKxH))
    v_BxLxKxH = jnp.einsum("bld,dkh->blkh", x_BxLxD, w(self.w_v_DxKxH))
    q_BxLxNxH = apply_rope(q, positions_L, self.rope_theta)
    k_BxLxKxH = apply_rope(k, positions_L, self.rope_theta)
    out_BxLxNxH = jax.nn.dot_product_attention(
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, is_causal=True,
        implementation=attention_implementation(self.implementation, dt))
    return jnp.einsum("blnh,nhd->bld", out_BxLxNxH, w(self.w_o_NxHxD))
