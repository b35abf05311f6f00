"""IEEE semantics of the sparse FFN on non-finite inputs: exactly the dense FFN's.

A row of x holding +-Inf or NaN makes gate pre-activations +-Inf or NaN. The dense FFN multiplies
every neuron, so an inactive one (relu(-Inf) = 0) gives 0 * Inf = NaN in the gated FFN and the whole
output row is NaN; the sparse formats drop inactive neurons and would instead return +-Inf or a
partial NaN pattern. The exact rule is the cheapest one: such rows are taken from the dense FFN.
The check is one reduction over x; the dense FFN runs only when some row is non-finite
(``lax.cond``), so finite inputs cost nothing more. Used at the custom_vjp boundary of every
backend (inference primal and training forward), so the backward sees the same output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_jax.ops.dense import ffn_with_l1


def nonfinite_rows(x_MxD: jax.Array) -> jax.Array:
  """[M] bool: rows holding +-Inf or NaN."""
  return ~jnp.all(jnp.isfinite(x_MxD), axis=1)


def with_dense_nonfinite_rows(x_MxD, w_gate, w_up, w_down, y_MxD):
  """``y_MxD`` with the rows whose x is not finite replaced by the dense FFN's rows
  (``w_up=None``: the non-gated FFN). Exact: those rows are what dense computes."""
  bad_M = nonfinite_rows(x_MxD)

  def dense_rows():
    y_dense, _ = ffn_with_l1(x_MxD, w_gate, w_up, w_down)
    return jnp.where(bad_M[:, None], y_dense.astype(y_MxD.dtype), y_MxD)

  return jax.lax.cond(jnp.any(bad_M), dense_rows, lambda: y_MxD)
