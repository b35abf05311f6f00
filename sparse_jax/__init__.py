"""sparse_jax: sparser, faster, lighter transformer language models in JAX.

ReLU-gated FFNs trained with an L1 penalty reach >99% activation sparsity; the TwELL and Hybrid
formats and the Pallas Mosaic GPU kernels turn that sparsity into speed and memory savings.
"""
from sparse_jax import formats, ops
from sparse_jax.ops import FFNStats, SparseFFNConfig, gated_sparse_ffn, sparse_ffn

__version__ = "0.1.0"
__all__ = ["FFNStats", "SparseFFNConfig", "formats", "gated_sparse_ffn", "ops", "sparse_ffn"]
