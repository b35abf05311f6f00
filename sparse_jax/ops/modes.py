"""Static per-call modes of the sparse FFN op (``SparseFFNConfig.mode``).

``"dense"`` is the same for every backend: the plain XLA dense FFN differentiated by ``jax.grad``
(no custom VJP, no chunked recomputation), plus the L1 term and the statistics. It is therefore
decided in the op's entry (``sparse_jax.ops.api``) before a backend is chosen, and runs wherever
XLA runs. It keeps the dense model's activations for the backward (the memory of a dense model):
a layer is only put in this mode by a caller that measured it dense, where the sparse formats
would not save memory either.

``"sparse"`` and ``"auto"`` are the backends' business (the Pallas backend drops its on-device
probe and the ``lax.cond`` around its kernels in ``"sparse"``; the XLA reference has no probe, so
both modes are the same there).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_jax.ops.config import MODES, FFNStats
from sparse_jax.ops.dense import F32, bf16_gated_ffn_with_l1

__all__ = ["MODES", "dense_ffn_with_stats"]


def dense_ffn_with_stats(x_MxD: jax.Array, w_gate: jax.Array, w_up: jax.Array | None,
                         w_down: jax.Array) -> tuple[jax.Array, FFNStats]:
  """(y [M, D] in x's dtype, FFNStats) of the dense FFN as a dense model computes it
  (``ops.dense.bf16_gated_ffn_with_l1``: matmul outputs in the compute dtype, f32 accumulation).
  ``w_up=None``: non-gated (``w_gate`` holds the up weights). Differentiable by plain autodiff;
  only ``l1`` carries a gradient. The counts come from a second look at the gate's pre-activation,
  which XLA fuses with the gate matmul's consumers and drops when nobody reads them."""
  m = x_MxD.shape[0]
  y, l1 = bf16_gated_ffn_with_l1(x_MxD, w_gate, w_up, w_down)
  pre = jax.lax.stop_gradient(
      jax.lax.dot_general(x_MxD, w_gate, (((1,), (1,)), ((), ()))))
  # NaN pre-activations count as active, as in the sparse paths (never silently dropped).
  active_MxN = jnp.logical_not(pre <= 0)
  active_N = jnp.sum(active_MxN, axis=0, dtype=jnp.int32)
  return y, FFNStats(l0=jnp.sum(active_N).astype(F32) / m, l1=l1,
                     overflow_rows=jnp.zeros((), jnp.int32),
                     dense_fallback=jnp.ones((), bool), active_per_neuron=active_N)
