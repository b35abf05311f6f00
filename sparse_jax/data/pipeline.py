"""The training data of a run: in-memory corpora or prepared shards, and per-process batches.

* ``load_splits``: (train tokens, validation tokens) of ``data.source``. A directory with a
  ``manifest.json`` (``sparse-jax prepare-data``) is read from disk as ``shards.TokenStream``s;
  anything else (the built-in corpora, small files) is tokenized in memory by ``build_corpus``
  as before. Either kind feeds ``Batches`` and ``validation_batches`` unchanged, so shuffling,
  packing and the checkpointed data position are the same.
* ``next_batch``: the next [grad_accum, micro, seq_len + 1] batch. With several processes each one
  reads only the examples that land on its own devices (the rows that ``parallel.put`` asks it
  for); the other rows stay zero and are never sent anywhere.
"""
from __future__ import annotations

import jax
import numpy as np

from sparse_jax.config import DataConfig
from sparse_jax.data.dataset import Batches, build_corpus, examples
from sparse_jax.data.shards import is_prepared, open_split, read_manifest
from sparse_jax.data.tokenizer import Tokenizer

_IDENTITY_KEYS = ("vocab_size", "eos_id", "sha256")


def check_tokenizer(cfg: DataConfig, manifest: dict) -> None:
  """The run's tokenizer must be the one the shards were tokenized with."""
  from sparse_jax.data.prepare import tokenizer_identity
  now, then = tokenizer_identity(cfg.tokenizer), manifest["tokenizer"]
  if any(now.get(k) != then.get(k) for k in _IDENTITY_KEYS):
    raise ValueError(f"data.tokenizer={cfg.tokenizer!r} is not the tokenizer the shards in "
                     f"{cfg.source!r} were prepared with ({then['spec']!r}, vocabulary "
                     f"{then['vocab_size']}); set data.tokenizer={then['spec']}")


def load_splits(cfg: DataConfig, tokenizer: Tokenizer, *, progress: bool = True):
  """(train, validation) token sequences of ``cfg.source``: numpy arrays, or TokenStreams of a
  prepared directory (then ``data.val_fraction`` and ``data.max_docs`` are the manifest's)."""
  if not is_prepared(cfg.source):
    corpus = build_corpus(cfg, tokenizer, progress=progress)
    return corpus.train_tokens, corpus.val_tokens
  manifest = read_manifest(cfg.source)
  check_tokenizer(cfg, manifest)
  train, val = (open_split(cfg.source, s, manifest) for s in ("train", "val"))
  if len(val) < cfg.seq_len + 1:
    raise ValueError(f"the validation split of {cfg.source!r} holds {len(val)} tokens, fewer "
                     f"than one sequence of data.seq_len={cfg.seq_len} + 1: prepare it with a "
                     "larger --val-fraction")
  return train, val


def local_rows(sharding, shape: tuple[int, ...], axes: int = 2) -> np.ndarray:
  """bool mask over the leading ``axes`` dimensions of a global array of ``shape``: the entries
  that this process's devices hold under ``sharding``."""
  mask = np.zeros(shape[:axes], bool)
  for index in sharding.addressable_devices_indices_map(shape).values():
    mask[index[:axes]] = True
  return mask


def next_batch(batches: Batches, grad_accum: int, sharding=None) -> np.ndarray:
  """The next [grad_accum, micro, seq_len + 1] int32 batch. With a ``sharding`` over several
  processes only this process's rows are read (the rest are zeros nobody reads)."""
  shape = (grad_accum, batches.batch_size // grad_accum, batches.seq_len + 1)
  if sharding is None or jax.process_count() == 1:
    return batches.next().reshape(shape)
  ids = batches.next_ids().reshape(shape[:2])
  mask = local_rows(sharding, shape)
  batch = np.zeros(shape, np.int32)
  batch[mask] = examples(batches.tokens, batches.seq_len, ids[mask])
  return batch
