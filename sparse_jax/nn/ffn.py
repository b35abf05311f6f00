"""FFN variants of the decoder block, all with neuron-major weights ``[d_ff, d_model]``.

* ``relu_sparse``: the paper's ``relu(x Wg^T) * (x Wu^T) @ Wd`` through ``sparse_jax.ops``.
* ``relu_nongated_sparse``: ``relu(x Wu^T) @ Wd`` through ``sparse_jax.ops.sparse_ffn``.
* ``relu_dense``: the same gated FFN as ``relu_sparse`` computed densely (the baseline).
* ``silu_dense``: the usual Llama SwiGLU FFN.

Every variant sows its ``FFNStats`` (L0, L1, per-neuron activity, overflow) as an
``nnx.Intermediate`` named ``ffn_stats``; ``sparse_jax.nn.forward_with_stats`` collects them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax import ops
from sparse_jax.nn.layers import F32, normal
from sparse_jax.ops.dense import gate_activation, matmul_nn, matmul_nt

STATS_NAME = "ffn_stats"
SPARSE_KINDS = ("relu_sparse", "relu_nongated_sparse")


def dense_stats(h_MxN: jax.Array) -> ops.FFNStats:
  """FFNStats of a dense FFN's hidden activations (same definitions as the sparse op's)."""
  active_MxN = h_MxN != 0
  return ops.FFNStats(
      l0=jnp.mean(jnp.sum(active_MxN, axis=1, dtype=F32)),
      l1=jnp.mean(jnp.abs(h_MxN.astype(F32))),
      overflow_rows=jnp.zeros((), jnp.int32),
      dense_fallback=jnp.zeros((), bool),
      active_per_neuron=jnp.sum(active_MxN, axis=0, dtype=jnp.int32))


def _capturing(module: nnx.Module) -> bool:
  # Sow only under nnx.capture. Outside it flax would store the stats as module attributes (a
  # deprecated path) that then leak into nnx.state(model); plain model(x) should stay pure.
  return hasattr(module, "__captures__")


class FFN(nnx.Module):

  def __init__(self, d_model: int, d_ff: int, *, kind: str, implementation: str,
               ell_width: int, out_std_scale: float, compute_dtype, param_dtype,
               rngs: nnx.Rngs, gate_threshold: float = 0.0):
    self.kind = kind
    self.gated = kind != "relu_nongated_sparse"
    self.implementation = None if implementation == "auto" else implementation
    self.gate_threshold = gate_threshold  # FATReLU (ops.dense.gate_activation); 0: ReLU
    self.sparse_config = ops.SparseFFNConfig(ell_width=ell_width, gate_threshold=gate_threshold)
    self.compute_dtype = compute_dtype
    self.param_dtype = param_dtype
    if self.gated:
      self.w_gate_FxD = normal(rngs, (d_ff, d_model), d_model ** -0.5, param_dtype)
    self.w_up_FxD = normal(rngs, (d_ff, d_model), d_model ** -0.5, param_dtype)
    self.w_down_FxD = normal(rngs, (d_ff, d_model), out_std_scale * d_ff ** -0.5, param_dtype)

  @property
  def gate_param(self) -> nnx.Param:
    """The weight whose ReLU decides which neurons fire (the up projection when not gated)."""
    return self.w_gate_FxD if self.gated else self.w_up_FxD

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dt = self.compute_dtype
    x = x_BxLxD.astype(dt)
    w_up, w_down = self.w_up_FxD[...].astype(dt), self.w_down_FxD[...].astype(dt)
    if self.kind == "relu_sparse":
      y, stats = ops.gated_sparse_ffn(x, self.w_gate_FxD[...].astype(dt), w_up, w_down,
                                      implementation=self.implementation,
                                      config=self.sparse_config)
    elif self.kind == "relu_nongated_sparse":
      y, stats = ops.sparse_ffn(x, w_up, w_down, implementation=self.implementation,
                                config=self.sparse_config)
    else:
      x_MxD = x.reshape(-1, x.shape[-1])
      h_MxF = self.activation(matmul_nt(x_MxD, self.w_gate_FxD[...].astype(dt))) \
          * matmul_nt(x_MxD, w_up)
      y = matmul_nn(h_MxF.astype(dt), w_down).astype(dt).reshape(x.shape)
      stats = dense_stats(h_MxF)
    if _capturing(self):
      self.sow(nnx.Intermediate, STATS_NAME, stats)
    return y

  def activation(self, pre: jax.Array) -> jax.Array:
    """The gate activation of this FFN's kind on pre-activations."""
    if self.kind == "silu_dense":
      return jax.nn.silu(pre)
    return gate_activation(pre, self.gate_threshold)

  def reinit_gate_rows(self, dead_F: jax.Array, key: jax.Array) -> None:
    """Re-draws the gate rows of the neurons flagged in ``dead_F`` from the initial distribution.

    A dead ReLU neuron gets no gradient through its gate ever again; fresh gate weights give it a
    chance to fire. Its up and down rows are kept (they only matter once it fires).
    """
    w = self.gate_param
    fresh = (w.shape[1] ** -0.5 * jax.random.normal(key, w.shape, F32)).astype(w.dtype)
    w[...] = jnp.where(dead_F[:, None], fresh, w[...])
