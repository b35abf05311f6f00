"""Synthetic FFN problems with calibrated gate sparsity, for tests, demos and benchmarks.

The FFN stays bias-free: feature 0 of every token is a positive constant ``c_i`` (1 unless the
distribution varies it per token) and column 0 of ``w_gate`` holds minus the neuron's threshold,
so ``x @ w_gate.T = s_i * z_i . w_j - c_i * theta_j``. Thresholds are set from empirical
quantiles of the pre-activations, so the mean number of active neurons per token hits the target
on the very inputs returned, and the REAL op sees the activity pattern (nothing is masked).

Neuron profiles (who fires how often; ``firing_probabilities``):

* ``"uniform"``: every neuron fires with the same probability, every token has the same scale.
* ``"skewed"``: like trained models (docs/method.md): ~30% of neurons never fire, the others' firing
  frequencies are log-uniform over three orders of magnitude (a few hot neurons), and each
  token's scale ``s_i`` is log-normal, so per-token activity varies several-fold.
* ``"zipf"``: firing probability of the neuron of rank k proportional to ``k ** -ZIPF_EXPONENT``,
  ranks assigned to neurons in random index order.
* ``"clustered"``: the skewed profile with its hottest neurons adjacent in index, packed into
  ``CLUSTER_TILES`` TwELL tiles of ``tile`` columns (a layer whose hot neurons share a few tiles:
  many rows overflow the per-(row, tile) capacity).

Token profiles (how busy each token is), on top of the skewed neuron profile:

* ``"dense_starts"``: the first token of every ``seq_len`` has 20-40% of all neurons active (as
  real models' sequence starts do), the other tokens are skewed; the mean over all tokens is the
  target.
* ``"heavy_tail"``: per-token active counts log-normal (sigma ``HEAVY_TAIL_SIGMA``) with the
  target mean: a long tail of busy tokens.

Per-token counts are set through ``c_i``: a token fires neuron j iff ``s_i z_i . w_j > c_i
theta_j``, so a smaller ``c_i`` fires more neurons (``c_i = 0``: about half of them); ``c_i`` is
found by bisection on the rounded operands the FFN sees.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Distribution = Literal["uniform", "skewed", "zipf", "clustered", "dense_starts", "heavy_tail"]
DISTRIBUTIONS = ("uniform", "skewed", "zipf", "clustered", "dense_starts", "heavy_tail")
NEURON_PROFILES = ("uniform", "skewed", "zipf", "clustered")
DEAD_FRACTION = 0.3
DEAD_THRESHOLD = 1e4
MAX_FIRING_PROB = 0.9      # hot neurons are clipped here (and the rest rescaled to the target)
SKEWED_TOKEN_SIGMA = 0.2   # log-normal sigma of the skewed per-token scale s_i
ZIPF_EXPONENT = 1.0
CLUSTER_TILES = 2
DENSE_START_FRACTION = (0.2, 0.4)  # active share of a sequence's first token
HEAVY_TAIL_SIGMA = 1.0
SEQ_LEN = 2048


@dataclasses.dataclass(frozen=True)
class FFNProblem:
  x: jax.Array        # [M, d_model]
  w_gate: jax.Array   # [d_ff, d_model], neuron-major
  w_up: jax.Array     # [d_ff, d_model]
  w_down: jax.Array   # [d_ff, d_model]

  def active_per_token(self) -> float:
    """Measured mean active gate neurons per token (as the model computes it, in x.dtype)."""
    return float(jnp.mean(self.active_counts()))

  def active_counts(self) -> jax.Array:
    """[M] int32 active gate neurons of each token."""
    return jnp.sum(self.gate_active(), axis=1, dtype=jnp.int32)

  def gate_active(self) -> jax.Array:
    """[M, d_ff] bool: relu(x @ w_gate.T) != 0 in x.dtype, as the op counts it."""
    pre = jnp.dot(self.x, self.w_gate.T, preferred_element_type=jnp.float32).astype(self.x.dtype)
    return pre > 0


def _default_tile() -> int:
  from sparse_jax.ops import SparseFFNConfig
  return SparseFFNConfig().tile


def _rescale(p: np.ndarray, mean_active: float) -> np.ndarray:
  """``p`` scaled so that it sums to ``mean_active``, hot neurons clipped at MAX_FIRING_PROB."""
  if mean_active > MAX_FIRING_PROB * np.count_nonzero(p):
    raise ValueError(f"mean_active={mean_active} needs more than {MAX_FIRING_PROB} firing "
                     f"probability on each of the {np.count_nonzero(p)} live neurons")
  for _ in range(50):  # as many rounds as before: skewed problems stay bit-identical
    p = np.minimum(p * (mean_active / max(p.sum(), 1e-12)), MAX_FIRING_PROB)
  return p


def firing_probabilities(rng: np.random.Generator, d_ff: int, mean_active: float,
                         distribution: str, *, tile: int | None = None) -> np.ndarray:
  """[d_ff] per-neuron firing probabilities whose sum is ``mean_active`` (active neurons per
  token), for a neuron profile of the module docstring (``uniform``, ``skewed``, ``zipf``,
  ``clustered``; ``tile``: the clustered profile's tile width, default the op's TwELL tile)."""
  if distribution not in NEURON_PROFILES:
    raise ValueError(f"distribution must be one of {', '.join(NEURON_PROFILES)}, got "
                     f"{distribution!r}")
  if distribution == "uniform":
    return np.full(d_ff, mean_active / d_ff)
  if distribution == "zipf":
    rank = rng.permutation(d_ff) + 1  # neuron j has rank rank[j]: hot neurons anywhere
    return _rescale(rank.astype(np.float64) ** -ZIPF_EXPONENT, mean_active)
  alive = rng.random(d_ff) >= DEAD_FRACTION
  logp = rng.uniform(np.log(1e-3), 0.0, size=d_ff)
  p = _rescale(np.where(alive, np.exp(logp), 0.0), mean_active)
  if distribution == "skewed":
    return p
  tile = tile or _default_tile()
  n_hot = CLUSTER_TILES * tile
  if d_ff < n_hot + tile:
    raise ValueError(f"the clustered profile needs d_ff >= {CLUSTER_TILES + 1} tiles of {tile}, "
                     f"got d_ff={d_ff}")
  # The hottest n_hot neurons fill CLUSTER_TILES adjacent tiles at a random tile offset; the
  # others go to the remaining columns in random order.
  by_heat = np.argsort(-p, kind="stable")
  start = tile * int(rng.integers(0, d_ff // tile - CLUSTER_TILES + 1))
  hot_cols = np.arange(start, start + n_hot)
  cold_cols = rng.permutation(np.setdiff1d(np.arange(d_ff), hot_cols))
  out = np.empty(d_ff)
  out[rng.permutation(hot_cols)] = p[by_heat[:n_hot]]
  out[cold_cols] = p[by_heat[n_hot:]]
  return out


def _token_targets(rng: np.random.Generator, distribution: str, m: int, d_ff: int,
                   active_per_token: float, seq_len: int) -> tuple[np.ndarray | None, float]:
  """(per-token active counts to set through c_i, or None for c_i = 1 everywhere; the mean
  active count that the neuron thresholds are fitted for)."""
  if distribution == "dense_starts":
    starts = np.arange(0, m, seq_len)
    lo, hi = DENSE_START_FRACTION
    start_counts = rng.uniform(lo, hi, size=len(starts)) * d_ff
    rest = m - len(starts)
    rest_mean = (active_per_token * m - start_counts.sum()) / max(rest, 1)
    if rest_mean <= 0:
      raise ValueError(f"active_per_token={active_per_token}: too low for dense sequence starts "
                       f"({len(starts)} of {m} tokens with {lo:.0%}-{hi:.0%} of d_ff={d_ff} "
                       "active); use more tokens per sequence start or a higher target")
    targets = np.full(m, np.nan)  # NaN: keep c_i = 1 (the thresholds' own rate)
    targets[starts] = start_counts
    return targets, rest_mean
  if distribution == "heavy_tail":
    cap = 0.45 * d_ff  # c_i = 0 fires about half the neurons: stay below
    mu = np.log(active_per_token) - HEAVY_TAIL_SIGMA ** 2 / 2
    counts = np.exp(mu + HEAVY_TAIL_SIGMA * rng.standard_normal(m))
    for _ in range(50):  # rescale to the target mean after clipping the busiest tokens
      counts = np.clip(counts * (active_per_token / counts.mean()), 0.5, cap)
    return counts, active_per_token
  return None, active_per_token


@jax.jit
def _bisect_row_constants(pre_MxF, theta_F, target_M):
  """c [M] in [0, 8] with #{j: pre_ij > c_i theta_j} ~ target_i (NaN target: c_i = 1)."""
  def count(c_M):
    return jnp.sum(pre_MxF > c_M[:, None] * theta_F[None, :], axis=1)

  def step(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    many = count(mid) > target_M  # too many active: raise c
    return jnp.where(many, mid, lo), jnp.where(many, hi, mid)

  m = pre_MxF.shape[0]
  lo, hi = jax.lax.fori_loop(0, 40, step, (jnp.zeros((m,)), jnp.full((m,), 8.0)))
  return jnp.where(jnp.isnan(target_M), 1.0, 0.5 * (lo + hi))


def make_ffn_problem(key: jax.Array, m: int, d_model: int, d_ff: int, *,
                     active_per_token: float, distribution: Distribution = "uniform",
                     dtype=jnp.bfloat16, seq_len: int = SEQ_LEN,
                     tile: int | None = None) -> FFNProblem:
  """Random inputs and weights whose gate has about ``active_per_token`` active neurons per token,
  arranged as ``distribution`` (module docstring) says. ``seq_len``: tokens per sequence
  (``dense_starts``); ``tile``: the clustered profile's tile width (default the op's)."""
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got "
                     f"{distribution!r}")
  if not 0 < active_per_token <= d_ff:
    raise ValueError(f"active_per_token must be in (0, d_ff={d_ff}], got {active_per_token}")
  if d_model < 2:
    raise ValueError("d_model must be at least 2 (feature 0 carries the thresholds)")
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  k_z, k_s, k_g, k_u, k_d, k_np = jax.random.split(key, 6)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(k_np)).ravel())
  z = jax.random.normal(k_z, (m, d_model - 1), jnp.float32)
  if distribution != "uniform":
    z = z * jnp.exp(SKEWED_TOKEN_SIGMA * jax.random.normal(k_s, (m, 1), jnp.float32))
  z = z.astype(dtype)
  w = (jax.random.normal(k_g, (d_ff, d_model - 1), jnp.float32) / np.sqrt(d_model - 1)).astype(dtype)
  # Pre-activations without thresholds, from the rounded operands the FFN will see.
  pre = jnp.dot(z.astype(jnp.float32), w.astype(jnp.float32).T)
  targets, neuron_mean = _token_targets(rng, distribution, m, d_ff, active_per_token, seq_len)
  profile = distribution if distribution in NEURON_PROFILES else "skewed"
  p = firing_probabilities(rng, d_ff, neuron_mean, profile, tile=tile)
  # theta_j: the order statistic with about p_j * M values above it (as before the new
  # distributions, so uniform and skewed problems are unchanged).
  ranks = np.clip(np.floor((1.0 - p) * m).astype(np.int64), 0, m - 1)
  theta = jnp.take_along_axis(jnp.sort(pre, axis=0), jnp.asarray(ranks)[None, :], axis=0)[0]
  theta = jnp.where(jnp.asarray(p) > 0, theta, DEAD_THRESHOLD).astype(dtype)
  c = jnp.ones((m,), jnp.float32)
  if targets is not None:
    c = _bisect_row_constants(pre, theta.astype(jnp.float32), jnp.asarray(targets, jnp.float32))
  x = jnp.concatenate([c[:, None].astype(dtype), z], axis=1)
  w_gate = jnp.concatenate([(-theta)[:, None], w], axis=1)
  w_up = (jax.random.normal(k_u, (d_ff, d_model), jnp.float32) / np.sqrt(d_model)).astype(dtype)
  scale = 1.0 / np.sqrt(max(active_per_token, 1.0))
  w_down = (jax.random.normal(k_d, (d_ff, d_model), jnp.float32) * scale).astype(dtype)
  return FFNProblem(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down)


