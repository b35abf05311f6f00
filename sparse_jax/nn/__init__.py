"""Flax NNX models: the Llama-style decoder with sparse ReLU-gated FFNs, and KV-cache generation."""
from sparse_jax.nn.ffn import FFN, dense_stats
from sparse_jax.nn.generate import Generation, Generator, generate
from sparse_jax.nn.layers import Attention, KVCache, RMSNorm, apply_rope
from sparse_jax.nn.model import (Block, Transformer, abstract_param_count, count_params,
                                 forward_with_stats)

__all__ = ["FFN", "Attention", "Block", "Generation", "Generator", "KVCache", "RMSNorm", "Transformer",
           "abstract_param_count", "apply_rope", "count_params", "dense_stats",
           "forward_with_stats", "generate"]
