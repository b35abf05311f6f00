"""Writes a model as a Hugging Face Llama-format checkpoint directory."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from sparse_jax.hf.config import CONFIG_FILE, TOKENIZER_FILE, hf_config
from sparse_jax.hf.weights import hf_tensors, write_tensors
from sparse_jax.nn import Transformer


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


# Tokenizer and generation files of transformers, beside config.json and the weights.
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
_SIDE_FILES = (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE, GENERATION_CONFIG_FILE)


def _trained_tokenizer_json(tokenizer: str) -> str:
  """The tokenizer.json as the run encoded with it: ``sparse_jax.data`` encodes without special
  tokens, so a post-processor that would add a BOS/EOS around every text is dropped (transformers
  applies it by default, and the model never saw those tokens)."""
  if tokenizer == "bytes":
    return byte_tokenizer_json()
  with open(tokenizer) as fh:
    spec = json.load(fh)
  spec["post_processor"] = None
  return json.dumps(spec, ensure_ascii=False)


def _token_text(tokenizer_json: str, token_id: int) -> str:
  from tokenizers import Tokenizer
  text = Tokenizer.from_str(tokenizer_json).id_to_token(token_id)
  if text is None:
    raise ValueError(f"the tokenizer has no token with id {token_id}")
  return text


def tokenizer_files(tokenizer_json: str, *, eos_id: int, pad_id: int | None,
                    context: int) -> dict[str, dict]:
  """tokenizer_config.json, special_tokens_map.json and generation_config.json of a model trained
  by sparse_jax: end-of-document is the EOS (and, as documents start after one, the start token
  of generation); no BOS is added to any text, as in training."""
  eos = _token_text(tokenizer_json, eos_id)
  pad = None if pad_id is None else _token_text(tokenizer_json, pad_id)
  special = {"eos_token": eos, **({"pad_token": pad} if pad is not None else {})}
  tokenizer_config = {
      "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
      "bos_token": None, "unk_token": None, **special,
      "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
  }
  generation = {"bos_token_id": eos_id, "eos_token_id": eos_id,
                "pad_token_id": eos_id if pad_id is None else pad_id}
  return {TOKENIZER_CONFIG_FILE: tokenizer_config, SPECIAL_TOKENS_FILE: special,
          GENERATION_CONFIG_FILE: generation}


def _umask_permissions(directory: str) -> None:
  """The modes a plain ``mkdir`` and ``open`` would have given (0777 / 0666 less the umask), not
  mkdtemp's private 0700: an exported model is meant to be shared."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o777 & ~umask)
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def export_hf(model: Transformer, out: str, *, tokenizer: str = "bytes", dtype: str = "float32",
              max_position_embeddings: int = 2048, max_shard_bytes: int | None = None,
              source: str | None = None) -> list[str]:
  """Writes ``model`` as a Llama-format checkpoint directory ``out`` (which must not exist yet).

  tokenizer: "bytes" writes the byte tokenizer as a tokenizer.json; a tokenizer.json path is
    written without its post-processor (module ``tokenizer_files``). dtype: float32, bfloat16 or
    float16 storage. max_shard_bytes: shard above this size. max_position_embeddings: the
    context the model was trained for.
  source: the Hugging Face directory the model was imported from: when ``tokenizer`` is its
    tokenizer.json, that and its tokenizer/generation files are copied as they are (what the
    model was trained with).
  The directory is written under a temporary name and renamed at the end, so an interrupted
  export leaves no half-written checkpoint at ``out``. Returns the file names written.
  """
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r}: must be float32, bfloat16 or float16")
  if os.path.exists(out):
    raise FileExistsError(f"{out} already exists; export into a new directory")
  from sparse_jax.data import ByteTokenizer, load_tokenizer
  tok = load_tokenizer(tokenizer)
  pad_id = ByteTokenizer.PAD if tokenizer == "bytes" else None
  config = hf_config(model.cfg, max_position_embeddings=max_position_embeddings,
                     eos_id=tok.eos_id, pad_id=pad_id, dtype=dtype)
  own = source is not None and tokenizer != "bytes" and (
      os.path.abspath(tokenizer) == os.path.abspath(os.path.join(source, TOKENIZER_FILE)))
  if own:
    with open(tokenizer) as fh:
      tokenizer_json = fh.read()
    side = {}
    copied = [name for name in _SIDE_FILES if os.path.isfile(os.path.join(source, name))]
  else:
    tokenizer_json = _trained_tokenizer_json(tokenizer)
    side = tokenizer_files(tokenizer_json, eos_id=tok.eos_id, pad_id=pad_id,
                           context=config["max_position_embeddings"])
    copied = []
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
    files = write_tensors(tensors, tmp, max_shard_bytes)
    for name, content in {CONFIG_FILE: config, **side}.items():
      with open(os.path.join(tmp, name), "w") as fh:
        json.dump(content, fh, indent=2)
    for name in copied:
      shutil.copyfile(os.path.join(source, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, TOKENIZER_FILE), "w") as fh:
      fh.write(tokenizer_json)
    _umask_permissions(tmp)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return sorted(files + [CONFIG_FILE, TOKENIZER_FILE, *side, *copied])
