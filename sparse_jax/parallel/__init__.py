"""Training on a device mesh: ``data`` and ``fsdp`` axes, sharded state, per-device sparse FFNs.

* ``make_mesh("data:2,fsdp:4")``: the mesh (``mesh.py``); ``initialize_distributed`` for several
  hosts.
* ``tree_shardings`` / ``fsdp_spec``: the FSDP rule for parameters and optimiser state;
  ``batch_sharding`` / ``put`` / ``place`` to put host values on the mesh (``sharding.py``).
* ``per_device`` / ``global_stats``: the sparse op under ``shard_map`` with global statistics
  (``ffn.py``); a sparse ``nn.FFN`` built with a mesh runs through it.
"""
from sparse_jax.parallel.ffn import global_stats, per_device
from sparse_jax.parallel.mesh import (BATCH_AXES, batch_shards, check_batch, describe,
                                      initialize_distributed, make_mesh, mesh_shape, run_mesh,
                                      sync_hosts)
from sparse_jax.parallel.sharding import batch_sharding, fsdp_spec, place, put, tree_shardings

__all__ = ["BATCH_AXES", "batch_sharding", "batch_shards", "check_batch", "describe",
           "fsdp_spec", "global_stats", "initialize_distributed", "make_mesh", "mesh_shape",
           "per_device", "place", "put", "run_mesh", "sync_hosts", "tree_shardings"]
