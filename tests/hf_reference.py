"""An independent NumPy Llama forward that reads a Hugging Face checkpoint directory directly.

It follows transformers' LlamaForCausalLM (RMSNorm, RoPE with rotate_half on q/k as stored,
grouped-query attention with repeat_kv, gated MLP, final norm, tied or separate lm_head) in
float64, sharing no code with ``sparse_jax.hf``: the tests compare the imported model against it.
"""
import json
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


def _act(name, x):
  return np.maximum(x, 0.0) if name == "relu" else x / (1.0 + np.exp(-x))


def llama_logits(path: str, tokens_L: np.ndarray) -> np.ndarray:
  """Logits [L, V] (float64) of one token sequence."""
  cfg, t = read_checkpoint(path)
  d, n = cfg["hidden_size"], cfg["num_attention_heads"]
  kv = cfg.get("num_key_value_heads") or n
  hd = cfg.get("head_dim") or d // n
  eps, act = cfg["rms_norm_eps"], cfg["hidden_act"]
  seq = len(tokens_L)
  inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd))
  freqs = np.outer(np.arange(seq), inv_freq)
  emb = np.concatenate([freqs, freqs], axis=-1)
  cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
  causal = np.tril(np.ones((seq, seq), bool))
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
    gate = _act(act, h @ t[p + "mlp.gate_proj.weight"].T)
    x = x + (gate * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
  x = _rms_norm(x, t["model.norm.weight"], eps)
  head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
  return x @ head.T
