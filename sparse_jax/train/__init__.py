"""Training: loss with L1 sparsity, AdamW, jitted steps, sparsity tracking, checkpoints, loop."""
# The run loader lives with the other checkpoint loaders; re-exported for existing callers.
from sparse_jax.checkpoints import load_run as load_model
from sparse_jax.train.checkpoint import Checkpointer
from sparse_jax.train.loop import evaluate, resolve_config, train
from sparse_jax.train.loss import (cross_entropy, head_cross_entropy, l1_coeff_at, l1_penalty,
                                   lm_loss)
from sparse_jax.train.optimizer import lr_schedule, make_optimizer
from sparse_jax.train.sparsity import SparsityTracker, init_tracker, update_tracker
from sparse_jax.train.step import TrainState, eval_step, init_state, train_step

__all__ = ["Checkpointer", "SparsityTracker", "TrainState", "cross_entropy", "eval_step",
           "evaluate", "head_cross_entropy", "init_state", "init_tracker", "l1_coeff_at", "l1_penalty", "lm_loss",
           "load_model", "lr_schedule", "make_optimizer", "resolve_config", "train",
           "train_step", "update_tracker"]
