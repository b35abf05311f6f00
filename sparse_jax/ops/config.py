"""Configuration and statistics of the sparse FFN op."""
from __future__ import annotations

import dataclasses

import jax

from sparse_jax.formats import hybrid, twell


@dataclasses.dataclass(frozen=True)
class SparseFFNConfig:
  """Static capacities of the sparse formats. ``None`` fields are derived from the token count M.

  tile, twell_capacity: TwELL (inference) tile width and slots per (row, tile).
  overflow_capacity: (XLA reference) rows whose TwELL tile overflowed that one call recomputes
    exactly on a dense row path; more than this and the whole call runs dense (default: M / 256,
    at least 16). The Pallas kernels need no such budget: they recompute overflowed tiles in place.
  ell_width, tail_capacity: Hybrid (training) ELL width per row and dense-tail rows (default M / 8).
  max_active_fraction: the Pallas backend's dispatcher runs the dense FFN when the estimated
    fraction of active gate neurons exceeds this (None: always sparse). Set from the FFN benchmark.
  max_active_fraction_train: the same line for a training call (forward + backward under
    ``jax.grad``), where the sparse path stops paying earlier; None uses ``max_active_fraction``.
    With ``max_active_fraction=None`` both are off (always sparse).
  entry_capacity: (Pallas training) active entries of one call that the sparse weight gradients
    can hold (default: 1.25x the dispatcher's threshold density, M x d_ff x fraction). A call
    with more entries than this runs its backward on the exact dense path and says so in
    ``FFNStats.dense_fallback``.
  gate_threshold: FATReLU gate (``sparse_jax.ops.dense.gate_activation``): a neuron is active iff
    its gate pre-activation exceeds this, with the pre-activation as its value (0: ReLU). The XLA
    reference computes it exactly; the Pallas kernels take only 0.
  """

  tile: int = twell.DEFAULT_TILE
  twell_capacity: int = twell.DEFAULT_CAPACITY
  overflow_capacity: int | None = None
  ell_width: int = hybrid.DEFAULT_WIDTH
  tail_capacity: int | None = None
  max_active_fraction: float | None = 0.0105
  max_active_fraction_train: float | None = 0.0085
  entry_capacity: int | None = None
  gate_threshold: float = 0.0

  def __post_init__(self):
    for name in ("tile", "twell_capacity", "ell_width"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"SparseFFNConfig.{name} must be a positive int, got {v!r}")
    for name in ("overflow_capacity", "tail_capacity", "entry_capacity"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"SparseFFNConfig.{name} must be None or a positive int, got {v!r}")
    if not self.gate_threshold >= 0:
      raise ValueError(f"SparseFFNConfig.gate_threshold must be >= 0, got {self.gate_threshold!r}")
    for name in ("max_active_fraction", "max_active_fraction_train"):
      v = getattr(self, name)
      if v is not None and not 0.0 < v <= 1.0:
        raise ValueError(f"SparseFFNConfig.{name} must be None or in (0, 1], got {v!r}")
    if self.twell_capacity > self.tile:
      raise ValueError(f"twell_capacity ({self.twell_capacity}) cannot exceed tile ({self.tile})")

  def overflow_rows_for(self, m: int) -> int:
    return min(m, self.overflow_capacity or max(16, -(-m // 256)))

  def tail_rows_for(self, m: int) -> int:
    return min(m, self.tail_capacity or hybrid.default_tail_capacity(m))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FFNStats:
  """Statistics of one sparse FFN call.

  l0: mean number of active hidden neurons per token (no gradient).
  l1: mean |h| over tokens and hidden neurons (the paper's normalisation); carries a gradient, so
    ``loss + coeff * l1`` trains the sparsity. The release's normalisation (sum over neurons, mean
    over tokens) is ``l1 * d_ff``.
  overflow_rows: rows (tokens) whose sparse encoding overflowed its capacity in this call; they
    were computed on an exact fallback path, never dropped.
  dense_fallback: the whole call ran on the dense path (too many overflowed rows for the row
    fallback, or the dispatcher judged the activations too dense for the sparse kernels). Under a
    device mesh (``sparse_jax.parallel``) each device decides for itself and the model reports
    the float share of devices that ran dense.
  active_per_neuron: [d_ff] int32, tokens of this call on which each hidden neuron was active
    (dead-neuron tracking, per-neuron firing frequencies).
  """

  l0: jax.Array
  l1: jax.Array
  overflow_rows: jax.Array
  dense_fallback: jax.Array
  active_per_neuron: jax.Array
