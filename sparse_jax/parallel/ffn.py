"""The sparse FFN op per device: ``shard_map`` over the batch axes, statistics made global.

Under a mesh the compiler partitions the model (GSPMD) from the shardings of the parameters and the
batch, but the sparse op cannot be partitioned that way: its formats and fallbacks are built over
the tokens of one call, and the Pallas kernels are per-device ``plgpu.kernel`` calls. ``ShardedFFN``
therefore runs the unchanged ``FFN.__call__`` (so every FFN kind and backend behaves as on one
device) inside ``jax.shard_map``, each device on its own sequences with the whole weights (the
FSDP all-gather happens at the boundary, in the compute dtype), and reduces the statistics:

* l0, l1: ``pmean`` (every device holds the same number of tokens, so the mean of the per-device
  means is the global mean). The L1 loss term is built on this global l1; its gradient reaches each
  device's op as 1/n of the cotangent (the transpose of pmean), as on one device.
* overflow_rows, active_per_neuron: ``psum`` (counts over all tokens).
* dense_fallback: the share of devices whose call ran on the dense path (float32 in [0, 1]; one
  device's bool becomes 0 or 1), so the logged dense-path share stays the share of calls.

The weights enter the map replicated and are marked device-varying (``pcast``) before use: the
transpose of that cast is the ``psum`` of the per-device weight gradients, i.e. the data-parallel
gradient reduction. Capacities (Hybrid tail, TwELL overflow budget) are per call, so per device;
every path is exact, so results agree with one device's to rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from sparse_jax import ops
from sparse_jax.nn.ffn import FFN, SPARSE_KINDS, STATS_NAME, _capturing
from sparse_jax.parallel.mesh import BATCH_AXES


def global_stats(stats: ops.FFNStats) -> ops.FFNStats:
  """One device's FFNStats -> the statistics of all devices' tokens (inside shard_map)."""
  return ops.FFNStats(
      l0=jax.lax.pmean(stats.l0, BATCH_AXES), l1=jax.lax.pmean(stats.l1, BATCH_AXES),
      overflow_rows=jax.lax.psum(stats.overflow_rows, BATCH_AXES),
      dense_fallback=jax.lax.pmean(stats.dense_fallback.astype(jnp.float32), BATCH_AXES),
      active_per_neuron=jax.lax.psum(stats.active_per_neuron, BATCH_AXES))


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
    tokens = P(BATCH_AXES)
    y, stats = jax.shard_map(self._per_device, mesh=self.mesh, in_specs=(tokens, P()),
                             out_specs=(tokens, P()))(x_BxLxD, weights)
    if _capturing(self):
      self.sow(nnx.Intermediate, STATS_NAME, stats)
    return y

  def _per_device(self, x_BxLxD, weights):
    weights = jax.lax.pcast(weights, BATCH_AXES, to="varying")
    local = nnx.merge(self.local_graphdef, weights)
    y, sown = nnx.capture(local, nnx.Intermediate)(x_BxLxD)
    return y, global_stats(nnx.to_pure_dict(sown)[STATS_NAME][-1])


def shard_ffns(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """``model`` with every sparse FFN of its blocks run per device on ``mesh`` (in place).

  Dense FFN kinds stay as they are: the compiler partitions them like the rest of the model.
  """
  for block in model.blocks:
    if type(block.ffn) is FFN and block.ffn.kind in SPARSE_KINDS:
      block.ffn = ShardedFFN(block.ffn, mesh)
  return model
