"""The sparse FFN op (XLA reference + Pallas backend) and its dense ground truth."""
from sparse_jax.ops.api import (available_implementations, gated_sparse_ffn, register_backend,
                                sparse_ffn)
from sparse_jax.ops.config import FFNStats, SparseFFNConfig
from sparse_jax.ops.dense import gated_ffn, relu_ffn

__all__ = ["FFNStats", "SparseFFNConfig", "available_implementations", "gated_ffn",
           "gated_sparse_ffn", "register_backend", "relu_ffn", "sparse_ffn"]
