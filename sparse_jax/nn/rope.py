"""RoPE frequencies of a ModelConfig, with the scalings Llama-family checkpoints use.

Computed as transformers' ``modeling_rope_utils`` does (``_compute_*_parameters``), on the host in
float64 and rounded once to float32, for a head of H features (H/2 rotated pairs):

* none:   inv_freq_i = theta^(-2i/H)
* linear: inv_freq_i / factor (positions interpolated by ``factor``)
* llama3: wavelengths 2 pi / inv_freq longer than original_max_len / low_freq_factor are divided by
  factor, shorter than original_max_len / high_freq_factor kept, and those in between
  interpolated with s = (original_max_len / wavelen - low) / (high - low):
  (1 - s) inv_freq / factor + s inv_freq.
* yarn:   inv_freq = interp (1 - e) + extrap e with extrap = inv_freq, interp = inv_freq / factor,
  e_i = 1 - clip((i - low) / (high - low), 0, 1), [low, high] the dimensions (floored / ceiled
  when ``truncate``) where beta_fast and beta_slow rotations fit into original_max_len; cos and
  sin are multiplied by ``rope_attention_factor`` (resolved from factor and mscale at import).
"""
from __future__ import annotations

import math

import numpy as np

from sparse_jax.config import ModelConfig


def _yarn_correction_range(cfg: ModelConfig, dim: int) -> tuple[float, float]:
  def dim_of(rotations: float) -> float:
    return (dim * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi))
            / (2 * math.log(cfg.rope_theta)))

  low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
  if cfg.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  return max(low, 0), min(high, dim - 1)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [H/2] float32 of ``cfg``'s rotary embedding."""
  dim = cfg.attn_head_dim
  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  kind, factor = cfg.rope_scaling, cfg.rope_factor
  if kind == "linear":
    inv_freq = inv_freq / factor
  elif kind == "llama3":
    old = cfg.rope_original_max_len
    low_wavelen = old / cfg.rope_low_freq_factor
    high_wavelen = old / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = ((old / wavelen - cfg.rope_low_freq_factor)
              / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  elif kind == "yarn":
    low, high = _yarn_correction_range(cfg, dim)
    if low == high:
      high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
  elif kind != "none":
    raise ValueError(f"model.rope_scaling={kind!r}: unknown")
  return inv_freq.astype(np.float32)


def yarn_attention_factor(factor: float, mscale: float | None = None,
                          mscale_all_dim: float | None = None) -> float:
  """transformers' default YaRN attention factor (when the config gives none)."""
  def get_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if mscale and mscale_all_dim:
    return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
  return get_mscale(factor)
