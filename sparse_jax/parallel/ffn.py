"""The sparse FFN op per device: ``shard_map`` over the batch axes, statistics made global.

Under a mesh the compiler partitions the model (GSPMD) from the shardings of the parameters and the
batch, but the sparse op cannot be partitioned that way: its formats and fallbacks are built over
the tokens of one call, and the Pallas kernels are per-device ``plgpu.kernel`` calls. A sparse
``FFN`` built with a mesh (``sparse_jax.nn.FFN(mesh=...)``, which ``Transformer`` passes down)
therefore runs its unchanged one-device computation inside ``jax.shard_map`` (``per_device``),
each device on its own sequences with the whole weights (the FSDP all-gather happens at the
boundary, in the compute dtype).

Each device returns its own statistics as one row of a [devices, ...] output, and they are reduced
outside the map, so no collective inside it has to be differentiated:

* l0, l1: the mean over devices (each holds the same number of tokens, so it is the global mean).
  The L1 term of the loss is built on this l1; its gradient reaches each device's op as 1/n of the
  cotangent, as on one device.
* overflow_rows, active_per_neuron: the sum (counts over all tokens).
* dense_fallback: the share of devices whose call ran on the dense path (float32 in [0, 1]; one
  device's bool becomes 0 or 1), so the logged dense-path share stays the share of calls.

The weights enter the map replicated; the transpose of that is the sum of the per-device weight
gradients (the data-parallel reduction). ``check_vma=False``: the Pallas kernels' outputs carry
no varying-axes type, which the checker would reject where they meet the XLA branches of the
backend's ``lax.cond``s; with no collective in the map the check has nothing else to protect.
Capacities (Hybrid tail, TwELL overflow budget) are per call, so per device; every path is exact,
so results agree with one device's to rounding.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from sparse_jax.ops.base import FFNStats, make_stats
from sparse_jax.parallel.mesh import BATCH_AXES


def global_stats(per_device: FFNStats) -> FFNStats:
  """FFNStats with a leading [devices] axis (one row per device) -> those of all their tokens."""
  return make_stats(
      l0=jnp.mean(per_device.l0, axis=0), l1=jnp.mean(per_device.l1, axis=0),
      overflow_rows=jnp.sum(per_device.overflow_rows, axis=0),
      dense_fallback=jnp.mean(per_device.dense_fallback.astype(jnp.float32), axis=0),
      active_per_neuron=jnp.sum(per_device.active_per_neuron, axis=0))


def per_device(fn: Callable, mesh: Mesh, x_BxLxD: jax.Array, weights) -> tuple[jax.Array, FFNStats]:
  """``fn(x, weights) -> (y, FFNStats)`` run on each device's sequences of ``x`` (split over the
  mesh's batch axes) with the whole ``weights``; returns y (split like x) and the global stats."""
  split = P(BATCH_AXES)  # the sequences of x and y; the device rows of the statistics

  def local(x, w):
    y, stats = fn(x, w)
    return y, jax.tree.map(lambda a: a[None], stats)

  y, rows = jax.shard_map(local, mesh=mesh, in_specs=(split, P()), out_specs=(split, split),
                          check_vma=False)(x_BxLxD, weights)
  return y, global_stats(rows)
