"""Checkpoint evaluation: perplexity, where the FFN sparsity lives, zero-shot multiple choice."""
from sparse_jax.eval.evaluate import EvalOptions, evaluate_checkpoint
from sparse_jax.eval.lm import SparsityAccumulator, active_per_token, evaluate_lm, token_stats
from sparse_jax.checkpoints import Loaded, load_model as load_checkpoint
from sparse_jax.eval.multiple_choice import evaluate_task, load_task, loglikelihoods

__all__ = ["EvalOptions", "Loaded", "SparsityAccumulator", "active_per_token",
           "evaluate_checkpoint", "evaluate_lm", "evaluate_task", "load_checkpoint", "load_task",
           "loglikelihoods", "token_stats"]
