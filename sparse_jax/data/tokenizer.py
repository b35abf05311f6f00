"""Tokenizers: bytes by default (no files needed), any Hugging Face tokenizer.json otherwise."""
from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np

# Tokens that Hugging Face tokenizers commonly use to end a document (SmolLM2's first).
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; then <bos>, <eos>, <pad>. Lossless for any text."""

  BOS, EOS, PAD = 256, 257, 258
  vocab_size = 259
  eos_id = EOS
  name = "bytes"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")


class HFTokenizer:
  """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as _HFTokenizer
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data.tokenizer={path!r}: no such tokenizer.json file (use "
                              "'bytes' for the built-in byte tokenizer)")
    try:
      self._tok = _HFTokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
      raise ValueError(f"data.tokenizer={path!r} is not a valid tokenizer.json: {e}") from e
    self.name = path
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    ids = [self._tok.token_to_id(t) for t in _EOS_CANDIDATES]
    found = [i for i in ids if i is not None]
    if not found:
      raise ValueError(f"tokenizer {path!r} has none of the end-of-document tokens "
                       f"{', '.join(_EOS_CANDIDATES)}; documents could not be separated")
    self.eos_id = found[0]

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encs]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
  """'bytes' or the path of a tokenizer.json."""
  return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)
