"""The sparse FFN in the decode regime: few tokens per call (generation), exact, pure XLA.

At M <= ~256 tokens a call is bound by reading the weights, not by FLOPs, and the batched
formats (TwELL tiles of 128 rows, per-token ELL rows) neither spread one token's work nor share
rows between the batch's tokens. Here one call:

1. computes the gate pre-activations of the M tokens, ``g = x Wg^T`` (one GEMM that streams Wg
   once; the only full weight read);
2. finds each token's active neurons (``relu(g) != 0``; a NaN gate is active, as in the op) and
   the batch's union, held in a static capacity U (``jnp.nonzero(size=U)``);
3. gathers the U rows of Wu and Wd once for the whole batch and computes
   ``h = relu(g[:, union]) * (x Wu_union^T)``, masked to each token's own actives (the up
   projection is used only where the gate fires, so a NaN or inf in an inactive neuron's up row
   does not reach the output: the op's rule), then ``y = h Wd_union``.

Bytes read: ``|Wg| + 2 U d_model`` (plus the gathered copies) instead of ``3 |W|``. The public op
takes this path only where U pays (``use_decode``); called directly with a U that cannot pay, it
runs the dense FFN, reported as ``dense_fallback`` with no overflowed row. A call whose
union exceeds U runs the dense FFN from the gate already computed (``lax.cond``, exact; it costs
what the dense FFN costs, not the gate twice) and reports ``dense_fallback`` with all M rows in
``overflow_rows``. The statistics are the op's (``sparse_jax.ops.reference``): L0 and
active_per_neuron count ``relu(g) != 0`` in the compute dtype, L1 is mean |h| over M x d_ff.

The gradient (``jax.custom_vjp``) is the dense FFN's VJP: the decode path serves inference, and
the dense VJP is the exact gradient of the same function, so training through it stays correct.
Non-gated FFN (``w_up is None``): the gate is Wu itself and h = relu(x Wu^T) on the union.
With ``cfg.gate_threshold > 0`` every relu above is FATReLU (``dense.gate_activation``: active iff
g > threshold, value g), exactly as the reference op computes it.
Rows of x holding +-Inf or NaN give the dense FFN's row, as in every backend
(``sparse_jax.ops.nonfinite``).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from sparse_jax.ops.base import FFNStats, SparseFFNConfig, make_stats
from sparse_jax.ops.dense import F32, ffn_with_l1, gate_activation, matmul_nn, matmul_nt
from sparse_jax.ops.nonfinite import with_dense_nonfinite_rows

# The union capacity is sized at this multiple of the expected union (uniform firing, the
# configured density): batch-to-batch variation of the union must rarely overflow into the
# dense path.
UNION_HEADROOM = 1.5
UNION_ROUND = 128  # U is rounded up to whole 128-row tiles of the gathered weights


def union_capacity(m: int, d_ff: int, cfg: SparseFFNConfig) -> int:
  """U, the static number of union neurons a call of M tokens can hold."""
  if cfg.decode_union_capacity is not None:
    return min(d_ff, cfg.decode_union_capacity)
  # Tokens firing independently at rate f leave a neuron silent with probability (1 - f)^M.
  expected = d_ff * (1.0 - (1.0 - cfg.decode_density) ** m)
  u = math.ceil(UNION_HEADROOM * expected + 16)
  return min(d_ff, -(-u // UNION_ROUND) * UNION_ROUND)


def use_decode(m: int, d_ff: int, cfg: SparseFFNConfig) -> bool:
  """Whether ``implementation=None`` takes the union path for M tokens (a trace-time choice): the
  decode regime, where the batched kernels (128-row tiles) do not fit, and a union that pays.
  Other calls keep the backends' own dispatch (a training call of few tokens stays sparse)."""
  return (cfg.decode_path == "union" and 0 < m <= cfg.decode_max_tokens
          and union_fits(m, d_ff, cfg))


