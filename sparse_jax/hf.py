"""Hugging Face Llama-format checkpoints: import into the Flax model, export back.

A checkpoint directory holds ``config.json`` (LlamaConfig fields), the weights as
``model.safetensors`` or shards listed in ``model.safetensors.index.json``, and optionally the
tokenizer as ``tokenizer.json``. HF stores each linear layer's weight as ``[out, in]``::

    HF tensor (per layer i under model.layers.{i}.)   HF shape        sparse_jax parameter
    model.embed_tokens.weight                          [V, D]          embed_VxD
    input_layernorm.weight                             [D]             blocks[i].attn_norm.scale
    self_attn.q_proj.weight                            [N*H, D]        attn.w_q_DxNxH
    self_attn.k_proj.weight / v_proj.weight            [K*H, D]        attn.w_k_DxKxH / w_v_DxKxH
    self_attn.o_proj.weight                            [D, N*H]        attn.w_o_NxHxD
    post_attention_layernorm.weight                    [D]             blocks[i].ffn_norm.scale
    mlp.gate_proj.weight / up_proj.weight              [F, D]          ffn.w_gate_FxD / w_up_FxD
    mlp.down_proj.weight                               [D, F]          ffn.w_down_FxD (transposed)
    model.norm.weight                                  [D]             final_norm.scale
    lm_head.weight                                     [V, D]          absent, or equal to the
                                                                       embedding (tied only)

RoPE: HF's Llama applies ``rotate_half`` (feature i pairs with i + H/2) to q and k exactly as
stored; ``sparse_jax.nn.layers.apply_rope`` uses the same convention and frequencies, so q and k
are imported as they are. (The permutation HF's conversion script applies is between Meta's
original interleaved-pair checkpoints and HF's layout; it does not concern HF files.)

The gate activation comes from ``hidden_act``: ``relu`` -> the paper's ``relu_sparse`` FFN,
``silu`` -> ``silu_dense``; ``ffn=`` overrides it (``relu_dense`` is the dense baseline of a ReLU
checkpoint). Everything is checked before any weight is read: config fields (an unknown field is an
error unless ``allow_unknown_config``), tensor names, shapes (a transposed tensor is named as
such) and dtypes, so a bad checkpoint fails with the tensor or field named, never half-loaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.config import Config, DataConfig, ModelConfig
from sparse_jax.nn import Transformer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
# Issue 14: per-layer dense neuron counts of a checkpoint prepared for sparse inference
# (sparse_jax.inference); other Llama loaders ignore the field (the weights are an ordinary Llama).
HOT_NEURONS_FIELD = "sparse_hot_neurons"

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
            "rope_parameters", "tie_word_embeddings", HOT_NEURONS_FIELD}
_FLOAT_DTYPES = {"F32": np.float32, "BF16": jnp.bfloat16, "F16": np.float16}


# --------------------------------------------------------------------------- config


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
                       compute_dtype=compute_dtype, param_dtype=param_dtype,
                       sparse_hot_neurons=hf.get(HOT_NEURONS_FIELD))
  except ValueError as e:
    raise ValueError(f"config.json describes a model sparse_jax cannot build: {e}") from None


def hf_config(cfg: ModelConfig, *, max_position_embeddings: int, eos_id: int | None,
              dtype: str) -> dict:
  """The LlamaConfig dict of a model (tied embeddings, no biases, default RoPE)."""
  if cfg.ffn not in _FFN_TO_ACT:
    raise ValueError(f"model.ffn={cfg.ffn!r} has no Llama-format equivalent (the Llama FFN is "
                     f"gated); exportable FFNs: {', '.join(_FFN_TO_ACT)}")
  extra = {} if cfg.sparse_hot_neurons is None else {
      HOT_NEURONS_FIELD: list(cfg.sparse_hot_neurons)}
  return extra | {
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


# --------------------------------------------------------------------------- tensor layout


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor: its name, shape, the parameter it becomes, and the layout conversions."""
  hf_name: str
  hf_shape: tuple[int, ...]
  path: tuple  # into nnx.to_pure_dict(model state)
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _same(w):
  return w


