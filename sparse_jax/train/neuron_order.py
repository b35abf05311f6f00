"""Reordering one layer's FFN neurons in the whole train state (the hot/cold split's refresh).

Permuting the hidden neurons of an FFN, i.e. the rows of ``w_gate``, ``w_up`` and ``w_down``
together, leaves the function it computes unchanged. A hot/cold split in training keeps a layer's
hot neurons (the most active ones, from the tracker's counts) in a contiguous block so that they
run densely; refreshing the hot set permutes neurons. AdamW is elementwise, so its two moments
(``mu``, ``nu``) must move with their parameters' rows, and so must the tracker's per-neuron state
(``fired_LxF``): then training continues as it would have without the permutation (up to the
summation order over neurons), which ``tests/test_dispatch.py`` checks. (Dead-neuron
re-initialisation draws fresh gate rows by position, so with ``train.reinit_dead`` the draws of a
permuted run differ from an unpermuted one's: still a valid run, not the same one.)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.train.checkpoint import _key_name
from sparse_jax.train.step import TrainState

FFN_WEIGHTS = ("w_gate_FxD", "w_up_FxD", "w_down_FxD")   # neuron-major: one row per neuron


def _is_ffn_weight(path, layer: int) -> bool:
  names = [_key_name(k) for k in path]
  return any(names[i:i + 3] == ["blocks", str(layer), "ffn"] and names[i + 3] in FFN_WEIGHTS
             for i in range(len(names) - 3))


def permute_neurons(state: TrainState, layer: int, perm_F) -> TrainState:
  """``state`` with layer ``layer``'s neuron ``perm_F[j]`` moved to position j: the FFN weights'
  rows in the parameters and in every optimiser-state tree shaped like them (AdamW's moments),
  and the tracker's per-neuron columns. ``perm_F``: a permutation of range(d_ff)."""
  d_ff = state.tracker.fired_LxF.shape[1]
  perm = np.asarray(perm_F)
  if perm.shape != (d_ff,) or not np.array_equal(np.sort(perm), np.arange(d_ff)):
    raise ValueError(f"perm_F must be a permutation of range(d_ff={d_ff}), got shape {perm.shape}")
  if not 0 <= layer < state.tracker.fired_LxF.shape[0]:
    raise ValueError(f"layer {layer} out of range for {state.tracker.fired_LxF.shape[0]} layers")
  perm = jnp.asarray(perm, jnp.int32)
  moved = []

  def visit(path, leaf):
    if not _is_ffn_weight(path, layer):
      return leaf
    if leaf.shape[0] != d_ff:
      raise ValueError(f"{jax.tree_util.keystr(path)} has {leaf.shape[0]} rows, not d_ff={d_ff}")
    moved.append(jax.tree_util.keystr(path))
    out = jnp.take(leaf, perm, axis=0)
    # Keep the leaf where it was (a sharded train state stays in its shardings).
    sharding = getattr(leaf, "sharding", None)
    return out if sharding is None or isinstance(leaf, jax.core.Tracer) else jax.device_put(
        out, sharding)

  params = jax.tree_util.tree_map_with_path(visit, state.params)
  n_weights = len(moved)
  opt_state = jax.tree_util.tree_map_with_path(visit, state.opt_state)
  if n_weights == 0 or len(moved) < 3 * n_weights:  # params, mu, nu
    raise ValueError(f"expected the FFN weights of layer {layer} in the parameters and in both "
                     f"AdamW moments; moved only {moved}")
  fired = state.tracker.fired_LxF.at[layer].set(jnp.take(state.tracker.fired_LxF[layer], perm))
  tracker = dataclasses.replace(state.tracker, fired_LxF=fired)
  return dataclasses.replace(state, params=params, opt_state=opt_state, tracker=tracker)
