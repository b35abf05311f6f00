"""The ``implementation="pallas"`` backend of ``sparse_jax.ops``: kernels plus their glue.

Inference forward (the primal):
  1. dispatcher: the gate of a strided sample of tokens (about 1/64 of them) estimates the active
     fraction on device; ``lax.cond`` runs the dense FFN when it is above
     ``SparseFFNConfig.max_active_fraction`` (where the sparse path stops paying), with no host sync;
  2. gate kernel -> TwELL (``twell_gate``); fused up + down kernel (``twell_ffn``);
  3. tiles that overflowed the TwELL capacity are recomputed exactly inside the fused kernel (no
     fallback pass); the overflowed rows are counted in the stats.
Under ``jax.grad`` the forward keeps sparse residuals and the backward runs the per-token backward
kernel (``twell_train``).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from pallas_kernels import common, twell_ffn, twell_gate
from sparse_jax.formats import twell
from sparse_jax.ops import api
from sparse_jax.ops.config import FFNStats, SparseFFNConfig
from sparse_jax.ops.dense import F32, matmul_nt

TILE = twell_gate.TILE_N
# Tests and CPU users set this to run implementation="pallas" in Mosaic GPU interpret mode.
INTERPRET = os.environ.get("SPARSE_JAX_PALLAS_INTERPRET", "") == "1"


def supports(x_MxD, weights, cfg: SparseFFNConfig, *, interpret: bool = False) -> str | None:
  """None if the kernels can run these arguments here, else why not."""
  if cfg.gate_threshold != 0:
    return f"the kernels compute ReLU; gate_threshold={cfg.gate_threshold} needs the XLA reference"
  if not interpret and not common.hopper_available():
    return "needs an NVIDIA Hopper (sm_90) GPU as the default device"
  if x_MxD.dtype != jnp.bfloat16:
    return f"the kernels take bfloat16, got {x_MxD.dtype}"
  d_model = x_MxD.shape[1]
  if d_model % 256:
    return f"d_model={d_model} must be a multiple of 256"
  if cfg.tile != TILE:
    return f"the kernels use TwELL tile {TILE}, config has {cfg.tile}"
  if cfg.twell_capacity % 8 or cfg.twell_capacity > 128:
    return f"twell_capacity must be a multiple of 8 up to 128, got {cfg.twell_capacity}"
  n_tiles = common.cdiv(weights[0].shape[0], TILE)
  # Per warp, three SMEM entry lists (column, value, slot) of n_tiles * capacity words each.
  if twell_ffn.DEFAULT_WARPGROUPS * 4 * n_tiles * cfg.twell_capacity * 12 > 200 * 1024:
    return "d_ff x capacity too large for the fused kernel's entry lists"
  return None


def _pad_neurons(w, n_pad):
  return w if w is None or w.shape[0] == n_pad else jnp.pad(w, ((0, n_pad - w.shape[0]), (0, 0)))


def estimate_active_fraction(x_MxD, w_gate) -> jax.Array:
  """Active fraction of the gate on ~1/64 of the tokens (evenly strided), on device."""
  m = x_MxD.shape[0]
  n_probe = min(m, max(64, m // 64))
  rows = (jnp.arange(n_probe) * (m // n_probe)).astype(jnp.int32)
  pre = matmul_nt(jnp.take(x_MxD, rows, axis=0), w_gate)
  return jnp.mean(jnp.logical_not(pre <= 0).astype(F32))


def twell_forward(x_MxD, w_gate, w_up, w_down, cfg: SparseFFNConfig, *, interpret=False):
  """Pallas inference forward. Returns (y [M, D], FFNStats)."""
  m, _ = x_MxD.shape
  n = w_gate.shape[0]
  n_pad = common.cdiv(n, TILE) * TILE

  def dense():
    return dense_with_stats(x_MxD, w_gate, w_up, w_down)

  def sparse():
    wg, wu, wd = (_pad_neurons(w, n_pad) for w in (w_gate, w_up, w_down))
    xp = common.pad_rows(x_MxD, 128)
    tw = twell_gate.gate_twell(xp, wg, capacity=cfg.twell_capacity, interpret=interpret)
    # Exact on every row: the fused kernel recomputes tiles that overflowed the capacity.
    y, l1_rows = twell_ffn.fused_up_down(xp, wg, wu, wd, tw, interpret=interpret)
    tw = twell.TwELL(tw.values_MxTxC[:m], tw.indices_MxTxC[:m], tw.counts_MxT[:m],
                     n_cols=n_pad, tile=TILE)
    flagged = tw.row_overflow()
    # Statistics below are dropped by XLA when the caller does not use them.
    active = jax.lax.cond(jnp.any(flagged),
                          lambda: dense_with_stats(x_MxD, w_gate, w_up, w_down)[1].active_per_neuron,
                          lambda: _active_per_neuron(tw)[:n])
    return y[:m], FFNStats(l0=jnp.sum(tw.counts_MxT) / m, l1=jnp.sum(l1_rows[:m]) / (m * n),
                           overflow_rows=jnp.sum(flagged, dtype=jnp.int32),
                           dense_fallback=jnp.zeros((), bool), active_per_neuron=active)

  if cfg.max_active_fraction is None:
    return sparse()
  too_dense = estimate_active_fraction(x_MxD, w_gate) > dispatch_threshold(cfg, m)
  return jax.lax.cond(too_dense, dense, sparse)


def dispatch_threshold(cfg: SparseFFNConfig, m: int, training: bool = False) -> float:
  """Active fraction above which the dense FFN is faster. ``max_active_fraction`` holds for
  M >= 16384 tokens; fewer tokens leave the fused kernel's CTAs fewer tokens to balance, and the
  break-even falls roughly with sqrt(M) (bench_ffn.py on an H200: 56 active/token of 5632 is 1.12x
  at M = 16384 but 0.84x skewed at M = 4096). ``training``: the forward + backward line,
  ``max_active_fraction_train`` (bench_ffn_train.py)."""
  frac = cfg.max_active_fraction
  if training and cfg.max_active_fraction_train is not None:
    frac = min(frac, cfg.max_active_fraction_train)
  return frac * min(1.0, (m / 16384) ** 0.5)


def dense_with_stats(x_MxD, w_gate, w_up, w_down):
  """The dispatcher's dense branch: the bf16 dense FFN and its statistics from one gate matmul."""
  m = x_MxD.shape[0]
  dot = lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())))
  pre = dot(x_MxD, w_gate)
  h = jax.nn.relu(pre)
  if w_up is not None:
    h = h * dot(x_MxD, w_up)
  y = jax.lax.dot_general(h, w_down, (((1,), (0,)), ((), ())))
  act = jnp.logical_not(pre <= 0)
  return y, FFNStats(l0=jnp.sum(act) / m, l1=jnp.mean(jnp.abs(h.astype(F32))),
                     overflow_rows=jnp.zeros((), jnp.int32), dense_fallback=jnp.ones((), bool),
                     active_per_neuron=jnp.sum(act, axis=0, dtype=jnp.int32))


def _active_per_neuron(tw: twell.TwELL) -> jax.Array:
  valid = tw.valid_mask()
  cols = jnp.where(valid, tw.global_indices(), tw.n_cols)
  return jnp.zeros((tw.n_cols,), jnp.int32).at[cols.reshape(-1)].add(1, mode="drop")


# --------------------------------------------------------------------------- custom_vjp ops
# Inference primal: twell_forward above. Under jax.grad: the sparse training forward/backward of
# twell_train (TwELL + R residuals, per-token backward kernel).
from pallas_kernels import twell_train  # noqa: E402  (needs twell_forward defined)

gated_ffn_pallas, relu_ffn_pallas = twell_train.make_ops(interpret=False)
gated_ffn_pallas_interpret, relu_ffn_pallas_interpret = twell_train.make_ops(interpret=True)

if INTERPRET:
  api.register_backend("pallas", gated_ffn_pallas_interpret, relu_ffn_pallas_interpret,
                       functools.partial(supports, interpret=True))
else:
  api.register_backend("pallas", gated_ffn_pallas, relu_ffn_pallas, supports)
