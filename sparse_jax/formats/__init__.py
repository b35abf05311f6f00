"""Sparse formats of the FFN hidden activations: TwELL (inference) and Hybrid (training)."""
from sparse_jax.formats import hybrid, twell
from sparse_jax.formats.hybrid import EllTranspose, Hybrid
from sparse_jax.formats.twell import TwELL

__all__ = ["EllTranspose", "Hybrid", "TwELL", "hybrid", "twell"]
