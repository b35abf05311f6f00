"""Pre-tokenized token shards on disk (written by ``prepare.py``) and their bounded-memory reader.

A prepared data directory::

    DIR/manifest.json        written last, when every shard is complete (see ``prepare.py``)
    DIR/plan.json            the preparation's settings, checked when a preparation resumes
    DIR/shard_00000.json     completion marker of shard 0: its counts (written after its .bin files)
    DIR/train_00000.bin      shard 0's training tokens, raw little-endian uint16 or uint32
    DIR/val_00000.bin        shard 0's validation tokens (the trailing documents of the shard)

The training stream is the concatenation of every shard's ``train_*.bin`` in shard order (each
document followed by the end-of-document id), the validation stream that of the ``val_*.bin``
files. ``TokenStream`` reads ``[start, start + n)`` of such a stream with ``os.pread`` into a
fresh buffer: nothing is mapped, so a reader's resident memory is what it asked for, not the pages
of the files it has touched (a memory map's touched pages count in the process's RSS and would
grow towards the corpus size over an epoch). ``Batches`` and ``validation_batches``
(``dataset.py``) take a ``TokenStream`` where they take an in-memory token array.
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "sparse-jax-token-shards"
FORMAT_VERSION = 1
_MAX_OPEN_FILES = 64


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 while every id fits, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_prepared(source: str) -> bool:
  """Whether ``data.source`` names a prepared directory: one holding a manifest, or the plan of
  an unfinished preparation (then ``read_manifest`` says to complete it, rather than its .bin
  files being read as text documents)."""
  return any(os.path.isfile(os.path.join(source, name)) for name in (MANIFEST, "plan.json"))


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    incomplete = os.path.isfile(os.path.join(directory, "plan.json"))
    raise FileNotFoundError(
        f"data.source={directory!r}: no {MANIFEST}" + (
            " (its preparation has not finished: rerun the same sparse-jax prepare-data command "
            "to complete it)" if incomplete else " (prepare it with sparse-jax prepare-data)"))
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format {manifest.get('format')!r} version "
                     f"{manifest.get('format_version')!r}; this sparse_jax reads {FORMAT!r} "
                     f"version {FORMAT_VERSION} (prepare the data again)")
  return manifest


class TokenStream:
  """The concatenation of raw token files, read by range (``read``) or as packed examples
  (``examples``), without loading or mapping the files.

  ``reads`` counts the tokens read so far (tests use it to check what a process touched).
  """

  def __init__(self, paths: list[str], counts: list[int], dtype):
    if len(paths) != len(counts):
      raise ValueError("one token count per file is needed")
    self.dtype = np.dtype(dtype)
    self.paths, self.counts = list(paths), [int(c) for c in counts]
    for path, count in zip(self.paths, self.counts):
      size = os.path.getsize(path)
      if size != count * self.dtype.itemsize:
        raise ValueError(f"{path}: {size} bytes, but its manifest entry says {count} tokens of "
                         f"{self.dtype.itemsize} bytes (the file is damaged or was changed)")
    keep = [i for i, c in enumerate(self.counts) if c > 0]
    self.paths = [self.paths[i] for i in keep]
    self.counts = [self.counts[i] for i in keep]
    self.starts = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
    self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
    self.reads = 0

  def __len__(self) -> int:
    return int(self.starts[-1])

  def _fd(self, i: int) -> int:
    fd = self._fds.pop(i, None)
    if fd is None:
      fd = os.open(self.paths[i], os.O_RDONLY)
      if len(self._fds) >= _MAX_OPEN_FILES:
        os.close(self._fds.popitem(last=False)[1])
    self._fds[i] = fd
    return fd

  def read(self, start: int, n: int) -> np.ndarray:
    """Tokens ``[start, start + n)`` of the stream (a new array of the file dtype)."""
    if start < 0 or n < 0 or start + n > len(self):
      raise IndexError(f"tokens [{start}, {start + n}) are outside the stream of {len(self)}")
    out = np.empty(n, self.dtype)
    view = memoryview(out).cast("B")
    size = self.dtype.itemsize
    done, i = 0, int(np.searchsorted(self.starts, start, side="right")) - 1
    while done < n:
      offset = start + done - int(self.starts[i])
      take = min(n - done, self.counts[i] - offset)
      want, got = take * size, 0
      while got < want:  # pread may return short reads
        k = os.preadv(self._fd(i), [view[done * size + got:(done + take) * size]],
                      offset * size + got)
        if k <= 0:
          raise OSError(f"{self.paths[i]}: unexpected end of file")
        got += k
      done += take
      i += 1
    self.reads += n
    return out

  def examples(self, ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Examples ``ids`` (example i = tokens [i * seq_len, i * seq_len + seq_len + 1)) as an int32
    [len(ids), seq_len + 1] array."""
    out = np.empty((len(ids), seq_len + 1), np.int32)
    for row, i in enumerate(np.asarray(ids, np.int64)):
      out[row] = self.read(int(i) * seq_len, seq_len + 1)
    return out

  def close(self) -> None:
    while self._fds:
      os.close(self._fds.popitem()[1])

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass


def open_split(directory: str, split: str, manifest: dict | None = None) -> TokenStream:
  """The ``"train"`` or ``"val"`` stream of a prepared directory."""
  if split not in ("train", "val"):
    raise ValueError(f"split={split!r}: must be 'train' or 'val'")
  manifest = manifest or read_manifest(directory)
  shards = manifest["shards"]
  return TokenStream([os.path.join(directory, s[f"{split}_file"]) for s in shards],
                     [s[f"{split}_tokens"] for s in shards], manifest["dtype"])
