"""The dense gated FFN, written once: the numerical ground truth of the sparse op, the dense FFN
kinds of the model, and the exact dense fallbacks of the backends (with their chunked forms).

Weights are neuron-major, one row per hidden neuron: ``w_gate``, ``w_up``, ``w_down`` are all
``[d_ff, d_model]`` (the paper's G, K, V). ``h = act(x @ w_gate.T) * (x @ w_up.T)``,
``y = h @ w_down``; ``w_up=None`` is the non-gated FFN ``act(x @ w_gate.T) @ w_down``. With a
positive ``threshold`` the relu activation is FATReLU (``gate_activation``).

Two roundings of the same FFN appear, and each caller keeps the one it always had:

* **f32 hidden** (``ffn``, ``ffn_with_l1``, ``gated_ffn``, ``dense_forward_chunked``): the
  matmuls return f32, h is formed in f32 and rounded once to the compute dtype for the down
  projection. This is the ground truth and the model's dense kinds.
* **as a bf16 model computes it** (``ffn_as_model``, ``bf16_gated_ffn_with_l1``,
  ``dense_with_stats``, ``dense_grads_neuron_chunked``): every matmul output in the compute dtype
  (f32 accumulation inside the matmul). The benchmarks' dense baseline and the Pallas backend's
  dense branches, whose speed is compared against it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sparse_jax.ops.base import F32, FFNStats, make_stats, stats_from_active

ACTIVATIONS = {"relu": jax.nn.relu, "silu": jax.nn.silu}
ROW_CHUNK = 2048      # rows per step of the row-chunked forward
NEURON_CHUNK = 768    # widest d_ff chunk of the d_ff-chunked gradients (f32 [M, chunk] temporaries)


def matmul_nt(a_MxK: jax.Array, b_NxK: jax.Array) -> jax.Array:
  """a @ b.T with f32 accumulation."""
  return lax.dot_general(a_MxK, b_NxK, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def matmul_nn(a_MxK: jax.Array, b_KxN: jax.Array) -> jax.Array:
  """a @ b with f32 accumulation."""
  return lax.dot_general(a_MxK, b_KxN, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def matmul_tn(a_KxM: jax.Array, b_KxN: jax.Array) -> jax.Array:
  """a.T @ b with f32 accumulation (the weight-gradient product)."""
  return lax.dot_general(a_KxM, b_KxN, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def gate_activation(pre: jax.Array, threshold: float = 0.0) -> jax.Array:
  """ReLU, or FATReLU with a positive ``threshold``: the pre-activation where it exceeds the
  threshold, else 0 (a neuron is active iff pre > threshold). Its derivative, 1 where the output
  is non-zero, is what the sparse op's backward uses for either."""
  if threshold == 0:
    return jax.nn.relu(pre)
  return jnp.where(pre > threshold, pre, jnp.zeros_like(pre))


def gate_active(pre: jax.Array, threshold: float = 0.0) -> jax.Array:
  """Where ``gate_activation`` is non-zero: ``not pre <= 0`` for ReLU (relu(NaN) = NaN counts as
  active), ``pre > threshold`` for FATReLU (its NaN gives 0)."""
  return jnp.logical_not(pre <= 0) if threshold == 0 else pre > threshold


def _activation(name: str, threshold: float = 0.0):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
  if threshold != 0:
    if name != "relu":
      raise ValueError(f"threshold={threshold} (FATReLU) applies to relu, not {name!r}")
    return lambda pre: gate_activation(pre, threshold)
  return ACTIVATIONS[name]


# --------------------------------------------------------------------------- f32 hidden


def hidden(x_MxD, w_gate_NxD, w_up_NxD=None, activation: str = "relu", threshold: float = 0.0):
  """Hidden activations in f32: act(x Wg^T) * (x Wu^T), or act(x Wg^T) without an up weight."""
  p = _activation(activation, threshold)(matmul_nt(x_MxD, w_gate_NxD))
  return p if w_up_NxD is None else p * matmul_nt(x_MxD, w_up_NxD)


def ffn(x_MxD, w_gate_NxD, w_up_NxD, w_down_NxD, activation: str = "relu",
        threshold: float = 0.0):
  """(y [M, D] in x.dtype, h [M, d_ff] f32): the dense FFN with f32 hidden activations."""
  h = hidden(x_MxD, w_gate_NxD, w_up_NxD, activation, threshold)
  return matmul_nn(h.astype(x_MxD.dtype), w_down_NxD).astype(x_MxD.dtype), h


