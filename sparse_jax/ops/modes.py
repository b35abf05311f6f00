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

from sparse_jax.ops.base import MODES
from sparse_jax.ops.dense import dense_with_stats

__all__ = ["MODES", "dense_ffn_with_stats"]

# (y [M, D] in x's dtype, FFNStats) of the dense FFN as a dense model computes it (matmul outputs
# in the compute dtype, f32 accumulation), differentiable by plain autodiff (only l1 carries a
# gradient); NaN pre-activations count as active, as on the sparse paths. ``w_up=None``: non-gated.
dense_ffn_with_stats = dense_with_stats
