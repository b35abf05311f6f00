"""Shared helpers for the Mosaic GPU kernels: device queries, interpret mode, padding, and the
two sizes every TwELL kernel shares.

Two different 256s run through these kernels; they are given two names:

* ``TWELL_TILE`` (256, the format's ``twell.DEFAULT_TILE``): the default TwELL column tile, i.e.
  how many hidden neurons one tile of the format covers. It is a tuning value: the gate kernel
  takes it from ``GateConfig.tile_n``, the kernels reading TwELL from the format (``TwELL.tile``).
* ``WARP_ROW_SPAN`` (256 = 32 lanes x 8 bf16): the d_model columns one warp covers in one pass of
  16-byte loads (``warp_mgpu``). It is fixed by the hardware, so d_model must be a multiple of it.
"""
from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp

from sparse_jax.formats import twell

TWELL_TILE = twell.DEFAULT_TILE
WARP_ROW_SPAN = 32 * 8
WARPS_PER_WARPGROUP = 4
# Shared memory a kernel may give to its per-warp entry lists (the rest: staging, counters).
ENTRY_LIST_SMEM_BYTES = 200 * 1024

# --------------------------------------------------------------------------- interpret mode
# The one place that decides whether Pallas kernels run in Mosaic GPU interpret mode (on the CPU)
# or compiled. Kernels and the op's Pallas backend ask ``pallas_interpret()`` while tracing; the
# SPARSE_JAX_PALLAS_INTERPRET=1 environment variable switches it on for a whole process, and
# ``interpret_mode(True)`` for a block (the tests' ``pallas_interpret`` fixture). It is read at
# trace time: a function jitted under one mode keeps that mode in jax's compilation cache.
_interpret = os.environ.get("SPARSE_JAX_PALLAS_INTERPRET", "") == "1"


def pallas_interpret() -> bool:
  """True when Pallas kernels run in GPU interpret mode (CPU), False when they are compiled."""
  return _interpret


@contextlib.contextmanager
def interpret_mode(on: bool = True):
  """Runs the enclosed traces with interpret mode ``on`` (restored afterwards)."""
  global _interpret
  saved, _interpret = _interpret, bool(on)
  try:
    yield
  finally:
    _interpret = saved


def interpret_params():
  """``plgpu.kernel(interpret=...)``: GPU interpret mode (TMA, barriers and wgmma on the CPU), or
  None (compiled) as ``pallas_interpret()`` says."""
  if not pallas_interpret():
    return None
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  # Unwritten outputs come back as NaN (ints: their max), so a missed store fails the checks.
  return InterpretGPUParams(uninitialized_memory="nan")


# --------------------------------------------------------------------------- one lowering per kernel
def shared_lowering(*, static_argnames: tuple[str, ...]):
  """Decorates a kernel entry point (a function that builds and calls ``plgpu.kernel``) with
  ``jax.jit``: the keyword arguments ``static_argnames`` and the interpret mode are static, the
  arrays traced. Every call of one shape and configuration -- each layer of an unrolled model --
  then shares one lowering, one Mosaic GPU module and one kernel compile. Without it each call
  site lowers its own module, and jax names every lowered module apart (``dump_basename``
  anonymous_0, anonymous_1, ...), so identical kernels get different hashes and are compiled one
  by one (a 38-layer model: 76 decode kernels compiled, minutes).

  Interpret mode (CPU tests) calls the function as it is: a jitted interpret-mode kernel called
  eagerly can deadlock (its callbacks run jax operations while the caller's next operation waits
  on its result), and there is nothing to compile once there."""
  def wrap(fn):
    jitted = jax.jit(fn, static_argnames=static_argnames)

    @functools.wraps(fn)
    def call(*args, **kwargs):
      return fn(*args, **kwargs) if pallas_interpret() else jitted(*args, **kwargs)
    return call
  return wrap


# --------------------------------------------------------------------------- devices


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


# --------------------------------------------------------------------------- shapes


def pad_rows(a: jax.Array, multiple: int) -> jax.Array:
  m = a.shape[0]
  pad = (-m) % multiple
  return a if pad == 0 else jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_bf16(x: jax.Array) -> jax.Array:
  """``x`` rounded to bfloat16 (nearest even), kept in its dtype: T = bf16(P R) as the forward
  kernels round it. Not ``x.astype(bf16).astype(f32)``: XLA's GPU pipeline removes that pair
  (``xla_allow_excess_precision``, on by default), so the XLA paths would keep P R unrounded while
  the kernels round it (measured: dWd differed by 1.7e-3 between the two neuron-major passes)."""
  return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)


def check_row_span(d_model: int, kernel: str) -> None:
  """The per-warp kernels cover a row in passes of ``WARP_ROW_SPAN`` columns."""
  if d_model % WARP_ROW_SPAN:
    raise ValueError(f"d_model={d_model} must be a multiple of {WARP_ROW_SPAN} for the {kernel} "
                     f"(one warp reads a row in {WARP_ROW_SPAN}-column passes)")


def check_entry_lists(n_warps: int, list_len: int, kernel: str) -> None:
  """Per warp, three SMEM entry lists (column, value, slot) of ``list_len`` 4-byte words."""
  need = n_warps * list_len * 12
  if need > ENTRY_LIST_SMEM_BYTES:
    raise NotImplementedError(
        f"the {kernel}'s entry lists need {need} bytes of shared memory (warps={n_warps} x "
        f"n_tiles x capacity={list_len}), more than {ENTRY_LIST_SMEM_BYTES}")
