"""Public sparse FFN ops: argument checks, backend choice, shape plumbing.

Weight layout (explicit, one row per hidden neuron, the paper's G, K, V)::

    w_gate  [d_ff, d_model]     h = relu(x @ w_gate.T) * (x @ w_up.T)
    w_up    [d_ff, d_model]     y = h @ w_down
    w_down  [d_ff, d_model]

A Flax ``nnx.Linear(d_model, d_ff)`` kernel is ``[d_model, d_ff]``: pass its transpose.
"""
from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp

from sparse_jax.ops import decode, reference
from sparse_jax.ops.config import FFNStats, SparseFFNConfig

Implementation = Literal["xla", "pallas"] | None
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# name -> (gated_fn(x, wg, wu, wd, cfg), relu_fn(x, wu, wd, cfg), supports(x, weights, cfg) -> str|None)
_BACKENDS: dict[str, tuple[Callable, Callable, Callable]] = {
    "xla": (reference.gated_ffn_xla, reference.relu_ffn_xla, lambda *a: None),
}


def register_backend(name: str, gated_fn: Callable, relu_fn: Callable, supports: Callable) -> None:
  """Adds a backend. ``supports(x_MxD, weights, cfg)`` returns None if the backend can run these
  arguments here, else the reason it cannot (then ``implementation=None`` falls back to XLA)."""
  _BACKENDS[name] = (gated_fn, relu_fn, supports)


def _load_pallas() -> None:
  if "pallas" not in _BACKENDS:
    try:
      from pallas_kernels import ffn_backend  # noqa: F401  (registers itself)
    except ImportError:
      pass


def available_implementations() -> list[str]:
  _load_pallas()
  return list(_BACKENDS)


def _check_array(name: str, a, ndim: int | None = None) -> None:
  if not hasattr(a, "shape") or not hasattr(a, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(a).__name__}")
  if ndim is not None and a.ndim != ndim:
    raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
  if not any(jnp.dtype(a.dtype) == jnp.dtype(d) for d in _FLOAT_DTYPES):
    raise TypeError(f"{name} must be float32, bfloat16 or float16, got {a.dtype}")


def _check_weights(x, named_weights: list[tuple[str, jax.Array]]) -> None:
  _check_array("x", x)
  if x.ndim < 1:
    raise ValueError("x must have a feature axis: shape [..., d_model]")
  d_model = x.shape[-1]
  if x.size == 0:
    raise ValueError(f"x has no tokens (shape {tuple(x.shape)})")
  d_ff = None
  for name, w in named_weights:
    _check_array(name, w, ndim=2)
    if w.shape[1] != d_model:
      hint = ""
      if w.shape[0] == d_model:
        hint = (f" It looks like the [d_model, d_ff] layout; sparse_jax weights are neuron-major "
                f"[d_ff, d_model]: pass {name}.T.")
      raise ValueError(f"{name} must have shape [d_ff, d_model={d_model}] (one row per hidden "
                       f"neuron), got {tuple(w.shape)}.{hint}")
    if d_ff is None:
      d_ff = w.shape[0]
    elif w.shape[0] != d_ff:
      raise ValueError(f"{name} has d_ff={w.shape[0]} rows but {named_weights[0][0]} has {d_ff}")
    if jnp.dtype(w.dtype) != jnp.dtype(x.dtype):
      raise TypeError(f"{name} has dtype {w.dtype} but x has {x.dtype}; cast them to one compute "
                      "dtype (e.g. bf16 weights and activations, f32 master weights outside)")


def _resolve(implementation: Implementation, x_MxD, weights, cfg) -> str:
  if implementation not in ("xla", "pallas", None):
    raise ValueError(f"implementation must be 'xla', 'pallas' or None, got {implementation!r}")
  _load_pallas()
  if implementation == "xla":
    return "xla"
  if "pallas" not in _BACKENDS:
    if implementation == "pallas":
      raise NotImplementedError("the Pallas backend is not available in this installation")
    return "xla"
  reason = _BACKENDS["pallas"][2](x_MxD, weights, cfg)
  if reason is None:
    return "pallas"
  if implementation == "pallas":
    raise NotImplementedError(f"the Pallas backend cannot run this call: {reason}")
  return "xla"


def gated_sparse_ffn(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
                     implementation: Implementation = None,
                     config: SparseFFNConfig | None = None) -> tuple[jax.Array, FFNStats]:
  """ReLU-gated sparse FFN ``relu(x Wg^T) * (x Wu^T) @ Wd`` on ``x [..., d_model]``.

  Returns ``(y [..., d_model], FFNStats)``; ``stats.l1`` is differentiable (add ``coeff * l1`` to
  the loss to train sparsity). ``implementation``: ``"xla"`` (reference, any backend),
  ``"pallas"`` (Hopper kernels; raises ``NotImplementedError`` where they cannot run) or ``None``
  (the fastest that can run, falling back to XLA; calls of at most ``config.decode_max_tokens``
  tokens take the decode path of ``sparse_jax.ops.decode`` when its union capacity pays).
  """
  _check_weights(x, [("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)])
  cfg = config or SparseFFNConfig()
  lead, d_model = x.shape[:-1], x.shape[-1]
  x_MxD = x.reshape(-1, d_model)
  if implementation is None and decode.use_decode(x_MxD.shape[0], w_gate.shape[0], cfg):
    y, stats = decode.gated_ffn_decode(x_MxD, w_gate, w_up, w_down, cfg)  # few tokens: generation
    return y.reshape(*lead, d_model), stats
  backend = _resolve(implementation, x_MxD, (w_gate, w_up, w_down), cfg)
  y, stats = _BACKENDS[backend][0](x_MxD, w_gate, w_up, w_down, cfg)
  return y.reshape(*lead, d_model), stats


def sparse_ffn(x: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
               implementation: Implementation = None,
               config: SparseFFNConfig | None = None) -> tuple[jax.Array, FFNStats]:
  """Non-gated sparse FFN ``relu(x Wu^T) @ Wd``; same conventions as ``gated_sparse_ffn``."""
  _check_weights(x, [("w_up", w_up), ("w_down", w_down)])
  cfg = config or SparseFFNConfig()
  lead, d_model = x.shape[:-1], x.shape[-1]
  x_MxD = x.reshape(-1, d_model)
  if implementation is None and decode.use_decode(x_MxD.shape[0], w_up.shape[0], cfg):
    y, stats = decode.relu_ffn_decode(x_MxD, w_up, w_down, cfg)  # few tokens: generation
    return y.reshape(*lead, d_model), stats
  backend = _resolve(implementation, x_MxD, (w_up, w_down), cfg)
  y, stats = _BACKENDS[backend][1](x_MxD, w_up, w_down, cfg)
  return y.reshape(*lead, d_model), stats
