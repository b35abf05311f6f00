"""Row packing shared by the TwELL and Hybrid formats (XLA, runs on any backend)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_nonzero(h: jax.Array) -> jax.Array:
  """Active entries: ``h != 0``, so NaN and +-Inf count as active."""
  return jnp.logical_not(h == 0)


def pack_rows(h_RxW: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Packs each row's nonzeros, in column order, into ``capacity`` slots.

  Returns (values [R, capacity], cols [R, capacity] int32, counts [R] int32). Counts are exact;
  entries past ``capacity`` are not stored. Unused slots hold value 0 and column 0.
  """
  r, w = h_RxW.shape
  nz = is_nonzero(h_RxW)
  counts = jnp.sum(nz, axis=1, dtype=jnp.int32)
  pos = jnp.cumsum(nz, axis=1, dtype=jnp.int32) - 1
  slot = jnp.where(nz & (pos < capacity), pos, capacity)  # slot == capacity is out of bounds: dropped
  rows = jnp.arange(r, dtype=jnp.int32)[:, None]
  cols = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32)[None, :], (r, w))
  values = jnp.zeros((r, capacity), h_RxW.dtype).at[rows, slot].set(h_RxW, mode="drop")
  col_ids = jnp.zeros((r, capacity), jnp.int32).at[rows, slot].set(cols, mode="drop")
  return values, col_ids, counts


def slot_mask(counts_R: jax.Array, capacity: int) -> jax.Array:
  """[R, capacity] bool: slot s of row r holds an entry (s < min(count, capacity))."""
  return jnp.arange(capacity, dtype=jnp.int32)[None, :] < jnp.minimum(counts_R, capacity)[:, None]


def scatter_rows(values_RxC: jax.Array, cols_RxC: jax.Array, counts_R: jax.Array,
                 width: int) -> jax.Array:
  """Dense [R, width] from packed rows; slots past each row's count are ignored."""
  r, c = values_RxC.shape
  valid = slot_mask(counts_R, c)
  cols = jnp.where(valid, cols_RxC, width)  # out of bounds: dropped
  rows = jnp.arange(r, dtype=jnp.int32)[:, None]
  return jnp.zeros((r, width), values_RxC.dtype).at[rows, cols].add(
      jnp.where(valid, values_RxC, 0).astype(values_RxC.dtype), mode="drop")


def _raise_host(bad, message: str):
  n = int(np.sum(np.asarray(bad)))
  if n:
    raise OverflowError(message.format(n=n))


def raise_if_any(bad: jax.Array, message: str) -> None:
  """Raises ``OverflowError(message.format(n=...))`` if any flag is set: at once when ``bad`` is
  concrete, at run time (through a host callback) under ``jit``."""
  if isinstance(bad, jax.core.Tracer):
    jax.debug.callback(_raise_host, bad, message)
  else:
    _raise_host(bad, message)