def _transpose(w):
  return w.T


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  d, f, n, k, h = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim

  def heads_in(heads):  # HF [heads*H, D] <-> ours [D, heads, H]
    return (lambda w: w.reshape(heads, h, d).transpose(2, 0, 1),
            lambda w: w.transpose(1, 2, 0).reshape(heads * h, d))

  specs = [TensorSpec("model.embed_tokens.weight", (cfg.vocab_size, d), ("embed_VxD",),
                      _same, _same)]
  for i in range(cfg.n_layers):
    pre, blk = f"model.layers.{i}.", ("blocks", i)
    specs += [
        TensorSpec(pre + "input_layernorm.weight", (d,), blk + ("attn_norm", "scale"), _same,
                   _same),
        TensorSpec(pre + "self_attn.q_proj.weight", (n * h, d), blk + ("attn", "w_q_DxNxH"),
                   *heads_in(n)),
        TensorSpec(pre + "self_attn.k_proj.weight", (k * h, d), blk + ("attn", "w_k_DxKxH"),
                   *heads_in(k)),
        TensorSpec(pre + "self_attn.v_proj.weight", (k * h, d), blk + ("attn", "w_v_DxKxH"),
                   *heads_in(k)),
        TensorSpec(pre + "self_attn.o_proj.weight", (d, n * h), blk + ("attn", "w_o_NxHxD"),
                   lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T),
        TensorSpec(pre + "post_attention_layernorm.weight", (d,), blk + ("ffn_norm", "scale"),
                   _same, _same),
        TensorSpec(pre + "mlp.gate_proj.weight", (f, d), blk + ("ffn", "w_gate_FxD"), _same,
                   _same),
        TensorSpec(pre + "mlp.up_proj.weight", (f, d), blk + ("ffn", "w_up_FxD"), _same, _same),
        TensorSpec(pre + "mlp.down_proj.weight", (d, f), blk + ("ffn", "w_down_FxD"),
                   _transpose, _transpose),
    ]
  specs.append(TensorSpec("model.norm.weight", (d,), ("final_norm", "scale"), _same, _same))
  return specs


# --------------------------------------------------------------------------- reading


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


def is_hf_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and any(
      name.endswith(".safetensors") for name in os.listdir(path))


