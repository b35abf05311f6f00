"""Sparsity tracking during training: EMA of active neurons per layer, dead neurons per window.

A neuron is *dead* when it fired on no token of a whole window of ``dead_window`` steps. The
tracker is a pytree of arrays, updated inside the jitted step and saved in checkpoints, so resumed
runs track (and re-initialise) exactly as uninterrupted ones.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_jax import ops


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparsityTracker:
  l0_ema_L: jax.Array          # [n_layers] f32, EMA of mean active neurons per token
  fired_LxF: jax.Array         # [n_layers, d_ff] bool, fired at least once in this window
  window_step: jax.Array       # int32, steps into the current window
  dead_fraction_L: jax.Array   # [n_layers] f32, dead share in the last full window (-1: none yet)
  updates: jax.Array           # int32, steps seen


def init_tracker(n_layers: int, d_ff: int) -> SparsityTracker:
  return SparsityTracker(
      l0_ema_L=jnp.zeros((n_layers,), jnp.float32),
      fired_LxF=jnp.zeros((n_layers, d_ff), bool),
      window_step=jnp.zeros((), jnp.int32),
      dead_fraction_L=jnp.full((n_layers,), -1.0, jnp.float32),
      updates=jnp.zeros((), jnp.int32))


def update_tracker(tr: SparsityTracker, stats: ops.FFNStats, *, ema_decay: float,
                   window: int) -> tuple[SparsityTracker, jax.Array, jax.Array]:
  """Adds one step's per-layer stats. Returns (tracker, window_done, dead_LxF of that window).

  ``dead_LxF`` is only meaningful where ``window_done`` is true (the window just closed).
  """
  l0_L = stats.l0.astype(jnp.float32)
  ema = jnp.where(tr.updates == 0, l0_L, ema_decay * tr.l0_ema_L + (1 - ema_decay) * l0_L)
  fired = tr.fired_LxF | (stats.active_per_neuron > 0)
  window_step = tr.window_step + 1
  done = window_step >= window
  dead_LxF = ~fired
  dead_fraction = jnp.where(done, jnp.mean(dead_LxF, axis=1, dtype=jnp.float32),
                            tr.dead_fraction_L)
  new = SparsityTracker(
      l0_ema_L=ema, fired_LxF=jnp.where(done, False, fired),
      window_step=jnp.where(done, 0, window_step), dead_fraction_L=dead_fraction,
      updates=tr.updates + 1)
  return new, done, dead_LxF
