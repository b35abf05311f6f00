"""Shared helpers for the Mosaic GPU kernels: device queries, interpret mode, padding."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.cache
def hopper_available() -> bool:
  """A CUDA device with compute capability 9.x (wgmma, TMA) is the default device."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  if dev.platform != "gpu":
    return False
  cc = getattr(dev, "compute_capability", "")
  return str(cc).startswith("9")


def num_sms() -> int:
  try:
    dev = jax.devices()[0]
    if dev.platform == "gpu":
      return int(dev.core_count)
  except (RuntimeError, AttributeError):
    pass
  return 132


def interpret_params():
  """GPU interpret mode (runs TMA, barriers and wgmma on the CPU)."""
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  # Unwritten outputs come back as NaN (ints: their max), so a missed store fails the checks.
  return InterpretGPUParams(uninitialized_memory="nan")


def pad_rows(a: jax.Array, multiple: int) -> jax.Array:
  m = a.shape[0]
  pad = (-m) % multiple
  return a if pad == 0 else jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))


def cdiv(a: int, b: int) -> int:
  return -(-a // b)
