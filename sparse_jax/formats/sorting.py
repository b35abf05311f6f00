"""A stable sort of indices by a small non-negative integer key, in the form XLA's GPU compiler
hands to CUB's radix sort.

XLA's ``SortRewriter`` turns a (key, value) sort into CUB's ``DeviceRadixSort::SortPairs`` only
for unsigned integer (or f32) keys; a signed key takes XLA's own sort kernels (many launches for
a million entries). Keys that fit 16 bits are sorted as ``uint16``: CUB sorts every bit of the key
type, so that is two 8-bit radix passes instead of four. CUB's radix sort is stable, as
``is_stable=True`` asks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def argsort_small_keys(key: jax.Array, max_key: int) -> tuple[jax.Array, jax.Array]:
  """(the keys sorted, int32; the permutation, int32) of a 1-D int ``key`` with values in
  [0, max_key], stable (equal keys keep their order)."""
  if key.ndim != 1:
    raise ValueError(f"key must be 1-D, got shape {key.shape}")
  if max_key < 0 or max_key >= 2**32:
    raise ValueError(f"max_key={max_key} must be in [0, 2**32)")
  key_dtype = jnp.uint16 if max_key < 2**16 else jnp.uint32
  idx = jnp.arange(key.shape[0], dtype=jnp.uint32)
  key_sorted, perm = lax.sort((key.astype(key_dtype), idx), num_keys=1, is_stable=True)
  return key_sorted.astype(jnp.int32), perm.astype(jnp.int32)
