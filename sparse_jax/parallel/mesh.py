"""Device meshes for training (the ``data`` and ``fsdp`` axes) and multi-host start-up.

The mesh axes are ordered (data, fsdp) over ``jax.devices()``, which lists the devices of one host
together: ``fsdp`` is the inner axis, so its groups (which all-gather parameters every layer)
stay inside a host's fast interconnect where they fit, and ``data`` spans hosts.
"""
from __future__ import annotations

import math
import os

import jax
from jax.sharding import AxisType, Mesh

from sparse_jax.config import MESH_AXES, ParallelConfig, parse_mesh_spec

# The batch is split over both axes: FSDP is data parallel with split parameters.
BATCH_AXES = MESH_AXES
DISTRIBUTED_ENV = "SPARSE_JAX_DISTRIBUTED"


def initialize_distributed(pcfg: ParallelConfig) -> bool:
  """``jax.distributed.initialize`` (once) if ``parallel.distributed`` or SPARSE_JAX_DISTRIBUTED=1
  asks for it; must run before anything touches a device. Returns whether it is initialised."""
  if not (pcfg.distributed or os.environ.get(DISTRIBUTED_ENV, "") == "1"):
    return False
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(coordinator_address=pcfg.coordinator_address,
                               num_processes=pcfg.num_processes, process_id=pcfg.process_id)
  return True


def mesh_shape(spec: str, n_devices: int) -> dict[str, int]:
  """{"data": d, "fsdp": f} with d * f == n_devices, from a ``parallel.mesh`` spec."""
  sizes = parse_mesh_spec(spec) or {"data": n_devices}
  known = math.prod(v for v in sizes.values() if v != -1)
  for axis, size in sizes.items():
    if size == -1:
      if n_devices % known:
        raise ValueError(f"parallel.mesh={spec!r}: {axis}:-1 needs the other axes' product "
                         f"({known}) to divide the {n_devices} devices")
      sizes[axis] = n_devices // known
  shape = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
  if math.prod(shape.values()) != n_devices:
    raise ValueError(f"parallel.mesh={spec!r} is a mesh of {math.prod(shape.values())} devices "
                     f"({describe(shape)}) but there are {n_devices}; the product of the axis "
                     "sizes must equal the device count (use -1 for one axis to take the rest)")
  return shape


def make_mesh(spec: str = "auto", devices=None) -> Mesh:
  """The (data, fsdp) mesh of ``spec`` over ``devices`` (default: every device of every host).

  Auto axis types: the compiler propagates shardings (GSPMD) from the inputs' named shardings.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  return jax.make_mesh(tuple(shape.values()), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def run_mesh(pcfg: ParallelConfig) -> Mesh | None:
  """The training mesh of ``parallel.mesh`` over every device, or None for a single device
  (plain single-device training, no shardings)."""
  mesh = make_mesh(pcfg.mesh)
  return None if mesh.size == 1 else mesh


def sync_hosts(name: str) -> None:
  """A barrier across processes (several hosts); nothing on one."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def describe(mesh_or_shape) -> str:
  """``data:2,fsdp:4`` for a mesh or a shape dict."""
  shape = dict(mesh_or_shape.shape) if isinstance(mesh_or_shape, Mesh) else mesh_or_shape
  return ",".join(f"{axis}:{size}" for axis, size in shape.items())


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch is split (every device gets its own sequences)."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch(micro_batch: int, mesh: Mesh, what: str = "train.batch_size / train.grad_accum"
                ) -> None:
  if micro_batch % batch_shards(mesh):
    raise ValueError(f"{what} = {micro_batch} sequences per micro-batch cannot be split over the "
                     f"{batch_shards(mesh)} devices of mesh {describe(mesh)}; make it a multiple "
                     f"of {batch_shards(mesh)}")
