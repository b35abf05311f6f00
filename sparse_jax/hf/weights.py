"""HF tensor names and layouts <-> the Transformer's parameters; safetensors reading and writing.

HF stores each linear layer's weight as ``[out, in]``::

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
    lm_head.weight                                     [V, D]          lm_head_VxD (untied); tied:
                                                                       absent or equal to embed

RoPE: HF's Llama applies ``rotate_half`` (feature i pairs with i + H/2) to q and k exactly as
stored; ``sparse_jax.nn.layers.apply_rope`` uses the same convention and frequencies, so q and k
are imported as they are. (The permutation HF's conversion script applies is between Meta's
original interleaved-pair checkpoints and HF's layout; it does not concern HF files.)

Names, shapes (a transposed tensor is named as such) and dtypes are checked from the files'
headers before any tensor data is read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.config import ModelConfig
from sparse_jax.hf.config import CONFIG_FILE
from sparse_jax.nn import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F32": np.float32, "BF16": jnp.bfloat16, "F16": np.float16}


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
  if not cfg.tie_embeddings:
    specs.append(TensorSpec("lm_head.weight", (cfg.vocab_size, d), ("lm_head_VxD",), _same, _same))
  return specs


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


def _check_tensors(headers: dict, specs: list[TensorSpec]) -> bool:
  """Checks names, shapes and dtypes against the specs. Returns whether a tied model's checkpoint
  stores an lm_head.weight anyway (it must then equal the embedding)."""
  wanted = {s.hf_name: s for s in specs}
  missing = [name for name in wanted if name not in headers]
  if missing:
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    raise ValueError(f"checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}")
  has_head = "lm_head.weight" in headers and "lm_head.weight" not in wanted
  unexpected = sorted(set(headers) - set(wanted) - {"lm_head.weight"})
  # HF keeps a rotary inv_freq buffer in some older checkpoints: derived from rope_theta.
  unexpected = [n for n in unexpected if not n.endswith("rotary_emb.inv_freq")]
  if unexpected:
    more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
    raise ValueError(f"checkpoint has tensor(s) the model does not use: "
                     f"{', '.join(unexpected[:3])}{more} (a bias, or another architecture?)")
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


def read_hf_tensors(path: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint as float32 arrays, after every check has passed."""
  from safetensors import safe_open
  files = _weight_files(path)
  index_map = None
  if os.path.isfile(os.path.join(path, INDEX_FILE)):
    with open(os.path.join(path, INDEX_FILE)) as fh:
      index_map = json.load(fh)["weight_map"]
  headers = _headers(files, index_map)
  specs = tensor_specs(cfg)
  has_head = _check_tensors(headers, specs)
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
    raise ValueError("lm_head.weight differs from model.embed_tokens.weight, but config.json has "
                     "tie_word_embeddings=true (transformers would drop lm_head.weight): which "
                     "head the checkpoint means is ambiguous")
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


def hf_tensors(model: Transformer, dtype: str = "float32") -> dict[str, np.ndarray]:
  """The model's parameters under HF names and layouts, as numpy arrays of ``dtype``."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  np_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}[dtype]
  return {s.hf_name: np.ascontiguousarray(s.to_hf(np.asarray(_get_path(pure, s.path),
                                                             np.float32)).astype(np_dtype))
          for s in tensor_specs(model.cfg)}


def write_tensors(tensors: dict[str, np.ndarray], directory: str,
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