def union_fits(m: int, d_ff: int, cfg: SparseFFNConfig) -> bool:
  """Whether the union path pays for M tokens: it reads the gate, then each union row of Wu and Wd
  three times (the gather reads and writes it, the GEMM reads it again), so U must stay well
  under d_ff / 3 (``decode_max_union_fraction``). Otherwise the call runs the dense FFN."""
  return union_capacity(m, d_ff, cfg) <= cfg.decode_max_union_fraction * d_ff


def _forward(x_MxD, w_gate, w_up, w_down, u_cap: int | None, threshold: float = 0.0):
  """``u_cap=None``: the union cannot pay (``union_fits``): the dense FFN, reported as a dense
  fallback with no overflowed row."""
  m, _ = x_MxD.shape
  n = w_gate.shape[0]
  dt = x_MxD.dtype
  # f32, as the dense FFN's hidden() has it
  g_MxN = gate_activation(matmul_nt(x_MxD, w_gate), threshold)
  p_MxN = g_MxN.astype(dt)  # relu(NaN) = NaN: active
  active_MxN = p_MxN != 0
  in_union_N = jnp.any(active_MxN, axis=0)
  n_union = jnp.sum(in_union_N, dtype=jnp.int32)
  fallback = n_union > (u_cap or 0)

  def sparse():
    # Empty slots hold index n: their gathered rows and gate values are zeros (mode="fill").
    (union_U,) = jnp.nonzero(in_union_N, size=u_cap, fill_value=n)
    take = functools.partial(jnp.take, indices=union_U, mode="fill", fill_value=0)
    p_MxU = take(p_MxN, axis=1)
    act_MxU = take(active_MxN, axis=1)
    h_MxU = p_MxU.astype(F32)
    if w_up is not None:
      h_MxU = h_MxU * matmul_nt(x_MxD, take(w_up, axis=0))
    h_MxU = jnp.where(act_MxU, h_MxU, 0.0)
    y_MxD = matmul_nn(h_MxU.astype(dt), take(w_down, axis=0))
    return y_MxD.astype(dt), jnp.sum(jnp.abs(h_MxU)) / (m * n)

  def dense():
    # ffn_with_l1's computation, from the gate already computed: an overflowing call costs the
    # dense FFN (plus the union count), never the gate twice.
    h_MxN = g_MxN if w_up is None else g_MxN * matmul_nt(x_MxD, w_up)
    y_MxD = matmul_nn(h_MxN.astype(dt), w_down).astype(dt)
    return y_MxD, jnp.mean(jnp.abs(h_MxN))

  if u_cap is None:
    y_MxD, l1 = dense()
    fallback, overflow_rows = jnp.asarray(True), jnp.zeros((), jnp.int32)
  else:
    y_MxD, l1 = jax.lax.cond(fallback, dense, sparse)
    overflow_rows = jnp.where(fallback, m, 0).astype(jnp.int32)
    # Rows of x with +-Inf or NaN take the dense FFN's output (sparse_jax.ops.nonfinite): the
    # union drops the inactive neurons whose 0 * Inf makes the dense row NaN.
    y_MxD = with_dense_nonfinite_rows(x_MxD, w_gate, w_up, w_down, y_MxD)
  stats = FFNStats(l0=jnp.sum(active_MxN, dtype=F32) / m, l1=l1.astype(F32),
                   overflow_rows=overflow_rows, dense_fallback=fallback,
                   active_per_neuron=jnp.sum(active_MxN, axis=0, dtype=jnp.int32))
  return y_MxD, stats


