"""Writes a model as a Hugging Face Llama-format checkpoint directory."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

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
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    files = write_tensors(hf_tensors(model, dtype), tmp, max_shard_bytes)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
      json.dump(config, fh, indent=2)
    if tokenizer == "bytes":
      with open(os.path.join(tmp, TOKENIZER_FILE), "w") as fh:
        fh.write(byte_tokenizer_json())
    else:
      shutil.copyfile(tokenizer, os.path.join(tmp, TOKENIZER_FILE))
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return sorted(files + [CONFIG_FILE, TOKENIZER_FILE])