def _weight_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint (the index's shards, or the single file)."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    try:
      with open(index) as fh:
        weight_map = json.load(fh)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
    files = sorted(set(weight_map.values()))
    for name in files:
      if not os.path.isfile(os.path.join(path, name)):
        holds = sorted(t for t, fn in weight_map.items() if fn == name)
        raise FileNotFoundError(f"{index} lists shard {name!r} (holding {holds[0]}"
                                f"{' and more' if len(holds) > 1 else ''}) but it is missing")
    return [os.path.join(path, name) for name in files]
  if os.path.isfile(os.path.join(path, SINGLE_FILE)):
    return [os.path.join(path, SINGLE_FILE)]
  found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
  if len(found) == 1:
    return [os.path.join(path, found[0])]
  other = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
  raise FileNotFoundError(
      f"{path}: no {SINGLE_FILE} or {INDEX_FILE}"
      + (f" ({len(found)} .safetensors files without an index)" if found else "")
      + (f"; found {', '.join(other)}: only safetensors weights are supported" if other else ""))


def _headers(files: list[str], index_map: dict | None) -> dict[str, tuple[str, tuple, str]]:
  """{tensor name: (file, shape, dtype)} from the files' headers (no tensor data read)."""
  from safetensors import safe_open
  out: dict[str, tuple[str, tuple, str]] = {}
  for file in files:
    with safe_open(file, framework="numpy") as fh:
      for name in fh.keys():
        if name in out:
          raise ValueError(f"tensor {name} is stored twice: in {out[name][0]} and {file}")
        sl = fh.get_slice(name)
        out[name] = (file, tuple(sl.get_shape()), sl.get_dtype())
  if index_map is not None:
    for name, shard in index_map.items():
      if name in out and os.path.basename(out[name][0]) != shard:
        raise ValueError(f"{INDEX_FILE} puts {name} in {shard} but it is in "
                         f"{os.path.basename(out[name][0])}")
  return out


def _check_tensors(headers: dict, specs: list[TensorSpec], cfg_tied: bool) -> bool:
  """Checks names, shapes and dtypes against the specs. Returns whether lm_head is stored."""
  wanted = {s.hf_name: s for s in specs}
  missing = [name for name in wanted if name not in headers]
  if missing:
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    raise ValueError(f"checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}")
  has_head = "lm_head.weight" in headers
  unexpected = sorted(set(headers) - set(wanted) - {"lm_head.weight"})
  # HF keeps a rotary inv_freq buffer in some older checkpoints: derived from rope_theta.
  unexpected = [n for n in unexpected if not n.endswith("rotary_emb.inv_freq")]
  if unexpected:
    more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
    raise ValueError(f"checkpoint has tensor(s) the model does not use: "
                     f"{', '.join(unexpected[:3])}{more} (a bias, or another architecture?)")
  if not has_head and not cfg_tied:
    raise ValueError("config.json has tie_word_embeddings=false but the checkpoint has no "
                     "lm_head.weight")
  checks = list(specs)
  if has_head:
    checks.append(TensorSpec("lm_head.weight", wanted["model.embed_tokens.weight"].hf_shape, (),
                             _same, _same))
  for spec in checks:
    file, shape, dtype = headers[spec.hf_name]
    if shape != spec.hf_shape:
      hint = ""
      if shape == spec.hf_shape[::-1]:
        hint = (" It looks transposed: HF stores linear weights as [out_features, in_features]"
                + (" (down_proj is [hidden_size, intermediate_size])"
                   if "down_proj" in spec.hf_name else ""))
      raise ValueError(f"tensor {spec.hf_name} in {os.path.basename(file)} has shape "
                       f"{list(shape)}, expected {list(spec.hf_shape)} from config.json.{hint}")
    if dtype not in _FLOAT_DTYPES:
      raise ValueError(f"tensor {spec.hf_name} has dtype {dtype}; expected one of "
                       f"{', '.join(_FLOAT_DTYPES)}")
  return has_head


def read_hf_tensors(path: str, cfg: ModelConfig, *, tied: bool = True) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint as float32 arrays, after every check has passed."""
  from safetensors import safe_open
  files = _weight_files(path)
  index_map = None
  if os.path.isfile(os.path.join(path, INDEX_FILE)):
    with open(os.path.join(path, INDEX_FILE)) as fh:
      index_map = json.load(fh)["weight_map"]
  headers = _headers(files, index_map)
  specs = tensor_specs(cfg)
  has_head = _check_tensors(headers, specs, tied)
  names = [s.hf_name for s in specs] + (["lm_head.weight"] if has_head else [])
  by_file: dict[str, list[str]] = {}
  for name in names:
    by_file.setdefault(headers[name][0], []).append(name)
  out = {}
  for file, in_file in by_file.items():
    with safe_open(file, framework="numpy") as fh:
      for name in in_file:
        w = np.asarray(fh.get_tensor(name)).astype(np.float32)
        if not np.all(np.isfinite(w)):
          raise ValueError(f"tensor {name} holds non-finite values (NaN or inf)")
        out[name] = w
  if has_head and not np.array_equal(out["lm_head.weight"], out["model.embed_tokens.weight"]):
    raise ValueError("lm_head.weight differs from model.embed_tokens.weight: the checkpoint has "
                     "untied output embeddings, which this model (tied embeddings) cannot hold")
  return out


def _set_path(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _get_path(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def model_from_hf_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> Transformer:
  """A Transformer holding ``tensors`` (HF names and layouts), built without a random init."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  dtype = jnp.dtype(cfg.param_dtype)
  filled = set()
  for spec in tensor_specs(cfg):
    want = _get_path(pure, spec.path)
    value = spec.to_ours(tensors[spec.hf_name])
    if value.shape != want.shape:  # the specs and the model disagree: a bug here, not bad input
      raise AssertionError(f"{spec.hf_name} -> {spec.path}: {value.shape} vs {want.shape}")
    _set_path(pure, spec.path, jnp.asarray(value, dtype))
    filled.add(spec.path)
  leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
  unfilled = [p for p, v in leaves if isinstance(v, jax.ShapeDtypeStruct)]
  if unfilled:
    raise AssertionError(f"parameters without an HF tensor: {unfilled[:3]}")
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def load_hf(path: str, *, ffn: str | None = None, compute_dtype: str = "float32",
            param_dtype: str = "float32", allow_unknown_config: bool = False
            ) -> tuple[Transformer, Config]:
  """(model, config) of a Hugging Face Llama-format checkpoint directory.

  The config's ``data.tokenizer`` is the directory's ``tokenizer.json`` if it has one (else
  ``"bytes"``: check ``has_tokenizer``), and ``data.seq_len`` its ``max_position_embeddings``
  (at most 2048), the default evaluation length.
  """
  hf = read_config(path)
  cfg = model_config_from_hf(hf, ffn=ffn, compute_dtype=compute_dtype, param_dtype=param_dtype,
                             allow_unknown_config=allow_unknown_config)
  tied = hf.get("tie_word_embeddings", False)  # LlamaConfig's default
  tensors = read_hf_tensors(path, cfg, tied=bool(tied))
  model = model_from_hf_tensors(tensors, cfg)
  tok = os.path.join(path, TOKENIZER_FILE)
  seq_len = min(int(hf.get("max_position_embeddings") or 2048), 2048)
  data = DataConfig(tokenizer=tok if os.path.isfile(tok) else "bytes", seq_len=seq_len)
  return model, Config(name=f"hf:{os.path.basename(os.path.normpath(path))}", model=cfg,
                       data=data)


def has_tokenizer(path: str) -> bool:
  return os.path.isfile(os.path.join(path, TOKENIZER_FILE))


# --------------------------------------------------------------------------- writing


def hf_tensors(model: Transformer, dtype: str = "float32") -> dict[str, np.ndarray]:
  """The model's parameters under HF names and layouts, as numpy arrays of ``dtype``."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  np_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}[dtype]
  return {s.hf_name: np.ascontiguousarray(s.to_hf(np.asarray(_get_path(pure, s.path),
                                                             np.float32)).astype(np_dtype))
          for s in tensor_specs(model.cfg)}


def _bytes_to_unicode() -> dict[int, str]:
  # GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to code points 256+.
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out


def byte_tokenizer_json() -> str:
  """A tokenizer.json that encodes exactly as ``sparse_jax.data.ByteTokenizer`` (byte b -> id b,
  then <bos>, <eos>, <pad> = 256, 257, 258), so exported byte-level models stay usable."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  from sparse_jax.data import ByteTokenizer
  vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  specials = {ByteTokenizer.BOS: "<bos>", ByteTokenizer.EOS: "<eos>", ByteTokenizer.PAD: "<pad>"}
  tok.add_special_tokens([AddedToken(specials[i], special=True) for i in sorted(specials)])
  return tok.to_str()


def _write_tensors(tensors: dict[str, np.ndarray], directory: str,
                   max_shard_bytes: int | None) -> list[str]:
  from safetensors.numpy import save_file
  meta = {"format": "pt"}  # what HF's loaders expect of a safetensors checkpoint
  total = sum(t.nbytes for t in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    save_file(tensors, os.path.join(directory, SINGLE_FILE), metadata=meta)
    return [SINGLE_FILE]
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    save_file(shard, os.path.join(directory, name), metadata=meta)
    weight_map.update({t: name for t in shard})
  with open(os.path.join(directory, INDEX_FILE), "w") as fh:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
  return names + [INDEX_FILE]


def _umask_permissions(directory: str) -> None:
  """The modes a plain ``mkdir`` and ``open`` would have given (0777 / 0666 less the umask), not
  mkdtemp's private 0700: an exported model is meant to be shared."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o777 & ~umask)
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def export_hf(model: Transformer, out: str, *, tokenizer: str = "bytes", dtype: str = "float32",
              max_position_embeddings: int = 2048, max_shard_bytes: int | None = None
              ) -> list[str]:
  """Writes ``model`` as a Llama-format checkpoint directory ``out`` (which must not exist yet).

  tokenizer: "bytes" writes the byte tokenizer as a tokenizer.json; a tokenizer.json path is
    copied. dtype: float32, bfloat16 or float16 storage. max_shard_bytes: shard above this size.
  The directory is written under a temporary name and renamed at the end, so an interrupted
  export leaves no half-written checkpoint at ``out``. Returns the file names written.
  """
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r}: must be float32, bfloat16 or float16")
  if os.path.exists(out):
    raise FileExistsError(f"{out} already exists; export into a new directory")
  from sparse_jax.data import load_tokenizer
  tok = load_tokenizer(tokenizer)
  config = hf_config(model.cfg, max_position_embeddings=max_position_embeddings,
                     eos_id=tok.eos_id, dtype=dtype)
  tensors = hf_tensors(model, dtype)
  for name, t in tensors.items():  # a diverged model is refused, not written (the importer would)
    finite = np.isfinite(np.asarray(t, np.float32))
    if not finite.all():
      first = tuple(int(i) for i in np.argwhere(~finite)[0])
      raise ValueError(f"{name} holds non-finite values ({int((~finite).sum())} of {t.size}, "
                       f"first at {first}); the model diverged or overflows {dtype}, nothing was "
                       "exported")
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    files = _write_tensors(tensors, tmp, max_shard_bytes)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
      json.dump(config, fh, indent=2)
    if tokenizer == "bytes":
      with open(os.path.join(tmp, TOKENIZER_FILE), "w") as fh:
        fh.write(byte_tokenizer_json())
    else:
      shutil.copyfile(tokenizer, os.path.join(tmp, TOKENIZER_FILE))
    _umask_permissions(tmp)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return sorted(files + [CONFIG_FILE, TOKENIZER_FILE])
