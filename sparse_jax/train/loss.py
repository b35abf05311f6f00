"""Language-model loss: cross-entropy plus coeff x L1 of the FFN hidden activations.

Two normalisations of the L1 term, named for what they average (``TrainConfig.l1_norm``):

* ``"mean"``: the paper's formula, mean |h| over tokens AND neurons, averaged over layers
  (= ``FFNStats.l1`` averaged over layers).
* ``"sum_neurons"``: the released code's, sum of |h| over the d_ff neurons, mean over tokens, mean
  over layers (= d_ff x the "mean" value). Its coefficients are d_ff times smaller for the same
  penalty: the released checkpoints' 2e-5 is a "sum_neurons" coefficient, i.e. 2e-5 x 5632 =
  0.113 in "mean" at the paper's d_ff.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sparse_jax.config import TrainConfig

F32 = jnp.float32


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats (fp32)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(F32), targets_BxL))


def l1_penalty(l1_per_layer: jax.Array, *, norm: str, d_ff: int) -> jax.Array:
  """The L1 term from per-layer ``FFNStats.l1`` values (mean |h| per layer) in ``norm``."""
  mean_over_layers = jnp.mean(l1_per_layer)
  if norm == "mean":
    return mean_over_layers
  if norm == "sum_neurons":
    return mean_over_layers * d_ff
  raise ValueError(f"l1 norm must be 'mean' or 'sum_neurons', got {norm!r}")


def l1_coeff_at(step: jax.Array, cfg: TrainConfig) -> jax.Array:
  """The L1 coefficient at ``step``: a linear ramp from 0 over l1_warmup_steps, then constant."""
  if cfg.l1_warmup_steps == 0:
    return jnp.asarray(cfg.l1_coeff, F32)
  ramp = jnp.minimum(jnp.asarray(step, F32) / cfg.l1_warmup_steps, 1.0)
  return cfg.l1_coeff * ramp


def lm_loss(logits_BxLxV, targets_BxL, l1_per_layer, *, coeff, norm: str, d_ff: int):
  """(total loss, (cross-entropy, L1 term)) with total = ce + coeff * L1."""
  ce = cross_entropy(logits_BxLxV, targets_BxL)
  l1 = l1_penalty(l1_per_layer, norm=norm, d_ff=d_ff)
  return ce + coeff * l1, (ce, l1)
