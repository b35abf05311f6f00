"""The sparse FFN op: ``api`` (public functions, the table of implementations), ``base`` (config,
statistics, argument checks), ``dense`` (the dense FFN, ground truth and fallbacks),
``reference`` (the XLA implementation) and ``pallas_backend`` (the Hopper kernels' glue, imported
on first use)."""
from sparse_jax.ops.api import (IMPLEMENTATIONS, available_implementations, gated_sparse_ffn,
                                sparse_ffn)
from sparse_jax.ops.base import FFNStats, SparseFFNConfig
from sparse_jax.ops.dense import gated_ffn, relu_ffn

__all__ = ["FFNStats", "IMPLEMENTATIONS", "SparseFFNConfig", "available_implementations",
           "gated_ffn", "gated_sparse_ffn", "relu_ffn", "sparse_ffn"]
