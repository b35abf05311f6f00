"""Dense FFNs: the numerical ground truth and the exact fallback of the sparse op.

Weights are neuron-major, one row per hidden neuron: ``w_gate``, ``w_up``, ``w_down`` are all
``[d_ff, d_model]`` (the paper's G, K, V). ``h = relu(x @ w_gate.T) * (x @ w_up.T)``,
``y = h @ w_down``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def matmul_nt(a_MxK: jax.Array, b_NxK: jax.Array) -> jax.Array:
  """a @ b.T with f32 accumulation."""
  return jax.lax.dot_general(a_MxK, b_NxK, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def matmul_nn(a_MxK: jax.Array, b_KxN: jax.Array) -> jax.Array:
  """a @ b with f32 accumulation."""
  return jax.lax.dot_general(a_MxK, b_KxN, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def matmul_tn(a_KxM: jax.Array, b_KxN: jax.Array) -> jax.Array:
  """a.T @ b with f32 accumulation (the weight-gradient product)."""
  return jax.lax.dot_general(a_KxM, b_KxN, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def gate_activation(pre: jax.Array, threshold: float = 0.0) -> jax.Array:
  """ReLU, or FATReLU with a positive ``threshold``: the pre-activation where it exceeds the
  threshold, else 0 (a neuron is active iff pre > threshold). Its derivative, 1 where the output
  is non-zero, is what the sparse op's backward uses for either."""
  if threshold == 0:
    return jax.nn.relu(pre)
  return jnp.where(pre > threshold, pre, jnp.zeros_like(pre))


def hidden(x_MxD, w_gate_NxD, w_up_NxD=None, threshold: float = 0.0):
  """Hidden activations in f32: act(x Wg^T) * (x Wu^T), or act(x Wu^T) without a gate, act the
  ``gate_activation`` of ``threshold``."""
  p = gate_activation(matmul_nt(x_MxD, w_gate_NxD), threshold)
  return p if w_up_NxD is None else p * matmul_nt(x_MxD, w_up_NxD)


def ffn_with_l1(x_MxD, w_gate_NxD, w_up_NxD, w_down_NxD, threshold: float = 0.0):
  """(y [M, D] in x.dtype, mean |h| in f32). ``w_up_NxD=None`` is the non-gated FFN."""
  h = hidden(x_MxD, w_gate_NxD, w_up_NxD, threshold)
  y = matmul_nn(h.astype(x_MxD.dtype), w_down_NxD).astype(x_MxD.dtype)
  return y, jnp.mean(jnp.abs(h))


def gated_ffn(x, w_gate, w_up, w_down):
  """Dense ReLU-gated FFN on [..., d_model] inputs (the ground truth of ``gated_sparse_ffn``)."""
  lead = x.shape[:-1]
  y, _ = ffn_with_l1(x.reshape(-1, x.shape[-1]), w_gate, w_up, w_down)
  return y.reshape(*lead, y.shape[-1])


def relu_ffn(x, w_up, w_down):
  """Dense non-gated ReLU FFN (the ground truth of ``sparse_ffn``)."""
  lead = x.shape[:-1]
  y, _ = ffn_with_l1(x.reshape(-1, x.shape[-1]), w_up, None, w_down)
  return y.reshape(*lead, y.shape[-1])


def bf16_gated_ffn_with_l1(x_MxD, w_gate, w_up, w_down):
  """The dense FFN as a bf16 model computes it (matmul outputs in the compute dtype, f32
  accumulation inside the matmuls): the baseline the benchmarks compare against. Returns
  (y, mean |h| in f32). ``w_up=None``: non-gated."""
  dot = lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())))
  h = jax.nn.relu(dot(x_MxD, w_gate))
  if w_up is not None:
    h = h * dot(x_MxD, w_up)
  y = jax.lax.dot_general(h, w_down, (((1,), (0,)), ((), ())))
  return y, jnp.mean(jnp.abs(h.astype(F32)))
