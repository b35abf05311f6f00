"""Errors of a run that the command line reports in one line (no traceback), like bad input.

Kept free of heavy imports so that ``sparse_jax.cli`` can catch them without importing JAX.
"""


class RunError(RuntimeError):
  """A run cannot go on, for a reason the message states (and says what to do)."""
