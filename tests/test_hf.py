"""Hugging Face Llama checkpoints: import matches an independent NumPy forward, export round-trips,
bad checkpoints fail naming the tensor or field, the byte tokenizer survives as tokenizer.json."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import llama_logits
from safetensors.numpy import save_file

from sparse_jax import hf
from sparse_jax.config import ModelConfig
from sparse_jax.data import ByteTokenizer, load_tokenizer
from sparse_jax.nn import Transformer, forward_with_stats

forward = nnx.jit(forward_with_stats)


def hf_config(**kw) -> dict:
  cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=48,
             intermediate_size=136, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=8, hidden_act="relu", rms_norm_eps=1e-5,
             rope_theta=500.0, vocab_size=300, tie_word_embeddings=True, attention_bias=False,
             mlp_bias=False, max_position_embeddings=64, torch_dtype="float32",
             bos_token_id=1, eos_token_id=2, initializer_range=0.02, use_cache=True,
             transformers_version="4.46.0")
  cfg.update(kw)
  return cfg


def random_tensors(rng: np.random.Generator, cfg: dict) -> dict[str, np.ndarray]:
  """Random weights in HF names and layouts ([out, in]); norms around 1, not all ones."""
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  n, k, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

  def w(*shape):
    return (rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float32)

  def norm():
    return (1 + 0.3 * rng.standard_normal(d)).astype(np.float32)

  t = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": norm()}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t.update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
              p + "self_attn.q_proj.weight": w(n * h, d),
              p + "self_attn.k_proj.weight": w(k * h, d),
              p + "self_attn.v_proj.weight": w(k * h, d),
              p + "self_attn.o_proj.weight": w(d, n * h),
              p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
              p + "mlp.down_proj.weight": w(d, f)})
  return t


def write_checkpoint(path, cfg: dict, tensors: dict, shards: int = 1) -> str:
  """A checkpoint directory written with safetensors directly (not through sparse_jax.hf)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  if shards == 1:
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return str(path)
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: tensors[k] for k in names[s::shards]}
    save_file(part, os.path.join(path, file))
    weight_map.update({k: file for k in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return str(path)


@pytest.fixture
def rng(key):
  return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def logits_of(model: Transformer, tokens_BxL) -> np.ndarray:
  return np.asarray(forward(model, jnp.asarray(tokens_BxL))[0])


def assert_matches_reference(model, path, tokens_BxL):
  got = logits_of(model, tokens_BxL)
  for b in range(len(tokens_BxL)):
    want = llama_logits(path, tokens_BxL[b])
    err = np.max(np.abs(got[b] - want)) / np.max(np.abs(want))
    print(f"max |logit diff| / max |logit| vs NumPy: {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("act,ffn,shards", [("relu", "relu_sparse", 1), ("silu", "silu_dense", 3)])
def test_import_matches_numpy_llama(tmp_path, rng, act, ffn, shards):
  cfg = hf_config(hidden_act=act)
  path = write_checkpoint(tmp_path / "ckpt", cfg, random_tensors(rng, cfg), shards=shards)
  model, run_cfg = hf.load_hf(path)
  assert run_cfg.model.ffn == ffn and run_cfg.model.kv_heads == 2
  assert run_cfg.data.seq_len == 64
  tokens = rng.integers(0, cfg["vocab_size"], (2, 24))
  assert_matches_reference(model, path, tokens)
  if act == "relu":
    # The sparse FFN really is sparse on these weights: ReLU silences about half the neurons.
    _, stats = forward(model, jnp.asarray(tokens))
    assert np.all((stats.l0 > 0.2 * 136) & (stats.l0 < 0.8 * 136))


def test_untied_config_with_equal_lm_head_and_dense_override(tmp_path, rng):
  cfg = hf_config(tie_word_embeddings=False, num_key_value_heads=6)
  tensors = random_tensors(rng, cfg)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  path = write_checkpoint(tmp_path / "ckpt", cfg, tensors)
  model, run_cfg = hf.load_hf(path, ffn="relu_dense")
  assert run_cfg.model.ffn == "relu_dense"
  assert_matches_reference(model, path, rng.integers(0, 300, (1, 20)))


def test_export_round_trip_and_reference(tmp_path, key, rng):
  cfg = ModelConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176,
                    compute_dtype="float32")
  model = Transformer(cfg, rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 1 << 30))))
  out = str(tmp_path / "exported")
  files = hf.export_hf(model, out, max_position_embeddings=128, max_shard_bytes=100_000)
  assert "model.safetensors.index.json" in files and len(files) > 4  # sharded
  tokens = rng.integers(0, 259, (2, 16))
  assert_matches_reference(model, out, tokens)  # our export, read by the independent reader
  back, back_cfg = hf.load_hf(out)
  assert back_cfg.model == cfg and back_cfg.data.tokenizer.endswith("tokenizer.json")
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(back))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileExistsError, match="already exists"):
    hf.export_hf(model, out)


