"""Hugging Face ``config.json`` (LlamaConfig or MistralConfig) <-> ``ModelConfig``.

Mapped: untied output embeddings (``tie_word_embeddings``), RoPE scaling (``rope_type`` linear,
llama3, yarn, from ``rope_parameters`` or ``rope_scaling``; ``sparse_jax.nn.rope``), ReLU and
FATReLU gates (``hidden_act`` relu / fatrelu with ``hidden_act_param``), Mistral's sliding window
(honoured by the attention mask). Refused with the field named: biases, partial rotary, dynamic
and longrope scaling, dReLU and other activations no FFN here computes exactly.

Every field is checked before any tensor is read: an unknown field is an error unless
``allow_unknown_config``, and a field whose value would change the model in a way sparse_jax does
not compute is refused with its name.
"""
from __future__ import annotations

import json
import os
import warnings

from sparse_jax.config import ModelConfig
from sparse_jax.nn.rope import yarn_attention_factor

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# Issue 14: per-layer dense neuron counts of a checkpoint prepared for sparse inference
# (sparse_jax.inference); other Llama loaders ignore the field (the weights are an ordinary Llama).
HOT_NEURONS_FIELD = "sparse_hot_neurons"

# hidden_act -> the FFN that computes it. fatrelu (ProSparse's FATReLU, threshold in
# hidden_act_param): act(x) = x where x > threshold else 0, transformers/vLLM's
# F.threshold(x, threshold, 0): the sparse FFN's gate with model.gate_threshold.
_ACT_TO_FFN = {"relu": "relu_sparse", "fatrelu": "relu_sparse", "silu": "silu_dense"}
_FFN_TO_ACT = {"relu_sparse": "relu", "relu_dense": "relu", "silu_dense": "silu"}
# Activations of public sparse checkpoints that no sparse_jax FFN computes, and why.
_UNMAPPABLE_ACTS = {
    "drelu": "dReLU (TurboSparse) applies ReLU to the gate and to the up projection; the sparse "
             "FFN computes relu(gate) * up",
    "relu2": "squared ReLU is not the sparse FFN's gate activation",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# LlamaConfig fields that map onto ModelConfig fields (integers).
_INT_FIELDS = {"hidden_size": "d_model", "intermediate_size": "d_ff",
               "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
               "vocab_size": "vocab_size"}
_OPTIONAL_INT_FIELDS = {"num_key_value_heads": "n_kv_heads", "head_dim": "head_dim"}
# Fields whose value must be this for the model to be the one we compute (else: unsupported).
_REQUIRED_VALUES = {"attention_bias": False, "mlp_bias": False, "partial_rotary_factor": 1.0}
# Fields that do not change what the forward pass computes: token ids (the tokenizer's business),
# storage dtype, training-only settings (initialisation, dropout, tensor-parallel slicing, which
# HF computes to the same result), runtime flags and bookkeeping.
_IGNORED = {"bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
            "transformers_version", "_name_or_path", "initializer_range", "attention_dropout",
            "pretraining_tp", "use_cache", "max_position_embeddings", "output_attentions",
            "output_hidden_states", "return_dict"}
_HANDLED = {"model_type", "architectures", "hidden_act", "hidden_act_param", "rms_norm_eps",
            "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings",
            "sliding_window", HOT_NEURONS_FIELD}
# RoPE parameters per rope_type (beyond rope_type/type and rope_theta), the ModelConfig field
# each sets, and whether it is required. transformers' defaults apply to the optional ones.
_ROPE_FIELDS = {
    "default": {},
    "linear": {"factor": ("rope_factor", True)},
    "llama3": {"factor": ("rope_factor", True), "low_freq_factor": ("rope_low_freq_factor", True),
               "high_freq_factor": ("rope_high_freq_factor", True),
               "original_max_position_embeddings": ("rope_original_max_len", True)},
    "yarn": {"factor": ("rope_factor", True),
             "original_max_position_embeddings": ("rope_original_max_len", True),
             "beta_fast": ("rope_beta_fast", False), "beta_slow": ("rope_beta_slow", False),
             "truncate": ("rope_truncate", False),
             "attention_factor": ("rope_attention_factor", False),
             "mscale": (None, False), "mscale_all_dim": (None, False)},
}


def _int_field(hf: dict, name: str) -> int:
  v = hf[name]
  if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
    raise ValueError(f"config.json: {name}={v!r} must be a positive integer")
  return v


def _number(where: str, v, *, positive: bool = True) -> float:
  if not isinstance(v, (int, float)) or isinstance(v, bool) or (positive and not v > 0):
    raise ValueError(f"config.json: {where}={v!r} must be a {'positive ' if positive else ''}"
                     "number")
  return float(v)


def _rope_fields(hf: dict) -> dict:
  """The ModelConfig rope_* fields of a config: rope_theta at the top or in rope_parameters
  (transformers >= 4.56), scaling in rope_parameters or the older rope_scaling."""
  params, legacy = hf.get("rope_parameters"), hf.get("rope_scaling")
  for name, value in (("rope_parameters", params), ("rope_scaling", legacy)):
    if value is not None and not isinstance(value, dict):
      raise ValueError(f"config.json: {name}={value!r} must be an object or null")
  if params is not None and legacy is not None:
    scaling_keys = set(legacy) - {"rope_theta"}
    if any(params.get(k) != legacy[k] for k in scaling_keys if k != "type"):
      raise ValueError("config.json: rope_parameters and rope_scaling disagree: "
                       f"{params} vs {legacy}")
  merged = {**(legacy or {}), **(params or {})}
  where = "rope_parameters" if params is not None else "rope_scaling"
  kind = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
  merged.pop("type", None)
  if kind not in _ROPE_FIELDS:
    raise ValueError(f"config.json: {where}.rope_type={kind!r} is not supported; supported: "
                     f"{', '.join(_ROPE_FIELDS)} (dynamic and longrope scale with the input "
                     "length, which the model does not do)")
  theta = merged.pop("rope_theta", hf.get("rope_theta", 10000.0))  # LlamaConfig's default
  out: dict = {"rope_theta": _number("rope_theta", theta)}
  if merged.pop("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"config.json: {where}.partial_rotary_factor must be 1 (the model rotates "
                     "every feature of a head)")
  spec = _ROPE_FIELDS[kind]
  unknown = sorted(set(merged) - set(spec))
  if unknown:
    raise ValueError(f"config.json: {where} has field(s) {', '.join(unknown)} that "
                     f"rope_type={kind!r} does not use")
  missing = sorted(k for k, (_, required) in spec.items() if required and merged.get(k) is None)
  if missing:
    raise ValueError(f"config.json: {where} with rope_type={kind!r} needs {', '.join(missing)}")
  if kind == "default":
    return out
  out["rope_scaling"] = kind
  for key, (field, _) in spec.items():
    value = merged.get(key)
    if value is None or field is None:
      continue
    if key == "truncate":
      if not isinstance(value, bool):
        raise ValueError(f"config.json: {where}.truncate={value!r} must be true or false")
      out[field] = value
    elif key == "original_max_position_embeddings":
      out[field] = _int_field(merged, key)
    else:
      out[field] = _number(f"{where}.{key}", value)
  if kind == "yarn":
    max_pos = hf.get("max_position_embeddings")
    implied = None if max_pos is None else max_pos / out["rope_original_max_len"]
    # transformers 4.x replaces factor by max_position_embeddings / original_max_position_
    # embeddings, 5.x keeps factor: only where the two agree is the model one model.
    if implied is None or abs(implied - out["rope_factor"]) > 1e-9 * out["rope_factor"]:
      raise ValueError(f"config.json: yarn with factor={out['rope_factor']} but "
                       f"max_position_embeddings / original_max_position_embeddings = {implied}; "
                       "transformers versions disagree on which one applies, so this checkpoint "
                       "has no single meaning")
    if "rope_attention_factor" not in out:
      out["rope_attention_factor"] = yarn_attention_factor(
          out["rope_factor"], merged.get("mscale"), merged.get("mscale_all_dim"))
  elif merged.get("attention_factor") is not None:
    raise ValueError(f"config.json: {where}.attention_factor applies to yarn only")
  return out


def _activation(hf: dict) -> tuple[str, float]:
  """(hidden_act, gate threshold) of a config, refused where no FFN computes it exactly."""
  act = hf.get("hidden_act", "silu")
  if isinstance(act, str) and act.lower() in _UNMAPPABLE_ACTS:
    raise ValueError(f"config.json: hidden_act={act!r} cannot be imported exactly: "
                     f"{_UNMAPPABLE_ACTS[act.lower()]}")
  if act not in _ACT_TO_FFN:
    raise ValueError(f"config.json: hidden_act={act!r} is not supported; the gate activation "
                     f"must be one of {', '.join(_ACT_TO_FFN)}")
  param = hf.get("hidden_act_param")
  if act == "fatrelu":
    if param is None:
      raise ValueError("config.json: hidden_act='fatrelu' needs hidden_act_param (the threshold)")
    threshold = _number("hidden_act_param", param, positive=False)
    if threshold < 0:
      raise ValueError(f"config.json: hidden_act_param={param!r} must be >= 0 (FATReLU's "
                       "threshold)")
    return act, threshold
  if param not in (None, 0, 0.0):
    raise ValueError(f"config.json: hidden_act_param={param!r} has no meaning for "
                     f"hidden_act={act!r}")
  return act, 0.0


def model_config_from_hf(hf: dict, *, ffn: str | None = None, compute_dtype: str = "float32",
                         param_dtype: str = "float32", allow_unknown_config: bool = False
                         ) -> ModelConfig:
  """The ModelConfig of a LlamaConfig (or Llama-compatible MistralConfig) dict; errors name the
  offending field."""
  if not isinstance(hf, dict):
    raise ValueError("config.json must hold a JSON object")
  if hf.get("model_type") not in _MODEL_TYPES:
    raise ValueError(f"config.json: model_type={hf.get('model_type')!r}; supported: "
                     f"{', '.join(_MODEL_TYPES)}")
  handled = _HANDLED if hf["model_type"] == "mistral" else _HANDLED - {"sliding_window"}
  unknown = sorted(set(hf) - set(_INT_FIELDS) - set(_OPTIONAL_INT_FIELDS) - set(_REQUIRED_VALUES)
                   - _IGNORED - handled)
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
  act, threshold = _activation(hf)
  if ffn is None:
    ffn = _ACT_TO_FFN[act]
  elif ffn not in _FFN_TO_ACT:
    raise ValueError(f"ffn={ffn!r}: a Llama checkpoint has a gated FFN; choose one of "
                     f"{', '.join(_FFN_TO_ACT)}")
  elif _FFN_TO_ACT[ffn] != _FFN_TO_ACT[_ACT_TO_FFN[act]]:
    warnings.warn(f"ffn={ffn!r} computes the gate with {_FFN_TO_ACT[ffn]}, but the checkpoint "
                  f"was trained with hidden_act={act!r}: the imported model is a different model")
    threshold = 0.0 if ffn == "silu_dense" else threshold
  eps = hf.get("rms_norm_eps", 1e-6)
  if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
    raise ValueError(f"config.json: rms_norm_eps={eps!r} must be a number in (0, 1)")
  tied = hf.get("tie_word_embeddings", False)  # LlamaConfig's and MistralConfig's default
  if not isinstance(tied, bool):
    raise ValueError(f"config.json: tie_word_embeddings={tied!r} must be true or false")
  # Mistral's sliding window (LlamaConfig has none: transformers' Llama ignores the field, which
  # is then unknown above).
  window = hf.get("sliding_window") if hf["model_type"] == "mistral" else None
  if window is not None:
    window = _int_field(hf, "sliding_window")
  fields = {ours: _int_field(hf, name) for name, ours in _INT_FIELDS.items()}
  for name, ours in _OPTIONAL_INT_FIELDS.items():
    if hf.get(name) is not None:
      fields[ours] = _int_field(hf, name)
  if fields.get("head_dim") == fields["d_model"] // fields["n_heads"]:
    del fields["head_dim"]  # the default: configs compare equal to the exported model's
  try:
    return ModelConfig(**fields, **_rope_fields(hf), ffn=ffn, norm_eps=float(eps),
                       tie_embeddings=tied, gate_threshold=threshold, sliding_window=window,
                       compute_dtype=compute_dtype, param_dtype=param_dtype,
                       sparse_hot_neurons=hf.get(HOT_NEURONS_FIELD))
  except ValueError as e:
    raise ValueError(f"config.json describes a model sparse_jax cannot build: {e}") from None


def _rope_config(cfg: ModelConfig) -> dict | None:
  """The rope_scaling object of ``cfg`` in transformers' spelling (None: no scaling)."""
  if cfg.rope_scaling == "none":
    return None
  out: dict = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
  if cfg.rope_scaling == "llama3":
    out.update(low_freq_factor=cfg.rope_low_freq_factor,
               high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_len)
  elif cfg.rope_scaling == "yarn":
    out.update(original_max_position_embeddings=cfg.rope_original_max_len,
               beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
               attention_factor=cfg.rope_attention_factor)
    if not cfg.rope_truncate:
      out["truncate"] = False
  return out


def hf_config(cfg: ModelConfig, *, max_position_embeddings: int, eos_id: int | None,
              pad_id: int | None = None, dtype: str) -> dict:
  """The LlamaConfig dict of a model (MistralConfig with a sliding window).

  max_position_embeddings: the context the model was trained for (with yarn scaling: the
  scaled context original_max_len x factor, which transformers reads the scaling from).
  bos_token_id is the end-of-document id: a document starts after one (sparse_jax trains
  without a beginning-of-sequence token).
  """
  if cfg.ffn not in _FFN_TO_ACT:
    raise ValueError(f"model.ffn={cfg.ffn!r} has no Llama-format equivalent (the Llama FFN is "
                     f"gated); exportable FFNs: {', '.join(_FFN_TO_ACT)}")
  if cfg.rope_scaling == "yarn":
    max_position_embeddings = round(cfg.rope_original_max_len * cfg.rope_factor)
  model_type = "llama" if cfg.sliding_window is None else "mistral"
  extra = {} if cfg.sparse_hot_neurons is None else {
      HOT_NEURONS_FIELD: list(cfg.sparse_hot_neurons)}
  out = extra | {
      "architectures": [_MODEL_TYPES[model_type]], "model_type": model_type,
      "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.attn_head_dim,
      "hidden_act": _FFN_TO_ACT[cfg.ffn], "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": _rope_config(cfg),
      "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": max_position_embeddings, "torch_dtype": dtype,
      "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
  }
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out["sliding_window"] = cfg.sliding_window
  if cfg.gate_threshold != 0:
    # ProSparse's spelling; transformers' own Llama has no fatrelu (loading needs custom code or
    # an activation patched in, as experiments/check_hf_transformers.py does).
    out.update(hidden_act="fatrelu", hidden_act_param=cfg.gate_threshold)
  return out


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
