"""Hugging Face ``config.json`` (LlamaConfig fields) <-> ``ModelConfig``.

Every field is checked before any tensor is read: an unknown field is an error unless
``allow_unknown_config``, and a field whose value would change the model in a way sparse_jax does
not compute is refused with its name.
"""
from __future__ import annotations

import json
import os
import warnings

from sparse_jax.config import ModelConfig

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

_ACT_TO_FFN = {"relu": "relu_sparse", "silu": "silu_dense"}
_FFN_TO_ACT = {"relu_sparse": "relu", "relu_dense": "relu", "silu_dense": "silu"}
# LlamaConfig fields that map onto ModelConfig fields (integers).
_INT_FIELDS = {"hidden_size": "d_model", "intermediate_size": "d_ff",
               "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
               "vocab_size": "vocab_size"}
_OPTIONAL_INT_FIELDS = {"num_key_value_heads": "n_kv_heads", "head_dim": "head_dim"}
# Fields whose value must be this for the model to be the one we compute (else: unsupported).
_REQUIRED_VALUES = {"attention_bias": False, "mlp_bias": False, "rope_scaling": None}
# Fields that do not change what the forward pass computes: token ids (the tokenizer's business),
# storage dtype, training-only settings (initialisation, dropout, tensor-parallel slicing, which
# HF computes to the same result), runtime flags and bookkeeping.
_IGNORED = {"bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
            "transformers_version", "_name_or_path", "initializer_range", "attention_dropout",
            "pretraining_tp", "use_cache", "max_position_embeddings"}
_HANDLED = {"model_type", "architectures", "hidden_act", "rms_norm_eps", "rope_theta",
            "rope_parameters", "tie_word_embeddings"}

def _int_field(hf: dict, name: str) -> int:
  v = hf[name]
  if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
    raise ValueError(f"config.json: {name}={v!r} must be a positive integer")
  return v


def _rope_theta(hf: dict) -> float:
  # transformers >= 4.56 may nest RoPE settings in rope_parameters instead of rope_theta.
  params = hf.get("rope_parameters")
  if params is not None:
    if not isinstance(params, dict):
      raise ValueError(f"config.json: rope_parameters={params!r} must be an object")
    kind = params.get("rope_type", "default")
    if kind != "default":
      raise ValueError(f"config.json: rope_parameters.rope_type={kind!r} is not supported (only "
                       "the default RoPE without scaling)")
    unknown = set(params) - {"rope_type", "rope_theta"}
    if unknown:
      raise ValueError(f"config.json: rope_parameters has unsupported fields {sorted(unknown)}")
    if "rope_theta" in params:
      return float(params["rope_theta"])
  theta = hf.get("rope_theta", 10000.0)  # LlamaConfig's default
  if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
    raise ValueError(f"config.json: rope_theta={theta!r} must be a positive number")
  return float(theta)


def model_config_from_hf(hf: dict, *, ffn: str | None = None, compute_dtype: str = "float32",
                         param_dtype: str = "float32", allow_unknown_config: bool = False
                         ) -> ModelConfig:
  """The ModelConfig of a LlamaConfig dict; errors name the offending field."""
  if not isinstance(hf, dict):
    raise ValueError("config.json must hold a JSON object")
  if hf.get("model_type") != "llama":
    raise ValueError(f"config.json: model_type={hf.get('model_type')!r}; only 'llama' "
                     "checkpoints are supported")
  unknown = sorted(set(hf) - set(_INT_FIELDS) - set(_OPTIONAL_INT_FIELDS) - set(_REQUIRED_VALUES)
                   - _IGNORED - _HANDLED)
  if unknown and not allow_unknown_config:
    raise ValueError(f"config.json: unknown field(s) {', '.join(unknown)}: the importer does not "
                     "know whether they change the model; pass allow_unknown_config=True "
                     "(--allow-unknown-config) to ignore them")
  if unknown:
    warnings.warn(f"config.json: ignoring unknown field(s) {', '.join(unknown)}")
  missing = [k for k in _INT_FIELDS if k not in hf]
  if missing:
    raise ValueError(f"config.json lacks required field(s) {', '.join(missing)}")
  for name, want in _REQUIRED_VALUES.items():
    if hf.get(name, want) != want:
      raise ValueError(f"config.json: {name}={hf[name]!r} is not supported (the model computes "
                       f"{name}={want!r})")
  act = hf.get("hidden_act", "silu")
  if act not in _ACT_TO_FFN:
    raise ValueError(f"config.json: hidden_act={act!r} is not supported; the gate activation "
                     f"must be one of {', '.join(_ACT_TO_FFN)}")
  if ffn is None:
    ffn = _ACT_TO_FFN[act]
  elif ffn not in _FFN_TO_ACT:
    raise ValueError(f"ffn={ffn!r}: a Llama checkpoint has a gated FFN; choose one of "
                     f"{', '.join(_FFN_TO_ACT)}")
  elif _FFN_TO_ACT[ffn] != act:
    warnings.warn(f"ffn={ffn!r} computes the gate with {_FFN_TO_ACT[ffn]}, but the checkpoint "
                  f"was trained with hidden_act={act!r}: the imported model is a different model")
  eps = hf.get("rms_norm_eps", 1e-6)
  if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
    raise ValueError(f"config.json: rms_norm_eps={eps!r} must be a number in (0, 1)")
  fields = {ours: _int_field(hf, name) for name, ours in _INT_FIELDS.items()}
  for name, ours in _OPTIONAL_INT_FIELDS.items():
    if hf.get(name) is not None:
      fields[ours] = _int_field(hf, name)
  if fields.get("head_dim") == fields["d_model"] // fields["n_heads"]:
    del fields["head_dim"]  # the default: configs compare equal to the exported model's
  try:
    return ModelConfig(**fields, ffn=ffn, rope_theta=_rope_theta(hf), norm_eps=float(eps),
                       compute_dtype=compute_dtype, param_dtype=param_dtype)
  except ValueError as e:
    raise ValueError(f"config.json describes a model sparse_jax cannot build: {e}") from None


def hf_config(cfg: ModelConfig, *, max_position_embeddings: int, eos_id: int | None,
              dtype: str) -> dict:
  """The LlamaConfig dict of a model (tied embeddings, no biases, default RoPE)."""
  if cfg.ffn not in _FFN_TO_ACT:
    raise ValueError(f"model.ffn={cfg.ffn!r} has no Llama-format equivalent (the Llama FFN is "
                     f"gated); exportable FFNs: {', '.join(_FFN_TO_ACT)}")
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.attn_head_dim,
      "hidden_act": _FFN_TO_ACT[cfg.ffn], "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": None, "vocab_size": cfg.vocab_size,
      "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
      "max_position_embeddings": max_position_embeddings, "torch_dtype": dtype,
      "bos_token_id": eos_id, "eos_token_id": eos_id,
  }


def read_config(path: str) -> dict:
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (is it a Hugging Face checkpoint "
                            "directory?)")
  try:
    with open(file) as fh:
      return json.load(fh)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from None
