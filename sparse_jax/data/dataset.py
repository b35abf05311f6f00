"""Token corpora packed into fixed-length sequences, shuffled deterministically, resumable.

* ``build_corpus``: documents -> tokens, each document followed by the tokenizer's end-of-document
  id, documents concatenated in a seeded random order. The last ``val_fraction`` of that stream
  (whole documents, except the one at the boundary) is the validation split.
* ``Batches``: the train stream cut into ``seq_len + 1``-token examples (inputs and shifted
  targets; consecutive examples share one boundary token), visited in a seeded permutation per
  epoch. Its position is a small dict (``state``) saved in checkpoints; a ``Batches`` built with
  that state yields exactly the batches the original would have yielded next.

Sequences cross document boundaries (the usual packing): the end-of-document token tells the model
where one document ends.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tqdm import tqdm

from sparse_jax.config import DataConfig
from sparse_jax.data.sources import iter_documents
from sparse_jax.data.tokenizer import Tokenizer

_ENCODE_CHUNK = 512  # documents per tokenizer call (the HF tokenizer parallelises within one)


@dataclasses.dataclass(frozen=True)
class Corpus:
  train_tokens: np.ndarray
  val_tokens: np.ndarray
  n_docs: int
  vocab_size: int


def _token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def build_corpus(cfg: DataConfig, tokenizer: Tokenizer, *, progress: bool = True) -> Corpus:
  docs = list(iter_documents(cfg))
  if not docs:
    raise ValueError(f"data.source={cfg.source!r} yielded no documents")
  order = np.random.default_rng(cfg.seed).permutation(len(docs))
  dtype = _token_dtype(tokenizer.vocab_size)
  pieces: list[np.ndarray] = []
  eos = np.asarray([tokenizer.eos_id], dtype)
  starts = range(0, len(docs), _ENCODE_CHUNK)
  for s in tqdm(starts, desc="tokenizing", unit="chunk", disable=not progress, leave=False):
    for ids in tokenizer.encode_batch([docs[i] for i in order[s:s + _ENCODE_CHUNK]]):
      pieces += [ids.astype(dtype), eos]
  stream = np.concatenate(pieces)
  n_val = max(int(len(stream) * cfg.val_fraction), cfg.seq_len + 1)
  if len(stream) - n_val < 2 * (cfg.seq_len + 1):
    raise ValueError(f"data.source={cfg.source!r} has only {len(stream)} tokens: too few for "
                     f"training and validation sequences of data.seq_len={cfg.seq_len}")
  return Corpus(train_tokens=stream[:-n_val], val_tokens=stream[-n_val:], n_docs=len(docs),
                vocab_size=tokenizer.vocab_size)


def num_examples(tokens: np.ndarray, seq_len: int) -> int:
  return (len(tokens) - 1) // seq_len


def examples(tokens: np.ndarray, seq_len: int, ids: np.ndarray) -> np.ndarray:
  """Examples ``ids`` as an int32 [len(ids), seq_len + 1] array (of an in-memory token array or of
  a ``shards.TokenStream``, which reads just those tokens)."""
  if hasattr(tokens, "examples"):
    return tokens.examples(ids, seq_len)
  offsets = ids[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return tokens[offsets].astype(np.int32)


class Batches:
  """Deterministic, resumable, epoch-wise shuffled batches of packed training examples."""

  def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
               state: dict | None = None):
    self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
    self.n_examples = num_examples(tokens, seq_len)
    if self.n_examples < batch_size:
      raise ValueError(f"the training split has {self.n_examples} examples of {seq_len + 1} "
                       f"tokens, fewer than one batch of {batch_size}: use more data or smaller "
                       "data.seq_len / train.batch_size")
    self.epoch, self.index = 0, 0
    if state is not None:
      self.load_state(state)
    self._perm = self._permutation(self.epoch)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)

  @property
  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index, "n_examples": self.n_examples,
            "seq_len": self.seq_len, "seed": self.seed}

  def load_state(self, state: dict) -> None:
    for k in ("n_examples", "seq_len", "seed"):
      if state[k] != getattr(self, k):
        raise ValueError(f"data position was saved with {k}={state[k]} but this corpus has "
                         f"{getattr(self, k)}: the data or its settings changed since the "
                         "checkpoint, so the run cannot resume exactly")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._perm = self._permutation(self.epoch)

  def next(self) -> np.ndarray:
    """The next [batch_size, seq_len + 1] int32 batch (continuing into the next epoch)."""
    return examples(self.tokens, self.seq_len, self.next_ids())

  def next_ids(self) -> np.ndarray:
    """The example indices of the next batch (advancing the position as ``next`` does): a process
    of a multi-host run reads only the examples its devices take (``pipeline.next_batch``)."""
    ids = []
    need = self.batch_size
    while need:
      take = self._perm[self.index:self.index + need]
      ids.append(take)
      need -= len(take)
      self.index += len(take)
      if self.index == self.n_examples:
        self.epoch, self.index = self.epoch + 1, 0
        self._perm = self._permutation(self.epoch)
    return np.concatenate(ids)


def validation_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                       max_batches: int) -> list[np.ndarray]:
  """The first ``max_batches`` batches of the validation split, in order (the same every time)."""
  n = min(max_batches, num_examples(tokens, seq_len) // batch_size)
  if n == 0:
    raise ValueError(f"the validation split ({len(tokens)} tokens) holds no batch of "
                     f"{batch_size} x {seq_len + 1} tokens: raise data.val_fraction")
  ids = np.arange(n * batch_size)
  return list(examples(tokens, seq_len, ids).reshape(n, batch_size, seq_len + 1))