def test_bfloat16_export(tmp_path, key, rng):
  cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                    compute_dtype="float32", ffn="silu_dense")
  model = Transformer(cfg, rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 1 << 30))))
  out = str(tmp_path / "bf16")
  hf.export_hf(model, out, dtype="bfloat16")
  from safetensors import safe_open
  with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
    assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
  back, _ = hf.load_hf(out)
  tokens = rng.integers(0, 259, (1, 12))
  a, b = logits_of(model, tokens), logits_of(back, tokens)
  assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < 3e-2


def test_nongated_ffn_cannot_be_exported(tmp_path):
  cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                    ffn="relu_nongated_sparse")
  with pytest.raises(ValueError, match="relu_nongated_sparse.*no Llama-format equivalent"):
    hf.export_hf(Transformer(cfg, rngs=nnx.Rngs(0)), str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")


def test_byte_tokenizer_json_encodes_like_the_byte_tokenizer(tmp_path, rng):
  path = tmp_path / "tokenizer.json"
  path.write_text(hf.byte_tokenizer_json())
  tok, ref = load_tokenizer(str(path)), ByteTokenizer()
  assert (tok.vocab_size, tok.eos_id) == (259, ByteTokenizer.EOS)
  alphabet = list("ab \n\t{}()_=#'\"\\") + ["é", "ß", "中", "🙂", "\x00", "\x7f", "  "]
  texts = ["".join(rng.choice(alphabet, size=rng.integers(1, 40))) for _ in range(20)]
  for text, ids in zip(texts, tok.encode_batch(texts)):
    np.testing.assert_array_equal(ids, ref.encode(text))
    assert tok.decode(ids) == text


# --------------------------------------------------------------------------- bad checkpoints


def _break(tmp_path, rng, *, cfg_changes=None, drop=(), add=None, reshape=None, shards=1):
  cfg = hf_config(**(cfg_changes or {}))
  tensors = random_tensors(rng, hf_config())
  for name in drop:
    del tensors[name]
  tensors.update(add or {})
  for name, fn in (reshape or {}).items():
    tensors[name] = fn(tensors[name])
  return write_checkpoint(tmp_path / "bad", cfg, tensors, shards=shards)


@pytest.mark.parametrize("kw,message", [
    (dict(drop=["model.layers.1.mlp.up_proj.weight"]),
     r"lacks tensor\(s\) model.layers.1.mlp.up_proj.weight"),
    (dict(reshape={"model.layers.0.mlp.down_proj.weight": lambda w: np.ascontiguousarray(w.T)}),
     r"model.layers.0.mlp.down_proj.weight .* has shape \[136, 48\], expected \[48, 136\].*"
     r"looks transposed.*down_proj is \[hidden_size, intermediate_size\]"),
    (dict(reshape={"model.layers.1.self_attn.k_proj.weight": lambda w: w[:8]}),
     r"k_proj.weight .* has shape \[8, 48\], expected \[16, 48\]"),
    (dict(add={"model.layers.0.self_attn.q_proj.bias": np.ones(48, np.float32)}),
     "does not use: model.layers.0.self_attn.q_proj.bias"),
    (dict(add={"lm_head.weight": np.ones((300, 48), np.float32)}),
     "lm_head.weight differs .* tie_word_embeddings=true"),
    (dict(cfg_changes={"tie_word_embeddings": False}), r"lacks tensor\(s\) lm_head.weight"),
    (dict(reshape={"model.norm.weight": lambda w: w.astype(np.int32)}),
     "model.norm.weight has dtype I32"),
    (dict(reshape={"model.layers.0.mlp.gate_proj.weight": lambda w: np.where(w == w.max(), np.nan,
                                                                             w)}),
     "model.layers.0.mlp.gate_proj.weight holds non-finite"),
    (dict(cfg_changes={"sliding_window": 4096}), "unknown field.*sliding_window"),
    (dict(cfg_changes={"hidden_act": "gelu"}), "hidden_act='gelu' is not supported"),
    (dict(cfg_changes={"attention_bias": True}), "attention_bias=True is not supported"),
    (dict(cfg_changes={"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
     "rope_type='llama3' needs high_freq_factor, low_freq_factor, original_max_position_emb"),
    (dict(cfg_changes={"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}),
     "rope_type='dynamic' is not supported"),
    (dict(cfg_changes={"rope_scaling": {"rope_type": "linear", "factor": 2.0,
                                        "low_freq_factor": 1}}),
     "rope_scaling has field.*low_freq_factor.*'linear' does not use"),
    (dict(cfg_changes={"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                        "original_max_position_embeddings": 32}}),
     "yarn with factor=4.0 but max_position_embeddings / original.* = 2.0"),
    (dict(cfg_changes={"partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
    (dict(cfg_changes={"hidden_act": "fatrelu"}), "fatrelu' needs hidden_act_param"),
    (dict(cfg_changes={"hidden_act": "dReLU"}), "dReLU.*gate and to the up projection"),
    (dict(cfg_changes={"hidden_act": "relu", "hidden_act_param": 0.1}),
     "hidden_act_param=0.1 has no meaning"),
    (dict(cfg_changes={"model_type": "gemma"}), "model_type='gemma'"),
    (dict(cfg_changes={"num_hidden_layers": "2"}), "num_hidden_layers='2' must be a positive"),
    (dict(cfg_changes={"num_key_value_heads": 4}), "n_kv_heads=4: must divide n_heads=6"),
    (dict(cfg_changes={"hidden_size": 40}), r"embed_tokens.weight .* expected \[300, 40\]"),
])
def test_bad_checkpoints_name_the_tensor_or_field(tmp_path, rng, kw, message):
  with pytest.raises(ValueError, match=message):
    hf.load_hf(_break(tmp_path, rng, **kw))


def test_missing_required_field_and_unknown_field_escape_hatch(tmp_path, rng):
  cfg = hf_config()
  del cfg["intermediate_size"]
  path = write_checkpoint(tmp_path / "a", cfg, random_tensors(rng, hf_config()))
  with pytest.raises(ValueError, match="lacks required field.*intermediate_size"):
    hf.load_hf(path)
  path = _break(tmp_path, rng, cfg_changes={"my_note": "x"})
  with pytest.warns(UserWarning, match="ignoring unknown field.*my_note"):
    hf.load_hf(path, allow_unknown_config=True)


def test_sharded_checkpoint_problems(tmp_path, rng):
  path = _break(tmp_path, rng, shards=2)
  os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
  with pytest.raises(FileNotFoundError, match="lists shard 'model-00002-of-00002.safetensors'"):
    hf.load_hf(path)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load_hf(str(tmp_path))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(json.dumps(hf_config()))
  (empty / "pytorch_model.bin").write_bytes(b"\0")
  with pytest.raises(FileNotFoundError, match="only safetensors weights are supported"):
    hf.load_hf(str(empty))


def test_checks_run_before_any_tensor_is_read(tmp_path, rng, monkeypatch):
  """A bad shape in the last tensor fails before a single tensor's data is read."""
  import safetensors
  path = _break(tmp_path, rng, reshape={"model.norm.weight": lambda w: w[:-1]})
  real, reads = safetensors.safe_open, []

  class Counting:
    def __init__(self, *a, **k):
      self._f = real(*a, **k)

    def __enter__(self):
      self._inner = self._f.__enter__()
      return self

    def __exit__(self, *exc):
      return self._f.__exit__(*exc)

    def keys(self):
      return self._inner.keys()

    def get_slice(self, name):
      return self._inner.get_slice(name)

    def get_tensor(self, name):
      reads.append(name)
      return self._inner.get_tensor(name)

  monkeypatch.setattr(safetensors, "safe_open", Counting)
  with pytest.raises(ValueError, match="model.norm.weight"):
    hf.load_hf(path)
  assert reads == []


# --------------------------------------------------------------------------- checkpoints as
# transformers 5.x writes them: untied heads, rope_parameters / rope_scaling, FATReLU, Mistral


def _transformers_config(kind: str) -> dict:
  """config.json of each supported kind, in the spelling of current transformers (5.x writes
  rope_parameters with rope_theta inside; 4.x wrote rope_theta + rope_scaling)."""
  base = hf_config(tie_word_embeddings=False, max_position_embeddings=64,
                   transformers_version="5.17.0")
  del base["rope_theta"]
  base["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
  if kind == "llama3":
    base["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 16}
  elif kind == "linear":  # the older spelling, which transformers 5.x still reads
    del base["rope_parameters"]
    base.update(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.5})
  elif kind == "yarn":
    base["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                               "original_max_position_embeddings": 16, "beta_fast": 8.0,
                               "beta_slow": 1.0}
  elif kind == "fatrelu":
    base.update(hidden_act="fatrelu", hidden_act_param=0.25, tie_word_embeddings=True)
  elif kind == "mistral":
    for name in ("attention_bias", "mlp_bias"):
      del base[name]
    base.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=7)
  return base


def _tensors(rng, cfg):
  t = random_tensors(rng, cfg)
  if not cfg["tie_word_embeddings"]:
    t["lm_head.weight"] = (rng.standard_normal(t["model.embed_tokens.weight"].shape)
                           * cfg["hidden_size"] ** -0.5).astype(np.float32)
  return t


@pytest.mark.parametrize("kind", ["untied", "llama3", "linear", "yarn", "fatrelu", "mistral"])
def test_transformers_kinds_import_match_reference_and_round_trip(tmp_path, rng, kind):
  cfg = _transformers_config(kind)
  path = write_checkpoint(tmp_path / "ckpt", cfg, _tensors(rng, cfg))
  model, run_cfg = hf.load_hf(path)
  m = run_cfg.model
  assert m.tie_embeddings == cfg["tie_word_embeddings"]
  assert m.rope_scaling == {"llama3": "llama3", "linear": "linear", "yarn": "yarn"}.get(kind,
                                                                                       "none")
  if kind == "fatrelu":
    assert (m.ffn, m.gate_threshold) == ("relu_sparse", 0.25)
  if kind == "yarn":  # transformers' default attention factor 0.1 ln(factor) + 1
    assert m.rope_attention_factor == pytest.approx(0.1 * np.log(4.0) + 1)
  if kind == "mistral":
    assert m.sliding_window == 7
  tokens = rng.integers(0, cfg["vocab_size"], (2, 24))  # longer than the window and 16
  assert_matches_reference(model, path, tokens)
  out = str(tmp_path / "exported")
  hf.export_hf(model, out, max_position_embeddings=64)
  with open(os.path.join(out, "config.json")) as fh:
    exported = json.load(fh)
  assert exported["tie_word_embeddings"] == cfg["tie_word_embeddings"]
  assert_matches_reference(model, out, tokens)  # the export, read by the independent reader
  back, back_cfg = hf.load_hf(out)
  assert back_cfg.model == m
  np.testing.assert_array_equal(logits_of(back, tokens), logits_of(model, tokens))


def test_fatrelu_threshold_is_exact_and_sparser(tmp_path, rng):
  """FATReLU's threshold silences the neurons with 0 < pre <= t: fewer active than ReLU, and the
  dense baseline (relu_dense) computes the same function as the sparse op."""
  cfg = _transformers_config("fatrelu")
  tensors = _tensors(rng, cfg)
  path = write_checkpoint(tmp_path / "ckpt", cfg, tensors)
  sparse, _ = hf.load_hf(path)
  dense, _ = hf.load_hf(path, ffn="relu_dense")
  tokens = jnp.asarray(rng.integers(0, cfg["vocab_size"], (2, 20)))
  (a, sa), (b, sb) = forward(sparse, tokens), forward(dense, tokens)
  assert np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))) < 1e-5
  np.testing.assert_array_equal(sa.l0, sb.l0)
  relu_path = write_checkpoint(tmp_path / "relu", {**cfg, "hidden_act": "relu",
                                                   "hidden_act_param": None}, tensors)
  _, s_relu = forward(hf.load_hf(relu_path)[0], tokens)
  assert np.all(sa.l0 < s_relu.l0)


def test_exported_tokenizer_files_add_no_bos(tmp_path, key):
  """The export's tokenizer files say what training did: no BOS, <eos> ends documents, <pad>."""
  cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                    tie_embeddings=False)
  out = str(tmp_path / "x")
  files = hf.export_hf(Transformer(cfg, rngs=nnx.Rngs(0)), out, max_position_embeddings=96)
  assert {"tokenizer_config.json", "special_tokens_map.json",
          "generation_config.json"} <= set(files)
  read = lambda name: json.load(open(os.path.join(out, name)))  # noqa: E731
  tc, gen, config = read("tokenizer_config.json"), read("generation_config.json"), \
      read("config.json")
  assert tc["bos_token"] is None and tc["add_bos_token"] is False and tc["eos_token"] == "<eos>"
  assert tc["model_max_length"] == config["max_position_embeddings"] == 96
  assert gen["eos_token_id"] == config["eos_token_id"] == ByteTokenizer.EOS
  assert gen["pad_token_id"] == ByteTokenizer.PAD and config["tie_word_embeddings"] is False
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  enc = tok.encode("hi", add_special_tokens=True)
  assert enc.ids == [ord("h"), ord("i")]