def ffn_with_l1(x_MxD, w_gate_NxD, w_up_NxD, w_down_NxD, threshold: float = 0.0):
  """(y [M, D] in x.dtype, mean |h| in f32). ``w_up_NxD=None`` is the non-gated FFN."""
  y, h = ffn(x_MxD, w_gate_NxD, w_up_NxD, w_down_NxD, threshold=threshold)
  return y, jnp.mean(jnp.abs(h))


def hidden_stats(h_MxN: jax.Array) -> FFNStats:
  """FFNStats of a dense FFN's hidden activations (active: h != 0; the model's dense kinds)."""
  return stats_from_active(h_MxN != 0, jnp.mean(jnp.abs(h_MxN.astype(F32))))


def gated_ffn(x, w_gate, w_up, w_down):
  """Dense ReLU-gated FFN on [..., d_model] inputs (the ground truth of ``gated_sparse_ffn``)."""
  lead = x.shape[:-1]
  y, _ = ffn_with_l1(x.reshape(-1, x.shape[-1]), w_gate, w_up, w_down)
  return y.reshape(*lead, y.shape[-1])


def relu_ffn(x, w_up, w_down):
  """Dense non-gated ReLU FFN (the ground truth of ``sparse_ffn``)."""
  lead = x.shape[:-1]
  y, _ = ffn_with_l1(x.reshape(-1, x.shape[-1]), w_up, None, w_down)
  return y.reshape(*lead, y.shape[-1])


def _row_chunks(a, chunk):
  pad = (-a.shape[0]) % chunk
  a = a if pad == 0 else jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))
  return a.reshape(-1, chunk, *a.shape[1:])


def dense_forward_chunked(x_MxD, w_gate, w_up, w_down, chunk: int = ROW_CHUNK,
                          threshold: float = 0.0) -> tuple[jax.Array, FFNStats]:
  """(y, FFNStats with ``dense_fallback`` set) of the f32-hidden dense FFN, ``chunk`` rows at a
  time inside ``lax.map``: temporaries are [chunk, d_ff], never [M, d_ff]. XLA reserves a
  conditional's largest branch, so a dense fallback that materialised [M, d_ff] would set a
  training step's peak memory even when never taken."""
  m, d = x_MxD.shape
  n = w_gate.shape[0]

  def body(xc):
    pre = matmul_nt(xc, w_gate)
    y, h = ffn(xc, w_gate, w_up, w_down, threshold=threshold)
    return (y, jnp.sum(jnp.abs(h.astype(xc.dtype).astype(F32))),
            jnp.sum(gate_active(pre, threshold), axis=0, dtype=jnp.int32))

  ys, l1s, acts = lax.map(body, _row_chunks(x_MxD, chunk))
  act = jnp.sum(acts, axis=0)
  # Zero padding rows are inactive everywhere (pre = 0 <= threshold): they add nothing to counts.
  return ys.reshape(-1, d)[:m], make_stats(
      l0=jnp.sum(act) / m, l1=jnp.sum(l1s) / (m * n), active_per_neuron=act, dense_fallback=True)


# --------------------------------------------------------------------------- as a model computes it


# Up to this many rows the dots of ``ffn_as_model`` ask for f32 accumulation explicitly: at M = 1
# XLA's GPU dot with a bf16 output accumulated in bf16 (measured on an H200: relative error
# 0.66-0.85 against float32 on a synthetic problem whose threshold channel cancels), while from
# tens of rows on it calls cuBLAS, which accumulates in f32 anyway (same numbers either way). Kept
# to the decode regime so the large-M dense baseline compiles exactly as before.
F32_ACCUMULATE_ROWS = 256
# Below this many rows XLA's f32-accumulating dot is not a cuBLAS call: at M = 1 the 2b FFN took
# 34.3 us per layer on an H200 against 24.7 us with the rows zero-padded to 8 (23.5 us at M = 8;
# experiments/results/tune_decode_h200.json), so ``ffn_as_model`` pads to it.
MIN_GEMM_ROWS = 8


def ffn_as_model(x_MxD, w_gate, w_up, w_down, activation: str = "relu", threshold: float = 0.0):
  """(y, h, pre): the dense FFN as a bf16 model computes it: every matmul output in the compute
  dtype (f32 accumulation inside the matmuls). ``pre`` is the gate's pre-activation."""
  dt = x_MxD.dtype
  m = x_MxD.shape[0]
  if 0 < m < MIN_GEMM_ROWS:  # zero rows: exact, and XLA calls cuBLAS (module comment above)
    y, h, pre = ffn_as_model(jnp.pad(x_MxD, ((0, MIN_GEMM_ROWS - m), (0, 0))), w_gate, w_up,
                             w_down, activation, threshold)
    return y[:m], h[:m], pre[:m]
  if m <= F32_ACCUMULATE_ROWS:
    dot = lambda a, b, dims: lax.dot_general(a, b, (dims, ((), ())),
                                             preferred_element_type=F32).astype(dt)
  else:
    dot = lambda a, b, dims: lax.dot_general(a, b, (dims, ((), ())))
  pre = dot(x_MxD, w_gate, ((1,), (1,)))
  h = _activation(activation, threshold)(pre)
  if w_up is not None:
    h = h * dot(x_MxD, w_up, ((1,), (1,)))
  return dot(h, w_down, ((1,), (0,))), h, pre


