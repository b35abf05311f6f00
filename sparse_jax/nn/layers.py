"""Transformer building blocks: RMSNorm, rotary position embeddings, causal MHA/GQA attention.

Parameters are kept in ``param_dtype`` (fp32 master weights) and cast to ``compute_dtype`` at
use, so the optimiser sees fp32 and the matmuls run in bf16 with fp32 accumulation.

``Attention.decode`` is the incremental path of text generation: it appends the new positions'
keys and values to a ``KVCache`` and attends over the cache; ``__call__`` (training, evaluation)
attends over the whole sequence at once. Both use the same projections (``project``, ``output``).
"""
from __future__ import annotations

import dataclasses

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


def apply_rope(x_BxLxNxH: jax.Array, positions_L: jax.Array, theta: float, *,
               inv_freq: tuple[float, ...] | None = None, scale: float = 1.0) -> jax.Array:
  """Rotary embeddings, rotate-half convention: feature i pairs with i + H/2.

  inv_freq: the H/2 inverse frequencies of a scaled RoPE (``sparse_jax.nn.rope``), else theta's.
  scale: multiplies cos and sin (YaRN's attention factor).
  """
  half = x_BxLxNxH.shape[-1] // 2
  if inv_freq is None:
    inv_freq_H2 = theta ** (-jnp.arange(half, dtype=F32) / half)
  else:
    inv_freq_H2 = jnp.asarray(inv_freq, F32)
  angle_LxH2 = positions_L.astype(F32)[:, None] * inv_freq_H2[None, :]
  sin, cos = jnp.sin(angle_LxH2)[:, None, :], jnp.cos(angle_LxH2)[:, None, :]
  if scale != 1.0:
    sin, cos = sin * scale, cos * scale
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of one attention layer for S positions (the slots past the decoded ones are
  zeros and masked out)."""
  k_BxSxKxH: jax.Array
  v_BxSxKxH: jax.Array

  @classmethod
  def zeros(cls, batch: int, length: int, n_kv_heads: int, head_dim: int, dtype) -> "KVCache":
    shape = (batch, length, n_kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class Attention(nnx.Module):
  """Causal multi-head attention with RoPE; n_kv_heads < n_heads gives grouped-query attention.

  rope_inv_freq, rope_scale: a scaled RoPE (``apply_rope``); sliding_window: each position sees at
  most this many positions, itself included (None: all earlier ones).
  """

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
               rope_theta: float, implementation: str, out_std_scale: float, compute_dtype,
               param_dtype, rngs: nnx.Rngs, rope_inv_freq: tuple[float, ...] | None = None,
               rope_scale: float = 1.0, sliding_window: int | None = None):
    std_in = d_model ** -0.5
    self.w_q_DxNxH = normal(rngs, (d_model, n_heads, head_dim), std_in, param_dtype)
    self.w_k_DxKxH = normal(rngs, (d_model, n_kv_heads, head_dim), std_in, param_dtype)
    self.w_v_DxKxH = normal(rngs, (d_model, n_kv_heads, head_dim), std_in, param_dtype)
    self.w_o_NxHxD = normal(rngs, (n_heads, head_dim, d_model),
                            out_std_scale * (n_heads * head_dim) ** -0.5, param_dtype)
    self.rope_theta = rope_theta
    self.rope_inv_freq, self.rope_scale = rope_inv_freq, rope_scale
    self.sliding_window = sliding_window
    self.implementation = implementation
    self.compute_dtype = compute_dtype

  def _w(self, p: nnx.Param) -> jax.Array:
    return p[...].astype(self.compute_dtype)

  def project(self, x_BxLxD: jax.Array, positions_L: jax.Array):
    """(q [B, L, N, H], k [B, L, K, H], v [B, L, K, H]) with RoPE at ``positions_L``."""
    q = jnp.einsum("bld,dnh->blnh", x_BxLxD, self._w(self.w_q_DxNxH))
    k = jnp.einsum("bld,dkh->blkh", x_BxLxD, self._w(self.w_k_DxKxH))
    v_BxLxKxH = jnp.einsum("bld,dkh->blkh", x_BxLxD, self._w(self.w_v_DxKxH))
    rope = dict(inv_freq=self.rope_inv_freq, scale=self.rope_scale)
    return (apply_rope(q, positions_L, self.rope_theta, **rope),
            apply_rope(k, positions_L, self.rope_theta, **rope), v_BxLxKxH)

  def output(self, out_BxLxNxH: jax.Array) -> jax.Array:
    return jnp.einsum("blnh,nhd->bld", out_BxLxNxH, self._w(self.w_o_NxHxD))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = self.project(x_BxLxD, jnp.arange(x_BxLxD.shape[1]))
    out_BxLxNxH = jax.nn.dot_product_attention(
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, is_causal=True,
        local_window_size=None if self.sliding_window is None else (self.sliding_window - 1, 0),
        implementation=attention_implementation(self.implementation, self.compute_dtype))
    return self.output(out_BxLxNxH)

  def decode(self, x_BxTxD: jax.Array, cache: KVCache, start: jax.Array
             ) -> tuple[jax.Array, KVCache]:
    """Attention of T new tokens at positions start..start+T-1 over the cache and themselves.

    The caller keeps start + T <= S (the cache length): ``dynamic_update_slice`` would clamp a
    write past the end onto earlier slots instead of failing.
    """
    t = x_BxTxD.shape[1]
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = self.project(x_BxTxD, start + jnp.arange(t))
    k_BxSxKxH = jax.lax.dynamic_update_slice(
        cache.k_BxSxKxH, k_BxTxKxH.astype(cache.k_BxSxKxH.dtype), (0, start, 0, 0))
    v_BxSxKxH = jax.lax.dynamic_update_slice(
        cache.v_BxSxKxH, v_BxTxKxH.astype(cache.v_BxSxKxH.dtype), (0, start, 0, 0))
    # Query i sits at position start + i and sees every slot up to it (the empty ones are later).
    slot_S, pos_T = jnp.arange(k_BxSxKxH.shape[1]), start + jnp.arange(t)
    mask_TxS = slot_S[None, :] <= pos_T[:, None]
    if self.sliding_window is not None:
      mask_TxS &= slot_S[None, :] > pos_T[:, None] - self.sliding_window
    # XLA attention: cuDNN's fused kernel wants a causal flag or no mask, not a cache-length one.
    out_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH,
                                               mask=mask_TxS[None, None], implementation="xla")
    return self.output(out_BxTxNxH), KVCache(k_BxSxKxH, v_BxSxKxH)
