"""The sparse FFN op per device: ``shard_map`` over the batch axes, statistics made global.

Under a mesh the compiler partitions the model (GSPMD) from the shardings of the parameters and the
batch, but the sparse op cannot be partitioned that way: its formats and fallbacks are built over
the tokens of one call, and the Pallas kernels are per-device ``plgpu.kernel`` calls. ``ShardedFFN``
therefore runs the unchanged ``FFN.__call__`` (so every FFN kind and backend behaves as on one
device) inside ``jax.shard_map``, each device on its own sequences with the whole weights (the
FSDP all-gather happens at the boundary, in the compute dtype).

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

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from sparse_jax import ops
from sparse_jax.nn.ffn import FFN, SPARSE_KINDS, STATS_NAME, _capturing
from sparse_jax.parallel.mesh import BATCH_AXES


def global_stats(per_device: ops.FFNStats) -> ops.FFNStats:
  """FFNStats with a leading [devices] axis (one row per device) -> those of all their tokens."""
  return ops.FFNStats(
      l0=jnp.mean(per_device.l0, axis=0), l1=jnp.mean(per_device.l1, axis=0),
      overflow_rows=jnp.sum(per_device.overflow_rows, axis=0),
      dense_fallback=jnp.mean(per_device.dense_fallback.astype(jnp.float32), axis=0),
      active_per_neuron=jnp.sum(per_device.active_per_neuron, axis=0))


class ShardedFFN(FFN):
  """An FFN (same parameters, same state paths) whose call runs per device under ``mesh``."""

  def __init__(self, ffn: FFN, mesh: Mesh):  # adopts ``ffn``'s weights: no FFN.__init__
    for name, value in vars(ffn).items():
      if not name.startswith("_"):
        setattr(self, name, value)
    self.local_graphdef = nnx.graphdef(ffn)
    self.mesh = mesh

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    # Cast before the map: the FSDP all-gather then moves compute-dtype weights.
    weights = jax.tree.map(lambda w: w.astype(self.compute_dtype), nnx.state(self, nnx.Param))
    split = P(BATCH_AXES)  # the sequences of x and y; the device rows of the statistics
    y, per_device = jax.shard_map(self._per_device, mesh=self.mesh, in_specs=(split, P()),
                                  out_specs=(split, split), check_vma=False)(x_BxLxD, weights)
    if _capturing(self):
      self.sow(nnx.Intermediate, STATS_NAME, global_stats(per_device))
    return y

  def _per_device(self, x_BxLxD, weights):
    local = nnx.merge(self.local_graphdef, weights)
    y, sown = nnx.capture(local, nnx.Intermediate)(x_BxLxD)
    return y, jax.tree.map(lambda a: a[None], nnx.to_pure_dict(sown)[STATS_NAME][-1])


def shard_ffns(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """``model`` with every sparse FFN of its blocks run per device on ``mesh`` (in place).

  Dense FFN kinds stay as they are: the compiler partitions them like the rest of the model.
  """
  for block in model.blocks:
    if type(block.ffn) is FFN and block.ffn.kind in SPARSE_KINDS:
      block.ffn = ShardedFFN(block.ffn, mesh)
  return model