def bf16_gated_ffn_with_l1(x_MxD, w_gate, w_up, w_down):
  """The dense FFN as a bf16 model computes it: the baseline the benchmarks compare against.
  Returns (y, mean |h| in f32). ``w_up=None``: non-gated."""
  y, h, _ = ffn_as_model(x_MxD, w_gate, w_up, w_down)
  return y, jnp.mean(jnp.abs(h.astype(F32)))


def dense_with_stats(x_MxD, w_gate, w_up, w_down, threshold: float = 0.0
                     ) -> tuple[jax.Array, FFNStats]:
  """A dispatcher's dense branch: ``ffn_as_model`` and its statistics from the one gate matmul
  (active: ``gate_active``, so a NaN counts under ReLU), with ``dense_fallback`` set."""
  y, h, pre = ffn_as_model(x_MxD, w_gate, w_up, w_down, threshold=threshold)
  return y, stats_from_active(gate_active(pre, threshold), jnp.mean(jnp.abs(h.astype(F32))),
                              dense_fallback=True)


def dense_grads_neuron_chunked(x, d_y, w_gate, w_up, w_down, coeff, max_chunk=NEURON_CHUNK):
  """Gradients of sum(y * d_y) + coeff * sum|h| of the dense FFN with f32 hidden activations
  (``ffn_with_l1``, the numerics the sparse kernels follow), recomputing the activations one d_ff
  chunk at a time over all M rows. Every weight-gradient row depends on one chunk only, so each
  chunk's dW is final (in the weight dtype); only dx sums over chunks (f32). Written out by hand
  so that every GEMM takes bf16 operands with f32 accumulation: the hidden activations and their
  cotangents are kept in f32 and rounded once before each GEMM (with bf16 matmul outputs instead,
  the gradients measured ~1.3e-2 from float32 on an H200; autodiff of the f32 form runs its
  weight-gradient GEMMs in f32, measured ~3x slower). Matmuls keep M = all rows (tensor-core
  sized); temporaries are a few [M, chunk] f32 arrays plus the f32 dx.
  Returns (dx f32, dW_gate[, dW_up], dW_down)."""
  m, d = x.shape
  n = w_gate.shape[0]
  gated = w_up is not None
  cdiv = lambda a, b: -(-a // b)
  n_chunks = cdiv(n, max_chunk)
  width = cdiv(cdiv(n, n_chunks), 128) * 128
  n_pad = width * n_chunks
  ws = [w for w in (w_gate, w_up, w_down) if w is not None]
  chunks = [jnp.pad(w, ((0, n_pad - n), (0, 0))).reshape(n_chunks, width, d) for w in ws]
  dt = x.dtype
  d_y = d_y.astype(dt)

  def body(dx, w):
    wg, wu, wd = w if gated else (w[0], None, w[1])
    pre = matmul_nt(x, wg)
    p = jax.nn.relu(pre)
    up = matmul_nt(x, wu) if gated else None
    h = p * up if gated else p
    # d(sum|h|)/dh with jax.grad's convention for abs (+1 at 0, as the backward kernel).
    dh = matmul_nt(d_y, wd) + coeff * jnp.where(h >= 0, 1.0, -1.0)
    d_pre = jnp.where(pre > 0, dh * up if gated else dh, 0.0).astype(dt)
    dws = [matmul_tn(d_pre, x).astype(wg.dtype)]
    dxc = matmul_nn(d_pre, wg)
    if gated:
      d_up = (dh * p).astype(dt)
      dws.append(matmul_tn(d_up, x).astype(wu.dtype))
      dxc = dxc + matmul_nn(d_up, wu)
    dws.append(matmul_tn(h.astype(dt), d_y).astype(wd.dtype))
    return dx + dxc, dws

  if n_chunks == 1:  # no loop: one chunk needs no scan
    dx, dws = body(jnp.zeros((m, d), F32), [c[0] for c in chunks])
    return (dx,) + tuple(g[:n] for g in dws)
  dx, dws = lax.scan(body, jnp.zeros((m, d), F32), chunks)
  return (dx,) + tuple(g.reshape(n_pad, d)[:n] for g in dws)
