"""Public sparse FFN ops: argument checks, the choice of implementation, shape plumbing.

``IMPLEMENTATIONS`` is the static table of implementations, fastest first. Each names the module
that implements the op, with three functions of 2-D ``x [M, d_model]`` and checked weights:
``supports(x_MxD, weights, config) -> str | None`` (None: it can run these arguments here; else
the reason), ``gated_ffn(x_MxD, w_gate, w_up, w_down, config)`` and
``relu_ffn(x_MxD, w_up, w_down, config)``, both returning ``(y, FFNStats)`` and differentiable;
optionally ``auto_runs_dense(d_model, config) -> bool``: in ``mode="auto"`` the backend knows from
the shape alone that its sparse path does not pay, and the op runs ``mode="dense"`` instead
(static: no probe, no conditional).
A module is imported on first use, so importing ``sparse_jax.ops`` does not import the kernels.
Adding a backend: its module, a row here, a test subclass of ``tests/ffn_checks.py``.

Weight layout: see ``sparse_jax.ops.base``.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Literal

import jax

from sparse_jax.ops import decode, modes
from sparse_jax.ops.base import FFNStats, SparseFFNConfig, check_weights

IMPLEMENTATIONS: dict[str, str] = {
    "pallas_mosaic_gpu": "sparse_jax.ops.pallas_backend",  # Hopper kernels (pallas_kernels/)
    "xla": "sparse_jax.ops.reference",                      # the definition; runs anywhere
}
ALIASES = {"pallas": "pallas_mosaic_gpu"}
Implementation = Literal["xla", "pallas_mosaic_gpu", "pallas"] | None


def _module(name: str) -> ModuleType:
  return importlib.import_module(IMPLEMENTATIONS[name])


def available_implementations() -> list[str]:
  """The implementations whose module imports in this installation (fastest first)."""
  names = []
  for name in IMPLEMENTATIONS:
    try:
      _module(name)
    except ImportError:
      continue
    names.append(name)
  return names


def _why_not(name: str, x_MxD, weights, cfg) -> str | None:
  try:
    module = _module(name)
  except ImportError as e:
    return f"it is not available in this installation ({e})"
  return module.supports(x_MxD, weights, cfg)


def _resolve(implementation: Implementation, x_MxD, weights, cfg) -> ModuleType:
  """The implementation's module: the one asked for (``NotImplementedError`` naming why it cannot
  run), or with None the first in ``IMPLEMENTATIONS`` that can."""
  name = ALIASES.get(implementation, implementation)
  if name is None:
    for candidate in IMPLEMENTATIONS:
      if _why_not(candidate, x_MxD, weights, cfg) is None:
        return _module(candidate)
    raise NotImplementedError("no implementation can run this call")  # xla runs everything
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, 'pallas' or "
                     f"None, got {implementation!r}")
  reason = _why_not(name, x_MxD, weights, cfg)
  if reason is not None:
    raise NotImplementedError(f"implementation {implementation!r} cannot run this call: {reason}")
  return _module(name)


def _auto_runs_dense(backend: ModuleType, d_model: int, cfg: SparseFFNConfig) -> bool:
  rule = getattr(backend, "auto_runs_dense", None)
  return cfg.mode == "auto" and rule is not None and rule(d_model, cfg)


def gated_sparse_ffn(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
                     implementation: Implementation = None,
                     config: SparseFFNConfig | None = None) -> tuple[jax.Array, FFNStats]:
  """ReLU-gated sparse FFN ``relu(x Wg^T) * (x Wu^T) @ Wd`` on ``x [..., d_model]`` (FATReLU
  with ``config.gate_threshold > 0``).

  Returns ``(y [..., d_model], FFNStats)``; ``stats.l1`` is differentiable (add ``coeff * l1`` to
  the loss to train sparsity). ``implementation``: ``"xla"`` (reference, any backend),
  ``"pallas_mosaic_gpu"`` (alias ``"pallas"``: Hopper kernels; raises ``NotImplementedError``
  where they cannot run) or ``None`` (the fastest that can run, falling back to XLA).
  ``config.mode=\"dense\"`` runs the plain XLA dense FFN whatever the implementation
  (``sparse_jax.ops.modes``).
  Calls of at most ``config.decode_max_tokens`` tokens with ``implementation=None`` take the
  decode path of ``sparse_jax.ops.decode`` when its union capacity pays.
  """
  check_weights(x, [("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)])
  cfg = config or SparseFFNConfig()
  lead, d_model = x.shape[:-1], x.shape[-1]
  x_MxD = x.reshape(-1, d_model)
  if cfg.mode == "dense":  # plain XLA + jax.grad on every backend (sparse_jax.ops.modes)
    y, stats = modes.dense_ffn_with_stats(x_MxD, w_gate, w_up, w_down, cfg.gate_threshold)
    return y.reshape(*lead, d_model), stats
  if implementation is None and decode.use_decode(x_MxD.shape[0], w_gate.shape[0], cfg):
    y, stats = decode.gated_ffn_decode(x_MxD, w_gate, w_up, w_down, cfg)  # few tokens: generation
    return y.reshape(*lead, d_model), stats
  backend = _resolve(implementation, x_MxD, (w_gate, w_up, w_down), cfg)
  if _auto_runs_dense(backend, d_model, cfg):
    y, stats = modes.dense_ffn_with_stats(x_MxD, w_gate, w_up, w_down, cfg.gate_threshold)
  else:
    y, stats = backend.gated_ffn(x_MxD, w_gate, w_up, w_down, cfg)
  return y.reshape(*lead, d_model), stats


def sparse_ffn(x: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
               implementation: Implementation = None,
               config: SparseFFNConfig | None = None) -> tuple[jax.Array, FFNStats]:
  """Non-gated sparse FFN ``relu(x Wu^T) @ Wd``; same conventions as ``gated_sparse_ffn``."""
  check_weights(x, [("w_up", w_up), ("w_down", w_down)])
  cfg = config or SparseFFNConfig()
  lead, d_model = x.shape[:-1], x.shape[-1]
  x_MxD = x.reshape(-1, d_model)
  if cfg.mode == "dense":
    y, stats = modes.dense_ffn_with_stats(x_MxD, w_up, None, w_down, cfg.gate_threshold)
    return y.reshape(*lead, d_model), stats
  if implementation is None and decode.use_decode(x_MxD.shape[0], w_up.shape[0], cfg):
    y, stats = decode.relu_ffn_decode(x_MxD, w_up, w_down, cfg)  # few tokens: generation
    return y.reshape(*lead, d_model), stats
  backend = _resolve(implementation, x_MxD, (w_up, w_down), cfg)
  if _auto_runs_dense(backend, d_model, cfg):
    y, stats = modes.dense_ffn_with_stats(x_MxD, w_up, None, w_down, cfg.gate_threshold)
  else:
    y, stats = backend.relu_ffn(x_MxD, w_up, w_down, cfg)
  return y.reshape(*lead, d_model), stats
