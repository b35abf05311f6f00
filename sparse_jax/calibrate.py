"""Calibrated FFN gate sparsity in a whole (untrained) model, with no biases and no kernel change.

A freshly initialised ReLU-gated model fires about half of its FFN neurons; benchmarks of the
sparse model need the sparsity of a trained one (>99%) without training it first. The FFNs have no
biases, so per-neuron thresholds are built into the model's own weights (``calibrate_gates``):

0. **Weight shaping** (``shape_weights``). Random-init attention averages nearly uniformly over the
   prefix, so the FFN inputs of a sequence share a large slowly varying component: a per-neuron
   threshold fitted on some sequences then misses badly on others (measured: 1.3-2.8x the target
   activity on fresh sequences after 1-3 layers). The attention output projections are scaled by
   ``attn_out_scale`` (0.1), which leaves FFN inputs mostly token-specific (early positions, whose
   attention averages few tokens, still fire more, as in trained models). In the ``"skewed"``
   profile each embedding row (channels 1:) is also scaled by a per-token-id factor
   ``exp(0.2 N(0, 1))``, the FFN benchmark's per-token scale: busy tokens fire several times the
   mean (hundreds of neurons for the top 1%, as the paper reports for trained models;
   docs/method.md).
1. **A constant residual channel** (``add_constant_channel``): column 0 of the (tied) embedding is
   set to a constant ``c > 0``, and the rows of every attention output projection and FFN down
   projection that write into residual channel 0 are zeroed. Residual channel 0 then holds exactly
   ``c`` at every layer (nothing else writes into it), so each FFN's input ``u = RMSNorm(x)`` has
   ``u_0 = c * scale_0 / rms(x) > 0`` for every token. With tied embeddings the constant adds the
   same amount to every logit of a token, which the softmax ignores.
2. **Per-neuron thresholds**, layer by layer (each layer sees the outputs of the already
   calibrated layers below it): neuron j's pre-activation is ``u_0 * g_j0 + r_j`` (``r_j`` = the
   other channels). With ``g_j0 = -theta_j`` the neuron fires iff ``r_j / u_0 > theta_j``, whatever
   the token's ``u_0``. ``theta_j`` is the ``1 - alpha * p_j`` quantile of ``r_j / u_0`` over the
   first half of the calibration sequences; the layer's scalar ``alpha`` (bisection) makes the mean
   active fraction on the second half equal the target (it corrects the overshoot of quantiles
   fitted on few sequences; recorded, ~0.7-1). The rates ``p_j`` come from
   ``sparse_jax.synthetic.firing_probabilities`` (the FFN benchmark's neuron profiles):
   ``"uniform"`` (all equal), ``"zipf"`` (rate of rank k ~ 1/k, hot neurons anywhere),
   ``"clustered"`` (skewed with the hottest neurons packed into two adjacent TwELL tiles) or
   ``"skewed"`` (30% of neurons dead, the others log-uniform over three orders of
   magnitude), with mean ``target_active_fraction``. Dead neurons get a threshold far above every
   calibration value.
3. **Measurement** (``measure_activity``): the achieved active fraction per layer on other tokens
   (a fresh batch), counted as the sparse op counts it, and the per-token distribution. A target
   is a claim only once measured.

Only weights change, so dense and sparse models built around the same calibrated weights compute
the same function, and the compute (FLOPs, shapes) is the model's own.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.nn.model import Transformer
from sparse_jax.ops.dense import matmul_nn, matmul_nt
from sparse_jax.synthetic import NEURON_PROFILES, SKEWED_TOKEN_SIGMA, firing_probabilities

F32 = jnp.float32
PROFILES = NEURON_PROFILES
ATTN_OUT_SCALE = 0.1
TOKEN_SCALE_SIGMA = SKEWED_TOKEN_SIGMA  # the FFN benchmark's per-token scale (non-uniform profiles)


@dataclasses.dataclass(frozen=True)
class Calibration:
  target_active_fraction: float
  profile: str
  constant: float
  firing_prob_LxF: np.ndarray          # the per-neuron rates asked for
  fit_active_fraction_L: np.ndarray    # achieved on the half of the tokens that fit quantiles
  check_active_fraction_L: np.ndarray  # on the half that set the correction (~ the target)
  alpha_L: np.ndarray                  # per-layer correction: quantiles at 1 - alpha * p_j
  attn_out_scale: float
  token_scale_sigma: float


def add_constant_channel(model: Transformer, constant: float = 1.0) -> None:
  """Residual channel 0 := ``constant`` at every layer (in place; see the module docstring)."""
  if not constant > 0:
    raise ValueError(f"constant={constant!r}: must be positive (u_0 > 0 keeps the threshold "
                     "test r / u_0 > theta the same for every token)")
  emb = model.embed_VxD
  emb[...] = emb[...].at[:, 0].set(constant)
  for i, block in enumerate(model.blocks):
    if not float(block.ffn_norm.scale[...][0]) > 0:
      raise ValueError(f"layer {i}: ffn_norm scale of channel 0 is "
                       f"{float(block.ffn_norm.scale[...][0])}, must be positive")
    w_o = block.attn.w_o_NxHxD
    w_o[...] = w_o[...].at[:, :, 0].set(0)
    w_d = block.ffn.w_down_FxD
    w_d[...] = w_d[...].at[:, 0].set(0)


def shape_weights(model: Transformer, *, attn_out_scale: float, token_scale_sigma: float,
                  seed: int) -> None:
  """The two weight changes besides the constant channel (in place; module docstring, step 0):
  attention output projections times ``attn_out_scale``; embedding rows (channels 1:) times a
  per-token-id factor exp(token_scale_sigma * N(0, 1))."""
  if not attn_out_scale > 0:
    raise ValueError(f"attn_out_scale={attn_out_scale!r}: must be positive")
  if not token_scale_sigma >= 0:
    raise ValueError(f"token_scale_sigma={token_scale_sigma!r}: must be >= 0")
  for block in model.blocks:
    w_o = block.attn.w_o_NxHxD
    w_o[...] = w_o[...] * attn_out_scale
  if token_scale_sigma > 0:
    emb = model.embed_VxD
    rng = np.random.default_rng([seed, 1])
    s_V = np.exp(token_scale_sigma * rng.standard_normal(emb.shape[0])).astype(np.float32)
    emb[...] = emb[...].at[:, 1:].multiply(jnp.asarray(s_V, emb[...].dtype)[:, None])


# ------------------------------------------------------------------- layer-by-layer walking
# Each block is split into (graphdef, state); blocks of one model share a graphdef, so every
# function below compiles once per model shape, not once per layer.


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _to_ffn_input(graphdef, state, x_BxLxD):
  """Residual after the block's attention, and the FFN's input (compute dtype)."""
  block = nnx.merge(graphdef, state)
  x_BxLxD = x_BxLxD + block.attn(block.attn_norm(x_BxLxD))
  return x_BxLxD, block.ffn_norm(x_BxLxD)


def _gate_weights(ffn):
  dt = ffn.compute_dtype
  return ffn.gate_param[...].astype(dt), (ffn.w_up_FxD[...].astype(dt) if ffn.gated else None)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _ffn_residual(graphdef, state, x_BxLxD, u_BxLxD):
  """x + FFN(u), the dense FFN in the compute dtype (hidden in f32, as ``ops.dense``)."""
  block = nnx.merge(graphdef, state)
  ffn = block.ffn
  dt = ffn.compute_dtype
  u_MxD = u_BxLxD.reshape(-1, u_BxLxD.shape[-1]).astype(dt)
  w_gate, w_up = _gate_weights(ffn)
  h = ffn.activation(matmul_nt(u_MxD, w_gate))  # ReLU, or FATReLU (model.gate_threshold)
  if w_up is not None:
    h = h * matmul_nt(u_MxD, w_up)
  y = matmul_nn(h.astype(dt), ffn.w_down_FxD[...].astype(dt)).astype(dt)
  return x_BxLxD + y.reshape(x_BxLxD.shape)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _active_per_token(graphdef, state, u_BxLxD):
  """[M] int32 active neurons per token, counted as the sparse op counts them (relu(gate) != 0
  in the compute dtype)."""
  ffn = nnx.merge(graphdef, state).ffn
  dt = ffn.compute_dtype
  u_MxD = u_BxLxD.reshape(-1, u_BxLxD.shape[-1]).astype(dt)
  gate = ffn.activation(matmul_nt(u_MxD, _gate_weights(ffn)[0])).astype(dt)
  return jnp.sum(gate != 0, axis=1, dtype=jnp.int32)


def _ratios(u_MxD, w_gate_FxD):
  """r_j / u_0 for every token and neuron (f32), and min u_0 (must be positive)."""
  u0_M = u_MxD[:, 0].astype(F32)
  return matmul_nt(u_MxD[:, 1:], w_gate_FxD[:, 1:]) / u0_M[:, None], jnp.min(u0_M)


def _quantile_thresholds(s_MxF, p_F):
  """theta [F]: the 1 - p quantile of each (sorted) column, interpolated between order statistics
  so that exactly p * M values lie above it when p * M is an integer; p = 0 (dead neurons): far
  above every value."""
  m = s_MxF.shape[0]
  pos_F = jnp.clip((1.0 - p_F) * m - 0.5, 0.0, m - 1.0)
  lo_F = jnp.floor(pos_F).astype(jnp.int32)
  hi_F = jnp.minimum(lo_F + 1, m - 1)
  frac_F = pos_F - lo_F
  take = lambda idx: jnp.take_along_axis(s_MxF, idx[None, :], axis=0)[0]
  theta_F = take(lo_F) * (1.0 - frac_F) + take(hi_F) * frac_F
  dead_F = s_MxF[-1] + 100.0 * (s_MxF[-1] - s_MxF[0]) + 1.0
  return jnp.where(p_F > 0, theta_F, dead_F)


@functools.partial(jax.jit, static_argnames=("steps",))
def _thresholds(u_fit_MxD, u_check_NxD, w_gate_FxD, p_F, steps: int = 30):
  """(theta [F], alpha, min u_0). theta_j is the 1 - alpha p_j quantile of r_j / u_0 on the fit
  tokens; the scalar alpha (bisection) makes the mean active fraction on the check tokens equal
  mean(p). Per-neuron quantiles fitted on a few sequences overshoot on other sequences (tokens of
  a sequence share a context component, so the fit sees few independent draws of it, and the
  tail mass is convex in the threshold); alpha removes that bias for the layer as a whole."""
  r_fit, u0_fit = _ratios(u_fit_MxD, w_gate_FxD)
  r_check, u0_check = _ratios(u_check_NxD, w_gate_FxD)
  s_MxF = jnp.sort(r_fit, axis=0)
  target = jnp.mean(p_F)

  def rate(alpha):
    theta_F = _quantile_thresholds(s_MxF, jnp.minimum(alpha * p_F, 1.0))
    return jnp.mean((r_check > theta_F[None, :]).astype(F32))

  def bisect(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    low = rate(mid) < target
    return jnp.where(low, mid, lo), jnp.where(low, hi, mid)

  # rate(alpha) grows with alpha; alpha = 1 is the plain per-neuron fit.
  hi = jnp.maximum(1.0, 1.0 / jnp.maximum(jnp.max(p_F), 1e-12))
  lo, hi = jax.lax.fori_loop(0, steps, bisect, (jnp.zeros((), F32), jnp.asarray(hi, F32)))
  alpha = 0.5 * (lo + hi)
  theta_F = _quantile_thresholds(s_MxF, jnp.minimum(alpha * p_F, 1.0))
  return theta_F, alpha, jnp.minimum(u0_fit, u0_check)


def _embed(model: Transformer, tokens_BxL) -> jax.Array:
  return jnp.take(model.embed_VxD[...].astype(model.compute_dtype), jnp.asarray(tokens_BxL),
                  axis=0)


def calibrate_gates(model: Transformer, tokens_BxL, *, target_active_fraction: float,
                    profile: str = "skewed", seed: int = 0, constant: float = 1.0,
                    attn_out_scale: float = ATTN_OUT_SCALE,
                    token_scale_sigma: float | None = None) -> Calibration:
  """Adds the constant channel and sets every FFN's gate column 0 (in place) so that each layer
  fires ``target_active_fraction`` of its neurons on average, per-neuron rates from ``profile``.

  ``tokens_BxL``: the calibration batch (int token ids, B >= 2 sequences). Its first half of the
  sequences fits the per-neuron quantiles, the second half sets each layer's correction factor
  (``_thresholds``). More tokens give better quantiles for rarely firing neurons (the skewed
  profile asks for rates down to ~1e-3 x the mean rate), more sequences a better correction.
  """
  if profile not in PROFILES:
    raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
  if not 0.0 < target_active_fraction < 1.0:
    raise ValueError(f"target_active_fraction={target_active_fraction!r}: must be in (0, 1)")
  tokens_BxL = np.asarray(tokens_BxL)
  if tokens_BxL.ndim != 2 or tokens_BxL.shape[0] < 2:
    raise ValueError(f"tokens must be [batch >= 2, length] (half fits, half checks), got shape "
                     f"{tokens_BxL.shape}")
  cfg = model.cfg
  if cfg.d_model < 2:
    raise ValueError("d_model must be at least 2 (channel 0 carries the thresholds)")
  # A profile that cannot be made at this d_ff (e.g. clustered) fails before the model changes.
  firing_probabilities(np.random.default_rng(seed), cfg.d_ff, target_active_fraction * cfg.d_ff,
                       profile)
  if token_scale_sigma is None:
    token_scale_sigma = TOKEN_SCALE_SIGMA if profile != "uniform" else 0.0
  shape_weights(model, attn_out_scale=attn_out_scale, token_scale_sigma=token_scale_sigma,
                seed=seed)
  add_constant_channel(model, constant)
  rng = np.random.default_rng(seed)
  half = tokens_BxL.shape[0] // 2
  xs = [_embed(model, tokens_BxL[:half]), _embed(model, tokens_BxL[half:])]
  probs, fit_active, check_active, alphas = [], [], [], []
  for i, block in enumerate(model.blocks):
    graphdef, state = nnx.split(block)
    xs, us = zip(*(_to_ffn_input(graphdef, state, x) for x in xs))
    p_F = firing_probabilities(rng, cfg.d_ff, target_active_fraction * cfg.d_ff, profile)
    ffn = block.ffn
    flat = [u.reshape(-1, u.shape[-1]) for u in us]
    theta_F, alpha, u0_min = _thresholds(flat[0], flat[1], _gate_weights(ffn)[0],
                                         jnp.asarray(p_F, F32))
    if not float(u0_min) > 0:
      raise RuntimeError(f"layer {i}: the constant channel of the FFN input is not positive "
                         f"(min {float(u0_min)}); was the model changed after "
                         "add_constant_channel?")
    gp = ffn.gate_param
    gp[...] = gp[...].at[:, 0].set((-theta_F).astype(gp[...].dtype))
    graphdef, state = nnx.split(block)
    fit, check = (float(jnp.mean(_active_per_token(graphdef, state, u))) / cfg.d_ff for u in us)
    fit_active.append(fit)
    check_active.append(check)
    alphas.append(float(alpha))
    xs = [_ffn_residual(graphdef, state, x, u) for x, u in zip(xs, us)]
    probs.append(p_F)
  return Calibration(target_active_fraction=target_active_fraction, profile=profile,
                     constant=constant, firing_prob_LxF=np.stack(probs),
                     fit_active_fraction_L=np.asarray(fit_active),
                     check_active_fraction_L=np.asarray(check_active),
                     alpha_L=np.asarray(alphas), attn_out_scale=attn_out_scale,
                     token_scale_sigma=token_scale_sigma)


def measure_activity(model: Transformer, tokens_BxL) -> dict:
  """Per-layer FFN activity of ``model`` on ``tokens_BxL``, counted as the sparse op counts it.

  Returns ``active_fraction_L`` (mean share of active neurons per token), ``active_per_token_L``
  (mean count) and the per-token distribution's ``p50_L``, ``p99_L``, ``max_L``. Walks the layers
  with the dense FFN (the same function as every implementation), one layer's activations at a
  time.
  """
  d_ff = model.cfg.d_ff
  x = _embed(model, tokens_BxL)
  out = {k: [] for k in ("active_per_token_L", "p50_L", "p99_L", "max_L")}
  for block in model.blocks:
    graphdef, state = nnx.split(block)
    x, u = _to_ffn_input(graphdef, state, x)
    counts = np.asarray(_active_per_token(graphdef, state, u))
    out["active_per_token_L"].append(float(counts.mean()))
    out["p50_L"].append(float(np.percentile(counts, 50)))
    out["p99_L"].append(float(np.percentile(counts, 99)))
    out["max_L"].append(int(counts.max()))
    x = _ffn_residual(graphdef, state, x, u)
  res = {k: np.asarray(v) for k, v in out.items()}
  res["active_fraction_L"] = res["active_per_token_L"] / d_ff
  return res
