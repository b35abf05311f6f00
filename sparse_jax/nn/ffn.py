"""FFN variants of the decoder block, all with neuron-major weights ``[d_ff, d_model]``.

* ``relu_sparse``: the paper's ``relu(x Wg^T) * (x Wu^T) @ Wd`` through ``sparse_jax.ops``.
* ``relu_nongated_sparse``: ``relu(x Wu^T) @ Wd`` through ``sparse_jax.ops.sparse_ffn``.
* ``relu_dense``: the same gated FFN as ``relu_sparse`` computed densely (the baseline).
* ``silu_dense``: the usual Llama SwiGLU FFN.
* ``relu_dense_bf16``: ``relu_dense`` as a bf16 model computes it (every matmul output in the
  compute dtype): the benchmarks' dense baseline, same parameters as ``relu_dense``.
The dense kinds are ``sparse_jax.ops.dense.ffn`` (f32 hidden activations) and
``sparse_jax.ops.dense.ffn_as_model``.

The ReLU kinds' gate is FATReLU when ``sparse.gate_threshold`` is positive (a neuron is active iff
its pre-activation exceeds the threshold; ``sparse_jax.ops.dense.gate_activation``).

Every variant sows its ``FFNStats`` (L0, L1, per-neuron activity, overflow) as an
``nnx.Intermediate`` named ``ffn_stats``; ``sparse_jax.nn.forward_with_stats`` collects them.

Under a device mesh (``mesh`` given at construction) a sparse kind runs its op per device
(``sparse_jax.parallel.ffn.per_device``): the op's formats and fallbacks are built over the tokens
of one call and the Pallas kernels are per-device calls, so the compiler cannot partition it.
Dense kinds are partitioned by the compiler like the rest of the model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sparse_jax import ops
from sparse_jax.nn.layers import F32, normal
from sparse_jax.ops import dense, hotcold
from sparse_jax.ops.dense import hidden_stats as dense_stats  # noqa: F401  (public name)
from sparse_jax.parallel.ffn import per_device

STATS_NAME = "ffn_stats"
SPARSE_KINDS = ("relu_sparse", "relu_nongated_sparse")
# kind -> (activation, the matmul outputs kept in the compute dtype)
DENSE_KINDS = {"relu_dense": ("relu", False), "silu_dense": ("silu", False),
               "relu_dense_bf16": ("relu", True)}


def _capturing(module: nnx.Module) -> bool:
  # Sow only under nnx.capture. Outside it flax would store the stats as module attributes (a
  # deprecated path) that then leak into nnx.state(model); plain model(x) should stay pure.
  return hasattr(module, "__captures__")


class FFN(nnx.Module):

  def __init__(self, d_model: int, d_ff: int, *, kind: str, implementation: str,
               out_std_scale: float, compute_dtype, param_dtype, rngs: nnx.Rngs,
               sparse: ops.SparseFFNConfig | None = None, mesh: Mesh | None = None,
               hot_neurons: int | None = None):
    if kind not in SPARSE_KINDS and kind not in DENSE_KINDS:
      raise ValueError(f"kind must be one of {', '.join(SPARSE_KINDS + tuple(DENSE_KINDS))}, "
                       f"got {kind!r}")
    self.kind = kind
    self.gated = kind != "relu_nongated_sparse"
    self.implementation = None if implementation == "auto" else implementation
    self.sparse_config = sparse or ops.SparseFFNConfig()
    if self.gate_threshold != 0 and kind == "silu_dense":
      raise ValueError(f"sparse.gate_threshold={self.gate_threshold} (FATReLU) applies to the "
                       "ReLU kinds, not silu_dense")
    # A prepared checkpoint (``sparse-jax prepare-inference``) computes neurons [0, hot_neurons)
    # densely and the rest through the sparse op (ops.hotcold); None: the plain op.
    self.hot_neurons = hot_neurons if kind in SPARSE_KINDS else None
    self.compute_dtype = compute_dtype
    self.param_dtype = param_dtype
    # Only the sparse kinds need the mesh (their op runs per device); the dense kinds are left to
    # the compiler's partitioning.
    self.mesh = mesh if kind in SPARSE_KINDS else None
    if self.gated:
      self.w_gate_FxD = normal(rngs, (d_ff, d_model), d_model ** -0.5, param_dtype)
    self.w_up_FxD = normal(rngs, (d_ff, d_model), d_model ** -0.5, param_dtype)
    self.w_down_FxD = normal(rngs, (d_ff, d_model), out_std_scale * d_ff ** -0.5, param_dtype)

  @property
  def gate_threshold(self) -> float:
    """FATReLU threshold of the gate (``ops.dense.gate_activation``); 0: ReLU."""
    return self.sparse_config.gate_threshold

  def activation(self, pre: jax.Array) -> jax.Array:
    """The gate activation of this FFN's kind on pre-activations."""
    if self.kind == "silu_dense":
      return jax.nn.silu(pre)
    return dense.gate_activation(pre, self.gate_threshold)

  @property
  def gate_param(self) -> nnx.Param:
    """The weight whose ReLU decides which neurons fire (the up projection when not gated)."""
    return self.w_gate_FxD if self.gated else self.w_up_FxD

  def _weights(self) -> dict[str, jax.Array]:
    """The weights in the compute dtype (under a mesh: cast before the per-device map, so the
    FSDP all-gather moves compute-dtype weights)."""
    names = ("w_gate_FxD",) * self.gated + ("w_up_FxD", "w_down_FxD")
    return {n: getattr(self, n)[...].astype(self.compute_dtype) for n in names}

  def compute(self, x_BxLxD: jax.Array, w: dict[str, jax.Array]
              ) -> tuple[jax.Array, ops.FFNStats]:
    """(y, FFNStats) of this FFN kind with weights ``w`` (``_weights()``), on one device."""
    x = x_BxLxD.astype(self.compute_dtype)
    if self.hot_neurons is not None:
      return hotcold.prepared_ffn(self, x, w)
    if self.kind == "relu_sparse":
      return ops.gated_sparse_ffn(x, w["w_gate_FxD"], w["w_up_FxD"], w["w_down_FxD"],
                                  implementation=self.implementation, config=self.sparse_config)
    if self.kind == "relu_nongated_sparse":
      return ops.sparse_ffn(x, w["w_up_FxD"], w["w_down_FxD"], implementation=self.implementation,
                            config=self.sparse_config)
    y_MxD, h_MxF = self._dense(x.reshape(-1, x.shape[-1]), w)
    return y_MxD.reshape(x.shape), dense_stats(h_MxF)

  def _dense(self, x_MxD, w) -> tuple[jax.Array, jax.Array]:
    activation, as_model = DENSE_KINDS[self.kind]
    args = (x_MxD, w["w_gate_FxD"], w["w_up_FxD"], w["w_down_FxD"])
    if as_model:
      y_MxD, h_MxF, _ = dense.ffn_as_model(*args, activation=activation,
                                           threshold=self.gate_threshold)
      return y_MxD, h_MxF
    return dense.ffn(*args, activation=activation, threshold=self.gate_threshold)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    if self.mesh is None:
      y, stats = self.compute(x_BxLxD, self._weights())
    else:
      y, stats = per_device(self.compute, self.mesh, x_BxLxD, self._weights())
    if _capturing(self):
      self.sow(nnx.Intermediate, STATS_NAME, stats)
    return y

  def active_mask(self, x_BxLxD: jax.Array) -> jax.Array:
    """[B * L, d_ff] bool: the neurons active on each token, as this kind's stats count them (the
    sparse kinds: the (FAT)ReLU gate rounded to the compute dtype is nonzero; the dense kinds: the
    hidden activation is nonzero)."""
    dt = self.compute_dtype
    x_MxD = x_BxLxD.astype(dt).reshape(-1, x_BxLxD.shape[-1])
    if self.kind in SPARSE_KINDS:
      return dense.hidden(x_MxD, self.gate_param[...].astype(dt),
                          threshold=self.gate_threshold).astype(dt) != 0
    return self._dense(x_MxD, self._weights())[1] != 0

  def reinit_gate_rows(self, dead_F: jax.Array, key: jax.Array) -> None:
    """Re-draws the gate rows of the neurons flagged in ``dead_F`` from the initial distribution.

    A dead ReLU neuron gets no gradient through its gate ever again; fresh gate weights give it a
    chance to fire. Its up and down rows are kept (they only matter once it fires).
    """
    w = self.gate_param
    fresh = (w.shape[1] ** -0.5 * jax.random.normal(key, w.shape, F32)).astype(w.dtype)
    w[...] = jnp.where(dead_F[:, None], fresh, w[...])
