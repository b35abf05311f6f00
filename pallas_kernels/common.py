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


# --------------------------------------------------------------------------- CTA work ranges


def balanced_bounds(work: jax.Array, n_parts: int) -> jax.Array:
  """[n_parts + 1] int32 bounds cutting the N items of ``work`` ([N], each item's cost, >= 0) into
  contiguous ranges [b_k, b_k+1) of about equal cost: b_0 = 0, b_n = N, non-decreasing. A
  persistent kernel's CTA k takes the items of range k (equal item counts leave the CTA that drew
  the busiest items working alone at the end)."""
  n = work.shape[0]
  cum = jnp.cumsum(work.astype(jnp.int32))
  goal = jnp.arange(n_parts + 1, dtype=jnp.int32).astype(jnp.float32) * (
      cum[-1].astype(jnp.float32) / n_parts)
  # n_parts + 1 queries: one fused comparison instead of the default searchsorted's loop.
  b = jnp.searchsorted(cum.astype(jnp.float32), goal, side="left",
                       method="compare_all").astype(jnp.int32)
  return b.at[0].set(0).at[-1].set(n)


# A token's fixed cost in the warp-per-token kernels (entry list, its own rows in and out), in
# entries; an overflowed TwELL tile's exact recomputation in the fused forward (its 256 gate rows
# read and dotted, where an entry reads two rows), in entries.
TOKEN_COST = 2
OVERFLOW_TILE_COST = 128


def token_bounds(counts_MxT: jax.Array, capacity: int, n_parts: int, *,
                 overflowed_rows_skipped: bool) -> jax.Array:
  """``balanced_bounds`` of the tokens of a TwELL pattern (``counts_MxT``: entries per row and
  tile, above ``capacity`` where the tile overflowed) for a warp-per-token kernel: each token
  costs ``TOKEN_COST`` plus its entries; a row with an overflowed tile costs only its fixed cost
  where the kernel skips it (``overflowed_rows_skipped``: the backward kernels, whose rows the
  dense row path owns), else each overflowed tile adds ``OVERFLOW_TILE_COST`` (the fused forward
  recomputes it)."""
  counts = counts_MxT.astype(jnp.int32)
  over = counts > capacity
  if overflowed_rows_skipped:
    work = jnp.where(jnp.any(over, axis=1), 0, jnp.sum(counts, axis=1))
  else:
    work = jnp.sum(counts + jnp.where(over, OVERFLOW_TILE_COST, 0), axis=1)
  return balanced_bounds(work + TOKEN_COST, n_parts)


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
