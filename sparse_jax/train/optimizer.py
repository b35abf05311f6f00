"""AdamW with linear warm-up then cosine decay, and global-norm gradient clipping."""
from __future__ import annotations

import jax
import optax

from sparse_jax.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """0 -> lr over warmup_steps, then cosine to lr * min_lr_ratio at ``steps``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def _decay_mask(params):
  # Matrices decay; norm scales (vectors) do not: shrinking a gain towards 0 is not regularisation.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=_decay_mask))
