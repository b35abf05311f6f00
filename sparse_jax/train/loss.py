"""Language-model loss: cross-entropy plus coeff x L1 of the FFN hidden activations.

Two normalisations of the L1 term, named for what they average (``TrainConfig.l1_norm``):

* ``"mean"``: the paper's formula, mean |h| over tokens AND neurons, averaged over layers
  (= ``FFNStats.l1`` averaged over layers).
* ``"sum_neurons"``: the released code's, sum of |h| over the d_ff neurons, mean over tokens, mean
  over layers (= d_ff x the "mean" value). Its coefficients are d_ff times smaller for the same
  penalty: the released checkpoints' 2e-5 is a "sum_neurons" coefficient, i.e. 2e-5 x 5632 =
  0.113 in "mean" at the paper's d_ff.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from sparse_jax.config import TrainConfig

F32 = jnp.float32


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats (fp32)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(F32), targets_BxL))


def head_cross_entropy(x_BxLxD: jax.Array, head_VxD: jax.Array, targets_BxL: jax.Array, *,
                       chunk: int, compute_dtype=jnp.bfloat16) -> jax.Array:
  """Mean next-token cross-entropy (fp32) of ``logits = x head^T`` (operands in
  ``compute_dtype``, fp32 accumulation, as ``Transformer``'s head), formed ``chunk`` positions of
  the sequence at a time.

  The fp32 logits of a whole batch are the step's largest activation (16384 tokens x 49152 ids:
  3.2 GB, and as much again for their gradient). Here only one chunk's exist at a time: the loss
  and its gradients for ``x`` and ``head`` are formed together chunk by chunk (a ``lax.scan``;
  the head's gradient accumulates in fp32), kept as the residuals of a ``custom_vjp`` and scaled
  by the cotangent in the backward pass, so nothing is recomputed. The gradient's matmuls take
  the softmax gradient in ``compute_dtype`` (the unchunked path's take it in fp32). The sequence
  axis is the one chunked: a batch split over devices keeps its split. A sequence that ``chunk``
  does not divide gets a shorter last chunk (padded, the padding masked out of the loss and its
  gradients). ``chunk`` 0 (or the whole sequence) is the plain path: ``cross_entropy`` of the full
  logits.
  """
  _, seq, _ = x_BxLxD.shape
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
    raise ValueError(f"chunk must be a non-negative int (0: unchunked), got {chunk!r}")
  if x_BxLxD.shape[:2] != targets_BxL.shape:
    raise ValueError(f"hidden states {x_BxLxD.shape} and targets {targets_BxL.shape} disagree "
                     "on [batch, sequence]")
  if chunk == 0 or chunk >= seq:
    logits = jnp.einsum("bld,vd->blv", x_BxLxD.astype(compute_dtype),
                        head_VxD.astype(compute_dtype), preferred_element_type=F32)
    return cross_entropy(logits, targets_BxL)
  return _chunked_ce(x_BxLxD, head_VxD, targets_BxL, chunk, jnp.dtype(compute_dtype))


def _chunks(a, chunk):
  """[B, L, ...] -> [ceil(L / chunk), B, chunk, ...] (the scan's leading axis); a sequence that
  ``chunk`` does not divide is padded with zeros (``_scan_inputs``'s mask drops them)."""
  b, seq = a.shape[:2]
  pad = (-seq) % chunk
  if pad:
    a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
  return jnp.swapaxes(a.reshape(b, (seq + pad) // chunk, chunk, *a.shape[2:]), 0, 1)


def _scan_inputs(x_BxLxD, targets_BxL, chunk):
  """The scan's per-chunk (hidden states, targets, valid [1, chunk] f32: 1 on the sequence's
  positions, 0 on a last chunk's padding)."""
  valid = _chunks(jnp.ones((1, targets_BxL.shape[1]), F32), chunk)
  return _chunks(x_BxLxD, chunk), _chunks(targets_BxL, chunk), valid


def _chunk_loss(x_BxCxD, w_VxD, t_BxC, valid_1xC):
  """(sum of the chunk's token losses, fp32 logits [B, C, V], logsumexp [B, C])."""
  logits = jnp.einsum("bld,vd->blv", x_BxCxD, w_VxD, preferred_element_type=F32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, t_BxC[..., None], axis=-1)[..., 0]
  return jnp.sum((lse - target) * valid_1xC), logits, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_ce(x_BxLxD, head_VxD, targets_BxL, chunk, dtype):
  w = head_VxD.astype(dtype)

  def body(total, xtv):
    x_c, t_c, v_c = xtv
    return total + _chunk_loss(x_c.astype(dtype), w, t_c, v_c)[0], None

  total, _ = jax.lax.scan(body, jnp.zeros((), F32), _scan_inputs(x_BxLxD, targets_BxL, chunk))
  return total / targets_BxL.size


def _chunked_ce_fwd(x_BxLxD, head_VxD, targets_BxL, chunk, dtype):
  w = head_VxD.astype(dtype)
  inv_n = 1.0 / targets_BxL.size

  def body(carry, xtv):
    total, dw_VxD = carry
    x_c, t_c, v_c = xtv[0].astype(dtype), xtv[1], xtv[2]
    loss, logits, lse = _chunk_loss(x_c, w, t_c, v_c)
    # d(mean loss)/d logits = (softmax - onehot) / n, 0 on padding
    g = jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(t_c, w.shape[0], dtype=F32)
    g = (g * (v_c * inv_n)[..., None]).astype(dtype)
    dx_c = jnp.einsum("blv,vd->bld", g, w, preferred_element_type=F32).astype(x_BxLxD.dtype)
    dw_VxD = dw_VxD + jnp.einsum("blv,bld->vd", g, x_c, preferred_element_type=F32)
    return (total + loss, dw_VxD), dx_c

  (total, dw_VxD), dx = jax.lax.scan(
      body, (jnp.zeros((), F32), jnp.zeros(head_VxD.shape, F32)),
      _scan_inputs(x_BxLxD, targets_BxL, chunk))
  b, seq, d = x_BxLxD.shape
  dx_BxLxD = jnp.swapaxes(dx, 0, 1).reshape(b, -1, d)[:, :seq]
  return total * inv_n, (dx_BxLxD, dw_VxD.astype(head_VxD.dtype))


def _chunked_ce_bwd(chunk, dtype, residuals, g):
  del chunk, dtype
  dx_BxLxD, dw_VxD = residuals
  return ((g * dx_BxLxD.astype(F32)).astype(dx_BxLxD.dtype),
          (g * dw_VxD.astype(F32)).astype(dw_VxD.dtype), None)


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def l1_penalty(l1_per_layer: jax.Array, *, norm: str, d_ff: int) -> jax.Array:
  """The L1 term from per-layer ``FFNStats.l1`` values (mean |h| per layer) in ``norm``."""
  mean_over_layers = jnp.mean(l1_per_layer)
  if norm == "mean":
    return mean_over_layers
  if norm == "sum_neurons":
    return mean_over_layers * d_ff
  raise ValueError(f"l1 norm must be 'mean' or 'sum_neurons', got {norm!r}")


def l1_coeff_at(step: jax.Array, cfg: TrainConfig) -> jax.Array:
  """The L1 coefficient at ``step``: a linear ramp from 0 over l1_warmup_steps, then constant."""
  if cfg.l1_warmup_steps == 0:
    return jnp.asarray(cfg.l1_coeff, F32)
  ramp = jnp.minimum(jnp.asarray(step, F32) / cfg.l1_warmup_steps, 1.0)
  return cfg.l1_coeff * ramp


def lm_loss(ce: jax.Array, l1_per_layer: jax.Array, *, coeff, norm: str, d_ff: int):
  """(total loss, (cross-entropy, L1 term)) with total = ce + coeff * L1; ``ce`` from
  ``cross_entropy`` or ``head_cross_entropy``."""
  l1 = l1_penalty(l1_per_layer, norm=norm, d_ff=d_ff)
  return ce + coeff * l1, (ce, l1)
