"""An independent NumPy Llama forward that reads a Hugging Face checkpoint directory directly.

It follows transformers' LlamaForCausalLM and MistralForCausalLM (RMSNorm, RoPE with rotate_half
on q/k as stored and the rope_type scalings of modeling_rope_utils: linear, llama3, yarn; grouped-
query attention with repeat_kv, Mistral's sliding window, gated MLP with relu, silu or FATReLU
(F.threshold), final norm, tied or separate lm_head) in float64, sharing no code with
``sparse_jax``: the tests compare the imported model against it.
"""
import json
import math
import os

import numpy as np
from safetensors import safe_open


def read_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  tensors = {}
  for name in sorted(os.listdir(path)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(path, name), framework="numpy") as f:
        for key in f.keys():
          tensors[key] = np.asarray(f.get_tensor(key)).astype(np.float64)
  return cfg, tensors


def _rms_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x):
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _act(cfg, x):
  name = cfg["hidden_act"]
  if name == "fatrelu":  # torch.nn.functional.threshold(x, t, 0): x where x > t, else 0
    return np.where(x > cfg["hidden_act_param"], x, 0.0)
  return np.maximum(x, 0.0) if name == "relu" else x / (1.0 + np.exp(-x))


def rope_parameters(cfg: dict) -> dict:
  """transformers 5.x rope_parameters, or the older rope_scaling + rope_theta, as one dict."""
  params = dict(cfg.get("rope_scaling") or {})
  params.update(cfg.get("rope_parameters") or {})
  params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
  params["rope_type"] = params.get("rope_type", params.get("type", "default"))
  return params


def inv_freq_and_scale(cfg: dict, dim: int) -> tuple[np.ndarray, float]:
  """modeling_rope_utils' (inv_freq, attention_scaling) for default/linear/llama3/yarn."""
  p = rope_parameters(cfg)
  base, kind = p["rope_theta"], p["rope_type"]
  inv = 1.0 / (base ** (np.arange(0, dim, 2) / dim))
  if kind == "default":
    return inv, 1.0
  factor = p["factor"]
  if kind == "linear":
    return inv / factor, 1.0
  if kind == "llama3":
    old = p["original_max_position_embeddings"]
    lo, hi = p["low_freq_factor"], p["high_freq_factor"]
    out = []
    for f in inv:
      wavelen = 2 * math.pi / f
      if wavelen < old / hi:
        out.append(f)
      elif wavelen > old / lo:
        out.append(f / factor)
      else:
        s = (old / wavelen - lo) / (hi - lo)
        out.append((1 - s) * f / factor + s * f)
    return np.array(out), 1.0
  if kind == "yarn":
    old = p["original_max_position_embeddings"]
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
    attn = p.get("attention_factor")
    if attn is None:
      attn = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def corr(rot):
      return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = corr(beta_fast), corr(beta_slow)
    if p.get("truncate", True):
      lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
      hi += 0.001
    ramp = np.clip((np.arange(dim // 2) - lo) / (hi - lo), 0, 1)
    extra = 1 - ramp
    return inv / factor * (1 - extra) + inv * extra, attn
  raise ValueError(f"reference: rope_type {kind!r}")


def llama_logits(path: str, tokens_L: np.ndarray) -> np.ndarray:
  """Logits [L, V] (float64) of one token sequence."""
  cfg, t = read_checkpoint(path)
  d, n = cfg["hidden_size"], cfg["num_attention_heads"]
  kv = cfg.get("num_key_value_heads") or n
  hd = cfg.get("head_dim") or d // n
  eps = cfg["rms_norm_eps"]
  seq = len(tokens_L)
  inv_freq, scale = inv_freq_and_scale(cfg, hd)
  freqs = np.outer(np.arange(seq), inv_freq)
  emb = np.concatenate([freqs, freqs], axis=-1)
  cos, sin = scale * np.cos(emb)[:, None, :], scale * np.sin(emb)[:, None, :]
  q_pos, k_pos = np.arange(seq)[:, None], np.arange(seq)[None, :]
  causal = k_pos <= q_pos
  if cfg.get("model_type") == "mistral" and cfg.get("sliding_window"):
    causal &= k_pos > q_pos - cfg["sliding_window"]
  x = t["model.embed_tokens.weight"][tokens_L]
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = _rms_norm(x, t[p + "input_layernorm.weight"], eps)
    q = (h @ t[p + "self_attn.q_proj.weight"].T).reshape(seq, n, hd)
    k = (h @ t[p + "self_attn.k_proj.weight"].T).reshape(seq, kv, hd)
    v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(seq, kv, hd)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = np.repeat(k, n // kv, axis=1), np.repeat(v, n // kv, axis=1)  # HF's repeat_kv
    scores = np.einsum("qnh,knh->nqk", q, k) / np.sqrt(hd)
    scores = np.where(causal[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("nqk,knh->qnh", probs, v).reshape(seq, n * hd)
    x = x + o @ t[p + "self_attn.o_proj.weight"].T
    h = _rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
    gate = _act(cfg, h @ t[p + "mlp.gate_proj.weight"].T)
    x = x + (gate * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
  x = _rms_norm(x, t["model.norm.weight"], eps)
  tied = cfg.get("tie_word_embeddings", False)
  head = t["model.embed_tokens.weight"] if tied else t["lm_head.weight"]
  return x @ head.T
