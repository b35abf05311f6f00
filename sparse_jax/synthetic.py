"""Synthetic FFN problems with calibrated gate sparsity, for tests, demos and benchmarks.

The FFN stays bias-free: feature 0 of every token is the constant 1 and column 0 of ``w_gate``
holds minus the neuron's threshold, so ``x @ w_gate.T = s_i * z_i . w_j - theta_j``. Thresholds are
set from empirical quantiles of the pre-activations, so the mean number of active neurons per token
hits the target on the very inputs returned.

* ``"uniform"``: every neuron fires with the same probability, every token has the same scale.
* ``"skewed"``: like trained models (docs/method.md): ~30% of neurons never fire, the others'
  firing frequencies are log-uniform over three orders of magnitude (a few hot neurons), and each
  token's scale ``s_i`` is log-normal, so per-token activity varies several-fold (long tail of busy
  tokens).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Distribution = Literal["uniform", "skewed"]
DEAD_FRACTION = 0.3
DEAD_THRESHOLD = 1e4


@dataclasses.dataclass(frozen=True)
class FFNProblem:
  x: jax.Array        # [M, d_model]
  w_gate: jax.Array   # [d_ff, d_model], neuron-major
  w_up: jax.Array     # [d_ff, d_model]
  w_down: jax.Array   # [d_ff, d_model]

  def active_per_token(self) -> float:
    """Measured mean active gate neurons per token (as the model computes it, in x.dtype)."""
    pre = jnp.dot(self.x, self.w_gate.T, preferred_element_type=jnp.float32).astype(self.x.dtype)
    return float(jnp.mean(jnp.sum(pre > 0, axis=1)))


def firing_probabilities(rng: np.random.Generator, d_ff: int, mean_active: float,
                         distribution: Distribution) -> np.ndarray:
  """[d_ff] per-neuron firing probabilities whose sum is ``mean_active`` (active neurons per
  token): all equal (``"uniform"``) or the ``"skewed"`` profile of the module docstring."""
  if distribution not in ("uniform", "skewed"):
    raise ValueError(f"distribution must be 'uniform' or 'skewed', got {distribution!r}")
  target = mean_active / d_ff
  if distribution == "uniform":
    return np.full(d_ff, target)
  alive = rng.random(d_ff) >= DEAD_FRACTION
  logp = rng.uniform(np.log(1e-3), 0.0, size=d_ff)
  p = np.where(alive, np.exp(logp), 0.0)
  for _ in range(50):  # rescale to the target mean, clipping hot neurons at 0.9
    p = np.minimum(p * (mean_active / max(p.sum(), 1e-12)), 0.9)
  return p


def make_ffn_problem(key: jax.Array, m: int, d_model: int, d_ff: int, *,
                     active_per_token: float, distribution: Distribution = "uniform",
                     dtype=jnp.bfloat16) -> FFNProblem:
  """Random inputs and weights whose gate has about ``active_per_token`` active neurons per token."""
  if distribution not in ("uniform", "skewed"):
    raise ValueError(f"distribution must be 'uniform' or 'skewed', got {distribution!r}")
  if not 0 < active_per_token <= d_ff:
    raise ValueError(f"active_per_token must be in (0, d_ff={d_ff}], got {active_per_token}")
  if d_model < 2:
    raise ValueError("d_model must be at least 2 (feature 0 carries the thresholds)")
  k_z, k_s, k_g, k_u, k_d, k_np = jax.random.split(key, 6)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(k_np)).ravel())
  z = jax.random.normal(k_z, (m, d_model - 1), jnp.float32)
  if distribution == "skewed":
    z = z * jnp.exp(0.2 * jax.random.normal(k_s, (m, 1), jnp.float32))
  x = jnp.concatenate([jnp.ones((m, 1), jnp.float32), z], axis=1).astype(dtype)
  w = (jax.random.normal(k_g, (d_ff, d_model - 1), jnp.float32) / np.sqrt(d_model - 1)).astype(dtype)
  # Pre-activations without thresholds, from the rounded operands the FFN will see.
  pre = jnp.dot(x[:, 1:].astype(jnp.float32), w.astype(jnp.float32).T)
  p = firing_probabilities(rng, d_ff, active_per_token, distribution)
  ranks = np.clip(np.floor((1.0 - p) * m).astype(np.int64), 0, m - 1)
  theta = jnp.take_along_axis(jnp.sort(pre, axis=0), jnp.asarray(ranks)[None, :], axis=0)[0]
  theta = jnp.where(jnp.asarray(p) > 0, theta, DEAD_THRESHOLD)
  w_gate = jnp.concatenate([(-theta)[:, None].astype(dtype), w], axis=1)
  w_up = (jax.random.normal(k_u, (d_ff, d_model), jnp.float32) / np.sqrt(d_model)).astype(dtype)
  scale = 1.0 / np.sqrt(max(active_per_token, 1.0))
  w_down = (jax.random.normal(k_d, (d_ff, d_model), jnp.float32) * scale).astype(dtype)
  return FFNProblem(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down)
