"""Exact hot/cold split of the sparse FFN: the hottest neurons densely, the rest sparsely.

Real activations are skewed: a few neurons fire on a large share of tokens. Gathering their rows of
Wu and Wd token by token repeats the same bytes over and over, and when they sit next to each other
they overflow TwELL tiles (recomputed exactly, but slowly). Computing them with plain XLA matmuls on
tensor cores costs a fixed ~4 d_model FLOPs per token and neuron instead.

Layout: the checkpoint's hidden neurons are permuted (the same permutation of the rows of w_gate,
w_up and w_down leaves the FFN's function unchanged) so that the hot neurons are rows
``[0, n_hot)``. Then::

    y = dense_ffn(x, W[:n_hot]) + sparse_op(x, W[n_hot:])      (summed in f32, rounded once)

The statistics are combined over all d_ff neurons (see ``hot_cold_gated_ffn``). Under ``jax.grad``
the hot part is plain XLA autodiff and the cold part the sparse op's ``custom_vjp``.

Choosing the split (``plan_layer``): per neuron, dense costs ``M x 4 d_model`` FLOPs on tensor cores
(up and down; the gate is computed for every neuron on either path), sparse costs ``freq x M``
gathers of one row of Wu and one of Wd, plus the exact recomputation of overflowed TwELL tiles. The
constants are ``CostModel``'s, measured on an H200 at the paper's FFN shape. The cold neurons are
ordered so that their activity spreads evenly over the 256-column tiles (sorted by frequency and
dealt round-robin), which keeps hot-ish neurons that were adjacent in the checkpoint from piling
into one tile.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.ops.base import FFNStats, SparseFFNConfig, check_weights
from sparse_jax.ops.dense import F32, gate_activation, gate_active, matmul_nn, matmul_nt


# --------------------------------------------------------------------------- the op


def _dense_part(x_MxD, w_gate, w_up, w_down, threshold: float = 0.0, y_rest_MxD=None):
  """(y, sum |h|, active [M, n] bool) of the dense FFN over the given neuron rows, with the op's
  numerics (f32 hidden activations, rounded to x.dtype for the down projection) and its gate
  (FATReLU with a positive ``threshold``). ``y_rest_MxD`` (the cold part's output) is added to
  the down projection's f32 accumulator, which XLA folds into the GEMM as its C operand: no
  [M, d_model] f32 temporary is written and read again."""
  pre = matmul_nt(x_MxD, w_gate)
  h = gate_activation(pre, threshold)
  if w_up is not None:
    h = h * matmul_nt(x_MxD, w_up)
  y = matmul_nn(h.astype(x_MxD.dtype), w_down)
  if y_rest_MxD is not None:
    y = y + y_rest_MxD.astype(F32)
  # Active as the sparse op counts it: under ReLU a NaN pre-activation is "not <= 0", i.e. active.
  return y, jnp.sum(jnp.abs(h)), gate_active(pre, threshold)


def hot_cold_ffn(x, w_gate, w_up, w_down, *, n_hot: int, implementation=None,
                 config: SparseFFNConfig | None = None, cold_op=None
                 ) -> tuple[jax.Array, FFNStats]:
  """The FFN with neurons ``[0, n_hot)`` dense and ``[n_hot, d_ff)`` through the sparse op.

  Same arguments and result as ``sparse_jax.ops.gated_sparse_ffn`` (``w_up=None``: the non-gated
  ``sparse_ffn`` on ``relu(x w_gate^T) @ w_down``), with ``n_hot`` in ``[0, d_ff]``: 0 is the plain
  op, d_ff the plain dense FFN. Statistics over all d_ff neurons: ``l0`` and ``l1`` (normalised by
  d_ff), ``active_per_neuron`` in this (permuted) neuron order; ``overflow_rows`` and
  ``dense_fallback`` come from the cold part, the only part with a sparse format.
  ``cold_op``: a backend function ``(x_MxD, w_gate, w_up, w_down, cfg) -> (y, FFNStats)`` (without
  ``w_up`` when it is None; e.g. the kernels in interpret mode) instead of the public op.
  """
  from sparse_jax.ops import api  # the op imports nothing of this module: no cycle at import
  d_ff = w_gate.shape[0]
  if isinstance(n_hot, bool) or not isinstance(n_hot, (int, np.integer)) or not 0 <= n_hot <= d_ff:
    raise ValueError(f"n_hot must be an int in [0, d_ff={d_ff}], got {n_hot!r}")
  n_hot = int(n_hot)

  def sparse_op(wg, wu, wd):
    if cold_op is not None:
      weights = (wg, wd) if w_up is None else (wg, wu, wd)
      y, st = cold_op(x.reshape(-1, x.shape[-1]), *weights, config or SparseFFNConfig())
      return y.reshape(x.shape), st
    if w_up is None:
      return api.sparse_ffn(x, wg, wd, implementation=implementation, config=config)
    return api.gated_sparse_ffn(x, wg, wu, wd, implementation=implementation, config=config)

  if n_hot == 0:
    return sparse_op(w_gate, w_up, w_down)
  # Argument checks (layout, dtypes) of the op, also when no sparse call follows.
  check_weights(x, [(n, w) for n, w in (("w_gate", w_gate), ("w_up", w_up),
                                             ("w_down", w_down)) if w is not None])
  lead, d_model = x.shape[:-1], x.shape[-1]
  x_MxD = x.reshape(-1, d_model)
  m = x_MxD.shape[0]
  hot = lambda w: None if w is None else w[:n_hot]
  threshold = (config or SparseFFNConfig()).gate_threshold  # the cold op applies it too
  if n_hot == d_ff:
    y_hot, l1_sum_hot, active_hot = _dense_part(x_MxD, hot(w_gate), hot(w_up), hot(w_down),
                                                threshold)
    count_hot = jnp.sum(active_hot, axis=0, dtype=jnp.int32)
    y = y_hot.astype(x.dtype)
    stats = FFNStats(l0=jnp.sum(count_hot).astype(F32) / m, l1=l1_sum_hot / (m * d_ff),
                     overflow_rows=jnp.zeros((), jnp.int32), dense_fallback=jnp.zeros((), bool),
                     active_per_neuron=count_hot)
    return y.reshape(*lead, d_model), stats
  cold = lambda w: None if w is None else w[n_hot:]
  y_cold, s = sparse_op(cold(w_gate), cold(w_up), cold(w_down))
  n_cold = d_ff - n_hot
  y, l1_sum_hot, active_hot = _dense_part(x_MxD, hot(w_gate), hot(w_up), hot(w_down),
                                          threshold, y_cold.reshape(m, d_model))
  count_hot = jnp.sum(active_hot, axis=0, dtype=jnp.int32)
  y = y.astype(x.dtype)
  stats = FFNStats(
      l0=jnp.sum(count_hot).astype(F32) / m + s.l0,
      l1=(l1_sum_hot + s.l1 * (m * n_cold)) / (m * d_ff),
      overflow_rows=s.overflow_rows, dense_fallback=s.dense_fallback,
      active_per_neuron=jnp.concatenate([count_hot, s.active_per_neuron]))
  return y.reshape(*lead, d_model), stats


def prepared_ffn(ffn, x, w):
  """A model FFN (``sparse_jax.nn.FFN`` of a sparse kind) with ``ffn.hot_neurons`` set: the split
  op on its weights ``w`` (``FFN._weights()``: compute dtype). The split was chosen from measured
  statistics when the checkpoint was prepared, so the cold part runs sparse without the per-call
  dispatcher (no probe, no ``lax.cond`` in the hot path); it stays exact on any batch."""
  cfg = dataclasses.replace(ffn.sparse_config, max_active_fraction=None)
  w_up, w_down = w["w_up_FxD"], w["w_down_FxD"]
  w_gate = w["w_gate_FxD"] if ffn.gated else w_up
  return hot_cold_ffn(x, w_gate, w_up if ffn.gated else None, w_down, n_hot=ffn.hot_neurons,
                      implementation=ffn.implementation, config=cfg)


# --------------------------------------------------------------------------- choosing the split


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Per-neuron costs of the two paths (seconds), from H200 measurements at d_model 2048.

  dense_flops_per_s: sustained tensor-core rate of the hot part's up and down matmuls. 760 TFLOP/s
    gives the measured ~0.045 ms per 256 neurons at M = 16384, d_model 2048 (4 d_model FLOPs per
    token and neuron: the gate is computed for every neuron on either path, so it is no cost of
    the choice).
  gather_bytes_per_s: rate of the fused kernel's row gathers from L2: ~0.42 ms for 28 x 16384
    entries of two 4 KB rows (~0.9 ns per entry, ~9 TB/s).
  overflow_tile_entries: a (token, tile) over TwELL capacity is recomputed in the kernel at about
    the cost of gathering this many entries (a whole tile: 256).
  round_to: n_hot is a multiple of this (tensor-core tiles), or all of d_ff.
  capacity, tile: the TwELL format of the cold part (``SparseFFNConfig``'s defaults).
  """

  dense_flops_per_s: float = 760e12
  gather_bytes_per_s: float = 9e12
  overflow_tile_entries: float = 256.0
  round_to: int = 128
  capacity: int = 32
  tile: int = 256
  itemsize: int = 2

  def __post_init__(self):
    for name in ("dense_flops_per_s", "gather_bytes_per_s"):
      if not getattr(self, name) > 0:
        raise ValueError(f"CostModel.{name} must be positive, got {getattr(self, name)!r}")
    if not self.overflow_tile_entries >= 0:
      raise ValueError(f"CostModel.overflow_tile_entries must be >= 0, got "
                       f"{self.overflow_tile_entries!r}")
    for name in ("round_to", "capacity", "tile", "itemsize"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"CostModel.{name} must be a positive int, got {v!r}")

  def dense_s(self, m: int, d_model: int, n_neurons) -> float:
    return m * n_neurons * 4 * d_model / self.dense_flops_per_s

  def gather_s(self, entries, d_model: int) -> float:
    return entries * 2 * d_model * self.itemsize / self.gather_bytes_per_s


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """One layer's split: ``perm[i]`` is the original index of the neuron at row i after permuting;
  rows ``[0, n_hot)`` are hot. ``predicted`` holds the cost model's numbers (seconds at M tokens)."""
  perm: np.ndarray
  n_hot: int
  predicted: dict


def spread_over_tiles(order: np.ndarray, tile: int) -> np.ndarray:
  """Neurons ``order`` (hottest first) laid out so consecutive ranks land in different tiles:
  rank r goes to tile ``r mod n_tiles`` (the last, partial tile skipped once full). Returns the
  neuron index at each position."""
  n = len(order)
  if n == 0:
    return order
  positions = np.arange(n)
  # Fill slot 0 of every tile, then slot 1 of every tile, ...: a round-robin deal.
  deal = np.lexsort((positions // tile, positions % tile))
  out = np.empty_like(order)
  out[deal] = order
  return out


def poisson_tail(lam: np.ndarray, capacity: int) -> np.ndarray:
  """P(count > capacity) for Poisson(lam) counts: the share of tokens whose (tile) overflows,
  treating neurons as firing independently (busy tokens correlate them: a lower bound)."""
  lam = np.maximum(np.asarray(lam, np.float64), 1e-300)
  k = np.arange(capacity + 1)
  log_terms = k[None, :] * np.log(lam)[:, None] - lam[:, None] - np.array(
      [math.lgamma(i + 1) for i in k])[None, :]
  return np.clip(1.0 - np.exp(log_terms).sum(axis=1), 0.0, 1.0)


def cold_cost(freq_sorted_desc: np.ndarray, m: int, d_model: int, cost: CostModel) -> dict:
  """Cost model of the cold part (neurons given by their frequencies, hottest first, laid out by
  ``spread_over_tiles``): gathers + overflow recomputation, in seconds at M tokens."""
  n = len(freq_sorted_desc)
  if n == 0:
    return dict(gather_s=0.0, overflow_s=0.0, overflow_tile_fraction=0.0)
  laid = spread_over_tiles(np.asarray(freq_sorted_desc, np.float64), cost.tile)
  n_tiles = -(-n // cost.tile)
  lam_T = np.bincount(np.arange(n) // cost.tile, weights=laid, minlength=n_tiles)
  over_T = poisson_tail(lam_T, cost.capacity)
  return dict(gather_s=cost.gather_s(m * laid.sum(), d_model),
              overflow_s=cost.gather_s(m * over_T.sum() * cost.overflow_tile_entries, d_model),
              overflow_tile_fraction=float(over_T.mean()))


def split_cost(freq_sorted_desc: np.ndarray, n_hot: int, *, m: int, d_model: int,
               cost: CostModel) -> tuple[float, dict]:
  """(seconds, the cold part's ``cold_cost``) of the split with the ``n_hot`` hottest neurons
  dense, at M tokens (frequencies sorted hottest first)."""
  c = cold_cost(freq_sorted_desc[n_hot:], m, d_model, cost)
  return cost.dense_s(m, d_model, n_hot) + c["gather_s"] + c["overflow_s"], c


def split_order(freq_F: np.ndarray, n_hot: int, cost: CostModel) -> np.ndarray:
  """The neuron order of a split: the ``n_hot`` hottest first (stable: ties keep their index
  order), the rest dealt over the TwELL tiles (``spread_over_tiles``)."""
  order = np.argsort(-np.asarray(freq_F, np.float64), kind="stable")
  return np.concatenate([order[:n_hot], spread_over_tiles(order[n_hot:], cost.tile)])


def plan_layer(freq_F: np.ndarray, *, d_model: int, m: int = 16384,
               cost: CostModel = CostModel()) -> LayerPlan:
  """The split of one layer from its per-neuron firing frequencies (share of tokens, in [0, 1]).

  Candidates are n_hot = 0, round_to, 2 round_to, ..., and d_ff; the hottest neurons go first and
  the choice minimises dense(n_hot) + cold gathers + cold overflow. Ties go to the smaller n_hot.
  Pure function of its arguments (stable sort: equal frequencies keep their index order).
  """
  freq_F = np.asarray(freq_F, np.float64)
  if freq_F.ndim != 1 or freq_F.size == 0:
    raise ValueError(f"freq_F must be a non-empty 1-D array of frequencies, got shape "
                     f"{freq_F.shape}")
  if not np.all(np.isfinite(freq_F)) or freq_F.min() < 0 or freq_F.max() > 1:
    raise ValueError("freq_F must hold firing frequencies in [0, 1] (active tokens / tokens)")
  if m < 1 or d_model < 1:
    raise ValueError(f"m and d_model must be positive, got m={m}, d_model={d_model}")
  d_ff = freq_F.size
  order = np.argsort(-freq_F, kind="stable")
  sorted_f = freq_F[order]
  candidates = sorted(set(range(0, d_ff, cost.round_to)) | {d_ff})
  best = None
  for n_hot in candidates:
    total, c = split_cost(sorted_f, n_hot, m=m, d_model=d_model, cost=cost)
    if best is None or total < best[0] * (1 - 1e-9):
      best = (total, n_hot, c)
  total, n_hot, c = best
  all_sparse = cold_cost(sorted_f, m, d_model, cost)
  perm = split_order(freq_F, n_hot, cost)
  predicted = dict(m=m, total_s=total, hot_dense_s=cost.dense_s(m, d_model, n_hot),
                   cold_gather_s=c["gather_s"], cold_overflow_s=c["overflow_s"],
                   cold_overflow_tile_fraction=c["overflow_tile_fraction"],
                   unsplit_s=all_sparse["gather_s"] + all_sparse["overflow_s"],
                   hot_share_of_activity=float(sorted_f[:n_hot].sum() / max(sorted_f.sum(), 1e-30)))
  return LayerPlan(perm=perm.astype(np.int64), n_hot=int(n_hot), predicted=predicted)


def permute_neurons(perm: np.ndarray, *weights):
  """The weights ``[d_ff, ...]`` with their rows in ``perm``'s order (None stays None)."""
  idx = jnp.asarray(perm)
  return tuple(None if w is None else jnp.take(w, idx, axis=0) for w in weights)
