"""Moved to ``sparse_jax.checkpoints`` (checkpoint loading in one place); kept for imports."""
from sparse_jax.checkpoints import Loaded, is_run_dir, load_model as load_checkpoint, rebuild

__all__ = ["Loaded", "is_run_dir", "load_checkpoint", "rebuild"]
