"""Named shardings of the train state and of batches.

FSDP rule: every array with two or more dimensions is split over ``fsdp`` along its largest
dimension that the fsdp size divides (the next largest if that one does not divide, and so on);
arrays with no such dimension, vectors and scalars are replicated. The rule depends only on shapes,
so parameters and their AdamW moments (same shapes) get the same sharding. All arrays are
replicated over ``data``.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparse_jax.parallel.mesh import BATCH_AXES


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """The PartitionSpec of an array of ``shape`` under the FSDP rule (module docstring)."""
  if fsdp_size > 1 and len(shape) >= 2:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % fsdp_size == 0:
        return P(*(("fsdp" if d == dim else None) for d in range(len(shape))))
  return P()


def tree_shardings(tree, mesh: Mesh):
  """A NamedSharding for every array leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(np.shape(a), mesh.shape["fsdp"])),
                      tree)


def batch_sharding(mesh: Mesh, ndim: int, axis: int) -> NamedSharding:
  """Arrays of ``ndim`` dimensions whose ``axis`` (the sequences) is split over every device."""
  return NamedSharding(mesh, P(*((BATCH_AXES if d == axis else None) for d in range(ndim))))


def put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array (the same global value on every process) as a sharded jax.Array: each process
  places only its own devices' shards, so this works on one host and on several."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def place(tree, shardings):
  """Arrays of ``tree`` (the same values on every process) moved into ``shardings``; on several
  hosts each process places only its own devices' shards."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  return jax.tree.map(lambda a, s: put(np.asarray(a), s), tree, shardings)
