"""Hybrid: row-wise ELL plus dense tail rows, the training format of the sparse FFN.

Every row (token) with at most ``width`` nonzeros is stored in the ELL part; rows with more
("long rows", the long tail of per-token activity) are stored densely in a tail buffer of
``tail_capacity`` rows. All shapes are static, so the format lives inside ``jit``.

Layout::

    values_MxW       [M, width]             ELL values (dtype of h)
    indices_MxW      [M, width]             int32 global column (no 65536 limit)
    counts_M         [M]                    int32, the TRUE nonzeros of each row
    tail_rows_R      [tail_capacity]        int32 ids of long rows, ascending; unused slots hold M
    tail_values_RxN  [tail_capacity, N]     the long rows, dense
    n_tail           []                     int32, the TRUE number of long rows

* A row is in the ELL part iff ``count <= width``; the ELL slots of long rows are zero and unused.
  ELL slots past ``count`` are zero (value) and 0 (index); consumers mask with ``ell_mask``.
* ``n_tail > tail_capacity`` is *tail overflow*: some long rows are stored nowhere. ``overflow()``
  reports it and every consumer must take an exact dense path (``sparse_jax.ops`` does, under
  ``lax.cond``); nothing is ever dropped silently.
* ``transpose_ell`` builds the column-sorted (CSC) form of the ELL part that the weight gradients
  of the backward pass use; tail rows go through dense matmuls instead.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.formats import _packing, sorting

DEFAULT_WIDTH = 128


def default_tail_capacity(n_rows: int) -> int:
  """One row in 8 may be long; the original release's default (2048 of 16384) scaled with M."""
  return max(1, -(-n_rows // 8))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Hybrid:
  values_MxW: jax.Array
  indices_MxW: jax.Array
  counts_M: jax.Array
  tail_rows_R: jax.Array
  tail_values_RxN: jax.Array
  n_tail: jax.Array
  n_cols: int = dataclasses.field(metadata=dict(static=True))

  @property
  def n_rows(self) -> int:
    return self.values_MxW.shape[0]

  @property
  def width(self) -> int:
    return self.values_MxW.shape[1]

  @property
  def tail_capacity(self) -> int:
    return self.tail_rows_R.shape[0]

  @property
  def shape(self) -> tuple[int, int]:
    return (self.n_rows, self.n_cols)

  def is_long(self) -> jax.Array:
    """[M] bool: the row has more than ``width`` nonzeros (stored in the tail, if room)."""
    return self.counts_M > self.width

  def overflow(self) -> jax.Array:
    """[] bool: more long rows than the tail can hold; consumers must use a dense path."""
    return self.n_tail > self.tail_capacity

  def ell_mask(self) -> jax.Array:
    """[M, width] bool: slots of the ELL part that hold entries (never for long rows)."""
    ell_counts = jnp.where(self.is_long(), 0, self.counts_M)
    return _packing.slot_mask(ell_counts, self.width)

  def tail_mask(self) -> jax.Array:
    """[tail_capacity] bool: tail slots that hold a row."""
    return self.tail_rows_R < self.n_rows

  def sample(self, a_MxN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Samples a dense [M, N] matrix at this pattern: (ELL-shaped [M, W], tail-shaped [R, N]).
    Tail rows are taken whole; the caller masks them with the tail pattern if needed."""
    ell = jnp.take_along_axis(a_MxN, self.indices_MxW, axis=1)
    ell = jnp.where(self.ell_mask(), ell, 0).astype(a_MxN.dtype)
    tail = jnp.take(a_MxN, self.tail_rows_R, axis=0, mode="fill", fill_value=0)
    return ell, tail

  def densify(self, ell_values_MxW: jax.Array, tail_values_RxN: jax.Array) -> jax.Array:
    """Dense [M, N] from values laid out on this pattern (e.g. the format's own values, or the
    up projection sampled at it). Does not check ``overflow()``: see ``decode`` for that."""
    ell_counts = jnp.where(self.is_long(), 0, self.counts_M)
    dense = _packing.scatter_rows(ell_values_MxW, self.indices_MxW, ell_counts, self.n_cols)
    return dense.at[self.tail_rows_R].set(tail_values_RxN.astype(dense.dtype), mode="drop")

  def nnz(self) -> jax.Array:
    return jnp.sum(self.counts_M)

  def packed_bytes(self) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize
               for a in (self.values_MxW, self.indices_MxW, self.counts_M, self.tail_rows_R,
                         self.tail_values_RxN, self.n_tail))


def _check_width(width: int, tail_capacity: int) -> None:
  if not isinstance(width, (int, np.integer)) or width < 1:
    raise ValueError(f"width must be a positive integer, got {width!r}")
  if not isinstance(tail_capacity, (int, np.integer)) or tail_capacity < 1:
    raise ValueError(f"tail_capacity must be a positive integer, got {tail_capacity!r}")


def encode(h_MxN: jax.Array, *, width: int = DEFAULT_WIDTH,
           tail_capacity: int | None = None) -> Hybrid:
  """Packs a dense [M, N] matrix. Rows with more than ``width`` nonzeros go to the dense tail."""
  if h_MxN.ndim != 2:
    raise ValueError(f"encode expects a 2-D [M, N] matrix, got shape {h_MxN.shape}")
  m, n = h_MxN.shape
  width = int(min(width, n)) if n else int(width)
  if tail_capacity is None:
    tail_capacity = default_tail_capacity(m)
  _check_width(width, tail_capacity)
  values, cols, counts = _packing.pack_rows(h_MxN, width)
  long = counts > width
  values = jnp.where(long[:, None], 0, values).astype(h_MxN.dtype)
  cols = jnp.where(long[:, None], 0, cols)
  (tail_rows,) = jnp.nonzero(long, size=tail_capacity, fill_value=m)
  tail_rows = tail_rows.astype(jnp.int32)
  tail_values = jnp.take(h_MxN, tail_rows, axis=0, mode="fill", fill_value=0)
  return Hybrid(values_MxW=values, indices_MxW=cols, counts_M=counts, tail_rows_R=tail_rows,
                tail_values_RxN=tail_values, n_tail=jnp.sum(long, dtype=jnp.int32), n_cols=n)


def decode(hy: Hybrid, *, on_overflow: str = "raise") -> jax.Array:
  """Dense [M, N]. On tail overflow: ``"raise"`` raises ``OverflowError``; ``"nan"`` fills the long
  rows that found no tail slot with NaN."""
  if on_overflow not in ("raise", "nan"):
    raise ValueError(f"on_overflow must be 'raise' or 'nan', got {on_overflow!r}")
  dense = hy.densify(hy.values_MxW, hy.tail_values_RxN)
  stored = jnp.zeros((hy.n_rows,), bool).at[hy.tail_rows_R].set(True, mode="drop")
  lost = hy.is_long() & ~stored
  if on_overflow == "raise":
    _packing.raise_if_any(lost, "Hybrid.decode: {n} long row(s) did not fit in the dense tail "
                          f"(tail_capacity={hy.tail_capacity}). Re-encode with a larger "
                          "tail_capacity or use on_overflow='nan'.")
  return jnp.where(lost[:, None], jnp.asarray(jnp.nan, dense.dtype), dense)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EllTranspose:
  """The ELL part in column-sorted (CSC) order, for the weight gradients ``dW = S^T X``.

  ``col_ptr_P[j]:col_ptr_P[j+1]`` are the entries of column j, ``P = N + 1``. Entry e sits in row
  ``row_ids_E[e]`` and came from flat ELL slot ``src_E[e]`` (row * width + slot), so any values laid
  out on the same pattern (P, R, T or their gradients) transpose with ``gather``. ``E = M * width``;
  entries past ``nnz`` are padding (row M, source M * width).
  """

  col_ptr_P: jax.Array
  row_ids_E: jax.Array
  src_E: jax.Array
  nnz: jax.Array
  n_rows: int = dataclasses.field(metadata=dict(static=True))

  def gather(self, ell_values_MxW: jax.Array) -> jax.Array:
    """[E] values in column-sorted order; padding entries are 0."""
    flat = ell_values_MxW.reshape(-1)
    return jnp.take(flat, self.src_E, mode="fill", fill_value=0)

  def col_ids(self) -> jax.Array:
    """[E] column of each entry (N for padding): the number of columns that end at or before it."""
    e = jnp.arange(self.src_E.shape[0], dtype=jnp.int32)
    return jnp.searchsorted(self.col_ptr_P[1:], e, side="right").astype(jnp.int32)

  def densify_t(self, ell_values_MxW: jax.Array, n_cols: int) -> jax.Array:
    """Dense [N, M] = the transpose of the ELL part with the given values."""
    vals = self.gather(ell_values_MxW)
    return jnp.zeros((n_cols, self.n_rows), vals.dtype).at[self.col_ids(), self.row_ids_E].add(
        vals, mode="drop")


def transpose_ell(hy: Hybrid) -> EllTranspose:
  """Column-sorted form of the ELL part (long rows excluded: they live in the dense tail)."""
  m, w, n = hy.n_rows, hy.width, hy.n_cols
  valid = hy.ell_mask().reshape(-1)
  key = jnp.where(valid, hy.indices_MxW.reshape(-1), n)
  _, order = sorting.argsort_small_keys(key, n)  # CUB's radix sort on the GPU
  nnz = jnp.sum(valid, dtype=jnp.int32)
  live = jnp.arange(m * w, dtype=jnp.int32) < nnz
  per_col = jnp.zeros((n,), jnp.int32).at[key].add(1, mode="drop")
  col_ptr = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(per_col, dtype=jnp.int32)])
  return EllTranspose(col_ptr_P=col_ptr, row_ids_E=jnp.where(live, order // w, m),
                      src_E=jnp.where(live, order, m * w), nnz=nnz, n_rows=m)
