"""TwELL: tile-wise ELLPACK, the inference format of the sparse FFN.

The hidden matrix ``h`` (M rows = tokens, N = d_ff columns) is cut into column tiles of width
``tile`` (256 by default). Every (row, tile) pair keeps its nonzeros locally: a count and up to
``capacity`` (column, value) entries. Packing is local to one tile, so a gate-matmul kernel can do it
in its epilogue from the accumulator tile it owns, with no global synchronisation.

In-memory layout (what the Pallas kernels read and write)::

    values_MxTxC   [M, n_tiles, capacity]  dtype of h (bf16 in the kernels)
    indices_MxTxC  [M, n_tiles, capacity]  int16, column index *local to the tile* (0 <= i < tile)
    counts_MxT     [M, n_tiles]            int32, the TRUE number of nonzeros of the tile row

* Tile-local indices: the global column is ``t * tile + index``, so d_ff is not limited to 65536
  (the original release's uint16 global index is).
* Entries at slots ``>= min(count, capacity)`` are unspecified: kernels do not write them. Every
  consumer masks with ``counts``. ``encode`` fills them with zeros so results are deterministic.
* The order of entries inside one (row, tile) is unspecified (the GPU epilogue writes them
  lane-interleaved); ``encode`` writes them in increasing column order.
* Counts are exact and never clamped. A tile row with ``count > capacity`` has lost entries: the row
  is *overflowed*. ``row_overflow`` flags such rows, and every consumer either raises or recomputes
  them exactly (``sparse_jax.ops`` recomputes them densely from ``x``).
* "Nonzero" means ``h != 0``, so NaN and +-Inf are kept as active entries (a NaN gate value never
  silently becomes an inactive neuron).
* If N is not a multiple of ``tile``, ``encode`` pads with zero columns; ``n_cols`` keeps the true N.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.formats import _packing

DEFAULT_TILE = 256
DEFAULT_CAPACITY = 32  # the paper's compression factor 8 on a 256-wide tile


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TwELL:
  """A TwELL-packed [M, n_cols] matrix. A registered pytree: arrays are leaves, sizes are static."""

  values_MxTxC: jax.Array
  indices_MxTxC: jax.Array
  counts_MxT: jax.Array
  n_cols: int = dataclasses.field(metadata=dict(static=True))
  tile: int = dataclasses.field(metadata=dict(static=True))

  @property
  def n_rows(self) -> int:
    return self.values_MxTxC.shape[0]

  @property
  def n_tiles(self) -> int:
    return self.values_MxTxC.shape[1]

  @property
  def capacity(self) -> int:
    return self.values_MxTxC.shape[2]

  @property
  def shape(self) -> tuple[int, int]:
    return (self.n_rows, self.n_cols)

  def tile_overflow(self) -> jax.Array:
    """[M, n_tiles] bool: the tile row has more nonzeros than ``capacity`` (entries were lost)."""
    return self.counts_MxT > self.capacity

  def row_overflow(self) -> jax.Array:
    """[M] bool: some tile of the row overflowed; the row must be recomputed or rejected."""
    return jnp.any(self.tile_overflow(), axis=1)

  def num_overflow_rows(self) -> jax.Array:
    return jnp.sum(self.row_overflow().astype(jnp.int32))

  def nnz_per_row(self) -> jax.Array:
    """[M] int32: exact number of nonzeros of each row (overflowed entries included)."""
    return jnp.sum(self.counts_MxT, axis=1)

  def valid_mask(self) -> jax.Array:
    """[M, n_tiles, capacity] bool: which slots hold real entries."""
    slot = jnp.arange(self.capacity, dtype=jnp.int32)
    return slot[None, None, :] < jnp.minimum(self.counts_MxT, self.capacity)[:, :, None]

  def global_indices(self) -> jax.Array:
    """[M, n_tiles, capacity] int32 global column of each slot (meaningful where ``valid_mask``)."""
    base = (jnp.arange(self.n_tiles, dtype=jnp.int32) * self.tile)[None, :, None]
    return base + self.indices_MxTxC.astype(jnp.int32)

  def packed_bytes(self) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize
               for a in (self.values_MxTxC, self.indices_MxTxC, self.counts_MxT))


def _check_tile_and_capacity(tile: int, capacity: int) -> None:
  if not isinstance(tile, (int, np.integer)) or tile <= 0:
    raise ValueError(f"tile must be a positive integer, got {tile!r}")
  if tile > 32768:
    raise ValueError(f"tile must be <= 32768 so tile-local indices fit in int16, got {tile}")
  if not isinstance(capacity, (int, np.integer)) or not 1 <= capacity <= tile:
    raise ValueError(f"capacity must be an integer in [1, tile={tile}], got {capacity!r}")


def encode(h_MxN: jax.Array, *, tile: int = DEFAULT_TILE,
           capacity: int = DEFAULT_CAPACITY) -> TwELL:
  """Packs a dense [M, N] matrix into TwELL. Exact counts; overflowed tile rows keep their first
  ``capacity`` entries (in column order) and are flagged by ``row_overflow``."""
  _check_tile_and_capacity(tile, capacity)
  if h_MxN.ndim != 2:
    raise ValueError(f"encode expects a 2-D [M, N] matrix, got shape {h_MxN.shape}")
  m, n = h_MxN.shape
  n_tiles = -(-n // tile)
  if n_tiles * tile != n:
    h_MxN = jnp.pad(h_MxN, ((0, 0), (0, n_tiles * tile - n)))
  h_RxT = h_MxN.reshape(m * n_tiles, tile)
  vals, cols, counts = _packing.pack_rows(h_RxT, capacity)
  return TwELL(
      values_MxTxC=vals.reshape(m, n_tiles, capacity),
      indices_MxTxC=cols.astype(jnp.int16).reshape(m, n_tiles, capacity),
      counts_MxT=counts.reshape(m, n_tiles),
      n_cols=n,
      tile=tile,
  )


def densify(tw: TwELL, values_MxTxC: jax.Array, *, keep_rows: jax.Array | None = None) -> jax.Array:
  """Dense [M, n_cols] from values laid out on ``tw``'s pattern (the format's own values, or e.g.
  the gated product computed at its entries). Rows where ``keep_rows`` is False come out zero.
  Does not check for overflow: ``decode`` does."""
  m = tw.n_rows
  counts = tw.counts_MxT if keep_rows is None else jnp.where(keep_rows[:, None], tw.counts_MxT, 0)
  dense = _packing.scatter_rows(
      values_MxTxC.reshape(m * tw.n_tiles, tw.capacity),
      tw.indices_MxTxC.reshape(m * tw.n_tiles, tw.capacity).astype(jnp.int32),
      counts.reshape(-1), tw.tile)
  return dense.reshape(m, tw.n_tiles * tw.tile)[:, :tw.n_cols]


def decode(tw: TwELL, *, on_overflow: Literal["raise", "nan"] = "raise") -> jax.Array:
  """Unpacks to a dense [M, n_cols] matrix.

  An overflowed row cannot be reconstructed. ``on_overflow="raise"`` raises ``OverflowError``
  (eagerly when the counts are concrete, at run time under ``jit``); ``"nan"`` fills such rows with
  NaN so the loss can never go unnoticed.
  """
  if on_overflow not in ("raise", "nan"):
    raise ValueError(f"on_overflow must be 'raise' or 'nan', got {on_overflow!r}")
  dense = densify(tw, tw.values_MxTxC)
  bad = tw.row_overflow()
  if on_overflow == "raise":
    _packing.raise_if_any(bad, "TwELL.decode: {n} row(s) overflowed the tile capacity "
                          f"{tw.capacity}; their entries were not all stored. Re-encode with a "
                          "larger capacity or use on_overflow='nan'.")
  return jnp.where(bad[:, None], jnp.asarray(jnp.nan, dense.dtype), dense)


def capacity_for(active_per_row: float, n_cols: int, *, tile: int = DEFAULT_TILE,
                 headroom: float = 4.0, minimum: int = 8) -> int:
  """A capacity with ``headroom`` times the mean nonzeros per tile row, rounded up to a multiple
  of 8 (the kernels' store granularity) and at most ``tile``."""
  per_tile = active_per_row * tile / max(n_cols, 1)
  cap = max(minimum, int(np.ceil(per_tile * headroom)))
  return int(min(tile, -(-cap // 8) * 8))
