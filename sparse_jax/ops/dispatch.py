"""The sparse-or-dense decision of one inference call, from a probe of the batch as it is.

The probe computes the gate of a few hundred tokens and estimates (a) the active fraction and
(b) the fraction of (token, 256-column tile) pairs over the TwELL capacity, whose exact
recomputation inside the fused kernel costs about a whole tile of gathers each. The rows are a
seeded pseudo-random sample fixed at trace time: an evenly strided sample (every 64th token) hits
every sequence start of 2048-token sequences, and first tokens fire many more neurons than the rest
(PAPER.md), so it overestimated the density ~30-60x on those rows.

Where the decision can be made before compiling (a prepared checkpoint's measured statistics,
``sparse_jax.ops.hotcold``), the caller passes a static plan instead and no probe or ``lax.cond``
sits in the hot path.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.ops.dense import F32, matmul_nt


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """rows: tokens probed (at least; M / 64 when that is more; at most M); seed: which ones (fixed per M, so per compiled shape);
  tile, capacity: the TwELL format whose overflow is estimated; overflow_tile_cost: a (token, tile)
  over capacity costs as much as this many fully active tiles (1.0: its recomputation gathers the
  whole tile once more)."""
  rows: int = 256
  seed: int = 0x5EED
  tile: int = 256
  capacity: int = 32
  overflow_tile_cost: float = 1.0

  def __post_init__(self):
    for name in ("rows", "tile", "capacity"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"ProbeConfig.{name} must be a positive int, got {v!r}")
    if not self.overflow_tile_cost >= 0:
      raise ValueError(f"ProbeConfig.overflow_tile_cost must be >= 0, got "
                       f"{self.overflow_tile_cost!r}")


@functools.lru_cache(maxsize=64)
def probe_rows(m: int, n_probe: int, seed: int) -> np.ndarray:
  """``min(m, n_probe)`` distinct token indices in [0, m), sorted: a seeded random sample, with no
  alignment to any sequence length."""
  if m < 1:
    raise ValueError(f"m must be positive, got {m}")
  n = min(m, n_probe)
  rows = np.random.default_rng([seed, m]).choice(m, size=n, replace=False)
  rows = np.sort(rows).astype(np.int32)
  rows.flags.writeable = False
  return rows


def probe(x_MxD: jax.Array, w_gate: jax.Array, cfg: ProbeConfig = ProbeConfig()
          ) -> tuple[jax.Array, jax.Array]:
  """(active fraction, overflowed (token, tile) fraction) of the gate on the probed tokens, on
  device. A NaN pre-activation counts as active (it fills its tile, as in the kernels)."""
  m, n = x_MxD.shape[0], w_gate.shape[0]
  rows = jnp.asarray(probe_rows(m, max(cfg.rows, m // 64), cfg.seed))
  active_RxN = jnp.logical_not(matmul_nt(jnp.take(x_MxD, rows, axis=0), w_gate) <= 0)
  n_tiles = -(-n // cfg.tile)
  padded = jnp.pad(active_RxN, ((0, 0), (0, n_tiles * cfg.tile - n)))
  counts_RxT = jnp.sum(padded.reshape(len(rows), n_tiles, cfg.tile), axis=2)
  return (jnp.mean(active_RxN.astype(F32)), jnp.mean((counts_RxT > cfg.capacity).astype(F32)))


def effective_active_fraction(active_fraction, overflow_fraction, n: int,
                              cfg: ProbeConfig = ProbeConfig()):
  """The active fraction the sparse path's cost corresponds to once overflowed tiles are paid:
  each overflowed (token, tile) adds ``overflow_tile_cost x tile`` gathered entries."""
  n_tiles = -(-n // cfg.tile)
  return active_fraction + overflow_fraction * cfg.overflow_tile_cost * n_tiles * cfg.tile / n


def estimate(x_MxD: jax.Array, w_gate: jax.Array, cfg: ProbeConfig = ProbeConfig()) -> jax.Array:
  """The effective active fraction of this batch (scalar f32 on device): compare it with the
  dispatcher's threshold (``max_active_fraction``)."""
  active, overflow = probe(x_MxD, w_gate, cfg)
  return effective_active_fraction(active, overflow, w_gate.shape[0], cfg)


def too_dense(x_MxD: jax.Array, w_gate: jax.Array, threshold: float,
              cfg: ProbeConfig = ProbeConfig()) -> jax.Array:
  """Scalar bool on device: the dense FFN is expected to be faster for this batch."""
  return estimate(x_MxD, w_gate, cfg) > threshold