# Gate pre-activations within this share of |x| . |w_g| of zero are ReLU ties for gradient checks:
# a bf16 tensor-core GEMM accumulates in an order (and, on Hopper's wgmma, with an alignment) that
# differs from the float32 reference by up to ~1e-6 of |x| . |w_g| (measured on an H200: a Zipf
# ~11 problem at M = 16384 has 48 entries under 1e-6 and its dx error was 1.7e-2, the size that
# ~50 flipped neurons predict; the XLA op on the CPU, whose mask agrees, gave 3.4e-3). A flipped
# neuron moves its token's gate gradient by a whole term (dh * u * w_g, independent of how small
# the pre-activation was), so such entries say nothing about a kernel's accuracy.
GATE_TIE_TOL = 1e-5


@jax.jit
def _tie_rows_chunk(x_CxD, w_FxD, tol):
  x, w = x_CxD.astype(jnp.float32), w_FxD.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    pre = x @ w.T
    scale = jnp.abs(x) @ jnp.abs(w).T
  return jnp.any(jnp.abs(pre) < tol * scale, axis=1)


def gate_tie_rows(x_MxD: jax.Array, w_gate_FxD: jax.Array, tol: float = GATE_TIE_TOL,
                  chunk: int = 4096) -> jax.Array:
  """bool [M]: rows of x with a gate pre-activation ``|x_i . w_j| < tol * |x_i| . |w_j|`` (in
  float32 at full precision, ``chunk`` rows at a time)."""
  return jnp.concatenate([_tie_rows_chunk(x_MxD[i:i + chunk], w_gate_FxD, tol)
                          for i in range(0, x_MxD.shape[0], chunk)])


def tie_free_cotangent(cot_MxD: jax.Array, x_MxD: jax.Array, w_gate_FxD: jax.Array,
                       tol: float = GATE_TIE_TOL) -> tuple[jax.Array, int]:
  """The cotangent with the rows of ``gate_tie_rows`` set to zero (those tokens then add nothing
  to any gradient but the L1 term's), and how many rows that was. Gradient checks against a
  float32 reference use it: every other row is compared in full."""
  tied = gate_tie_rows(x_MxD, w_gate_FxD, tol)
  return jnp.where(tied[:, None], 0, cot_MxD).astype(cot_MxD.dtype), int(jnp.sum(tied))