def _dense_vjp(threshold, residuals, cotangents):
  x_MxD, w_gate, w_up, w_down = residuals
  d_y, d_stats = cotangents
  g_l1 = d_stats.l1.astype(F32)
  if w_up is None:
    _, vjp = jax.vjp(lambda x, g, d: ffn_with_l1(x, g, None, d, threshold), x_MxD, w_gate, w_down)
    d_x, d_wg, d_wd = vjp((d_y, g_l1))
    return d_x, d_wg, d_wd
  _, vjp = jax.vjp(lambda x, g, u, d: ffn_with_l1(x, g, u, d, threshold), x_MxD, w_gate, w_up,
                   w_down)
  return vjp((d_y, g_l1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _gated(x_MxD, w_gate, w_up, w_down, u_cap: int, threshold: float):
  return _forward(x_MxD, w_gate, w_up, w_down, u_cap, threshold)


_gated.defvjp(lambda x, wg, wu, wd, u_cap, t: (_forward(x, wg, wu, wd, u_cap, t), (x, wg, wu, wd)),
              lambda u_cap, t, res, ct: _dense_vjp(t, res, ct))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _relu(x_MxD, w_up, w_down, u_cap: int, threshold: float):
  return _forward(x_MxD, w_up, None, w_down, u_cap, threshold)


_relu.defvjp(lambda x, wu, wd, u_cap, t: (_forward(x, wu, None, wd, u_cap, t), (x, wu, None, wd)),
             lambda u_cap, t, res, ct: _dense_vjp(t, res, ct))


def _capacity(m: int, d_ff: int, cfg: SparseFFNConfig) -> int | None:
  return union_capacity(m, d_ff, cfg) if union_fits(m, d_ff, cfg) else None


def gated_ffn_decode(x_MxD, w_gate, w_up, w_down, cfg: SparseFFNConfig
                     ) -> tuple[jax.Array, FFNStats]:
  """``relu(x Wg^T) * (x Wu^T) @ Wd`` on [M, d_model] through the batch's union of actives."""
  return _gated(x_MxD, w_gate, w_up, w_down, _capacity(x_MxD.shape[0], w_gate.shape[0], cfg),
                cfg.gate_threshold)


def relu_ffn_decode(x_MxD, w_up, w_down, cfg: SparseFFNConfig) -> tuple[jax.Array, FFNStats]:
  """``relu(x Wu^T) @ Wd`` on [M, d_model] through the batch's union of actives."""
  return _relu(x_MxD, w_up, w_down, _capacity(x_MxD.shape[0], w_up.shape[0], cfg),
               cfg.gate_threshold)


# --------------------------------------------------------------------------- decode kernels


def kernel_supports(m: int, d_model: int, d_ff: int) -> str | None:
  """None if the decode kernels (``pallas_kernels.twell_decode``) take a call of M tokens of
  these sizes (bf16 and a Hopper GPU are the Pallas backend's own checks), else why not."""
  from pallas_kernels import twell_decode as td
  if not 0 < m <= td.MAX_TOKENS:
    return f"M={m} tokens: the decode kernels take 1..{td.MAX_TOKENS}"
  if d_ff % td.NEURON_TILE:
    return f"d_ff={d_ff} must be a multiple of {td.NEURON_TILE}"
  if d_model % td.DOWN_ROWS:
    return f"d_model={d_model} must be a multiple of {td.DOWN_ROWS}"
  return None


def kernel_forward(x_MxD, w_gate, w_up, w_down, cfg: SparseFFNConfig
                   ) -> tuple[jax.Array, FFNStats]:
  """Inference forward of a few tokens through the decode kernels: ``(y [M, D], FFNStats)``.

  Exact on every input with no capacity and no conditional (non-finite rows included, see the
  kernels' module); the statistics are counted from the kernels' fired gate values (NaN counts
  as active, as in the op) and L1 from their bf16 hidden activations. Differentiating the op
  does not come here: the Pallas backend's training forward does."""
  from pallas_kernels import twell_decode as td
  m, _ = x_MxD.shape
  n = w_gate.shape[0]
  m_pad = td.pad_tokens(m)
  xp = jnp.pad(x_MxD, ((0, m_pad - m), (0, 0)))
  kcfg = td.default_config(m_pad, x_MxD.shape[1], n, gate_split=cfg.decode_gate_split or 1)
  y, h_NxM, p_NxM, _ = td.decode_ffn(xp, w_gate, w_up, w_down, threshold=cfg.gate_threshold,
                                     config=kcfg)
  active_NxM = p_NxM[:, :m] != 0
  stats = make_stats(l0=jnp.sum(active_NxM, dtype=F32) / m,
                     l1=jnp.sum(jnp.abs(h_NxM[:, :m].astype(F32))) / (m * n),
                     active_per_neuron=jnp.sum(active_NxM, axis=1, dtype=jnp.int32))
  return y[:m], stats
