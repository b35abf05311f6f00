"""``sparse-jax prepare-data``: tokenize a corpus once into token shards on disk (``shards.py``).

The documents of the sources (``sources.iter_documents``: local text/JSONL/Parquet files and
globs, the built-in corpora, ``hf:`` datasets) are read in their fixed order and cut into units of
whole documents holding about ``shard_tokens`` tokens (estimated from their characters); each unit
becomes one shard, tokenized by one of ``workers`` processes. Within a shard the trailing documents
that hold ``val_fraction`` of its tokens form its validation part (``val_*.bin``): the validation
split is spread over the whole corpus, fixed by the preparation, and read by ``train`` and ``eval``
without touching the training tokens.

Resumable: a shard's ``.bin`` files are written under temporary names and renamed, then its
completion marker ``shard_*.json`` is written the same way; a killed preparation rerun with the
same command re-reads the documents (cheap next to tokenizing them), skips every unit whose marker
exists and tokenizes the rest. ``plan.json`` (written first) holds the settings and the sources'
sizes and modification times: a rerun with other settings or changed files is refused rather than
mixing two corpora. ``manifest.json`` is written last, so its presence means the data is complete.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from typing import Iterator

import numpy as np
from tqdm import tqdm

from sparse_jax.config import DataConfig
from sparse_jax.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, token_dtype
from sparse_jax.data.sources import STDLIB_PROSE, expand_paths, iter_documents, stdlib_files
from sparse_jax.data.tokenizer import load_tokenizer

PLAN = "plan.json"
_ENCODE_CHUNK = 512  # documents per tokenizer call
# Characters per token used to cut units of about shard_tokens tokens before tokenizing them.
_CHARS_PER_TOKEN = {"bytes": 1.0}
_CHARS_PER_TOKEN_BPE = 4.0


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """What ``prepare_data`` does; the flags of ``sparse-jax prepare-data`` map one to one.

  source: as ``data.source`` (files/globs/directories separated by commas, stdlib, stdlib-prose,
    hf:NAME[:CONFIG]).
  tokenizer: "bytes" or the path of a tokenizer.json (training must use the same one).
  out: the directory of the shards (created; a directory of an unfinished preparation with the
    same settings is completed).
  workers: tokenizing processes (default: the CPU count); 1 tokenizes in this process.
  shard_tokens: about this many tokens per shard (whole documents; a longer document is a shard).
  val_fraction: share of every shard's tokens (its trailing documents) held out for validation.
  """
  source: str
  tokenizer: str = "bytes"
  out: str = "data/prepared"
  workers: int | None = None
  shard_tokens: int = 1 << 26
  val_fraction: float = 0.01
  text_field: str = "text"
  max_docs: int | None = None
  hf_split: str = "train"

  def __post_init__(self):
    for name in ("workers", "shard_tokens", "max_docs"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"{name}={v!r}: must be a positive integer")
    if not 0.0 < self.val_fraction < 0.5:
      raise ValueError(f"val_fraction={self.val_fraction!r}: must be in (0, 0.5)")

  def data_config(self) -> DataConfig:
    return DataConfig(source=self.source, tokenizer=self.tokenizer, text_field=self.text_field,
                      max_docs=self.max_docs, hf_split=self.hf_split)


def tokenizer_identity(spec: str) -> dict:
  """What identifies a tokenizer: its spec, vocabulary size, end-of-document id and, for a
  tokenizer.json, the SHA-256 of the file (a file edited in place is another tokenizer)."""
  tok = load_tokenizer(spec)
  ident = dict(spec=spec, vocab_size=int(tok.vocab_size), eos_id=int(tok.eos_id))
  if spec != "bytes":
    with open(spec, "rb") as f:
      ident["sha256"] = hashlib.sha256(f.read()).hexdigest()
  return ident


def _source_files(source: str) -> list[dict]:
  """The files a source reads, with sizes and modification times (built-in and remote sources are
  named instead)."""
  if source.startswith("hf:"):
    return [dict(dataset=source)]
  if source in ("stdlib", STDLIB_PROSE):
    files = stdlib_files()
    return [dict(builtin=source, python=sys.version.split()[0], files=len(files),
                 bytes=sum(p.stat().st_size for p in files))]
  out = []
  for path in expand_paths(source):
    st = os.stat(path)
    out.append(dict(path=os.path.abspath(path), bytes=st.st_size, mtime_ns=st.st_mtime_ns))
  return out


def make_plan(opts: PrepareOptions) -> dict:
  tok = tokenizer_identity(opts.tokenizer)
  return dict(format=FORMAT, format_version=FORMAT_VERSION, tokenizer=tok,
              dtype=token_dtype(tok["vocab_size"]).name, source=opts.source,
              sources=_source_files(opts.source), text_field=opts.text_field,
              max_docs=opts.max_docs, hf_split=opts.hf_split, shard_tokens=opts.shard_tokens,
              validation=dict(val_fraction=opts.val_fraction, rule=(
                  "per shard, the trailing whole documents holding val_fraction of its tokens "
                  "(the document at the boundary goes to validation)")))


def _write_json_atomic(path: str, obj: dict) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _write_bin_atomic(path: str, pieces: list[np.ndarray]) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    for p in pieces:
      f.write(p.tobytes())
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def marker_path(directory: str, index: int) -> str:
  return os.path.join(directory, f"shard_{index:05d}.json")


_worker_tokenizer = None


def _init_worker(spec: str) -> None:
  global _worker_tokenizer
  _worker_tokenizer = load_tokenizer(spec)


def write_shard(directory: str, index: int, first_doc: int, docs: list[str], val_fraction: float,
                tokenizer_spec: str) -> dict:
  """Tokenizes ``docs`` (one unit) into shard ``index`` and writes its marker; returns it."""
  tok = _worker_tokenizer if _worker_tokenizer is not None else load_tokenizer(tokenizer_spec)
  dtype = token_dtype(tok.vocab_size)
  eos = np.asarray([tok.eos_id], dtype)
  per_doc: list[np.ndarray] = []
  for s in range(0, len(docs), _ENCODE_CHUNK):
    for ids in tok.encode_batch(docs[s:s + _ENCODE_CHUNK]):
      per_doc.append(np.concatenate([ids.astype(dtype), eos]))
  lengths = np.asarray([len(d) for d in per_doc], np.int64)
  ends = np.cumsum(lengths)
  total = int(ends[-1])
  # The first document ending past (1 - f) of the shard's tokens and every later one: validation.
  split = int(np.searchsorted(ends, (1.0 - val_fraction) * total, side="right"))
  split = min(split, len(per_doc))
  names = dict(train_file=f"train_{index:05d}.bin", val_file=f"val_{index:05d}.bin")
  _write_bin_atomic(os.path.join(directory, names["train_file"]), per_doc[:split])
  _write_bin_atomic(os.path.join(directory, names["val_file"]), per_doc[split:])
  marker = dict(index=index, first_doc=first_doc, docs=len(docs), val_docs=len(per_doc) - split,
                train_tokens=int(lengths[:split].sum()), val_tokens=int(lengths[split:].sum()),
                chars=sum(len(d) for d in docs), **names)
  _write_json_atomic(marker_path(directory, index), marker)
  return marker


def units(opts: PrepareOptions) -> Iterator[tuple[int, int, list[str]]]:
  """(shard index, first document index, documents) of every unit, in order."""
  per_token = _CHARS_PER_TOKEN.get(opts.tokenizer, _CHARS_PER_TOKEN_BPE)
  limit = opts.shard_tokens * per_token
  index, first, docs, chars = 0, 0, [], 0
  for n, doc in enumerate(iter_documents(opts.data_config())):
    if docs and chars + len(doc) > limit:
      yield index, first, docs
      index, first, docs, chars = index + 1, n, [], 0
    docs.append(doc)
    chars += len(doc)
  if docs:
    yield index, first, docs


def _check_plan(directory: str, plan: dict) -> None:
  path = os.path.join(directory, PLAN)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != plan:
      diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
      raise ValueError(f"--out {directory} holds a preparation with other settings or source "
                       f"files (differing: {', '.join(diff)}); use another --out directory or "
                       "delete it")
  else:
    _write_json_atomic(path, plan)


def prepare_data(opts: PrepareOptions, *, progress: bool = True) -> dict:
  """Prepares (or completes) ``opts.out``; returns the manifest (plus ``prepare_s``, the wall
  time of this call, and ``skipped_shards``, those found complete)."""
  t0 = time.perf_counter()
  plan = make_plan(opts)
  os.makedirs(opts.out, exist_ok=True)
  if os.path.exists(os.path.join(opts.out, MANIFEST)):
    with open(os.path.join(opts.out, MANIFEST)) as f:
      manifest = json.load(f)
    if {k: manifest.get(k) for k in plan} == plan:
      return dict(manifest, prepare_s=time.perf_counter() - t0,
                  skipped_shards=len(manifest["shards"]))
  _check_plan(opts.out, plan)
  workers = opts.workers or os.cpu_count() or 1
  markers: dict[int, dict] = {}
  skipped = 0
  bar = tqdm(desc="preparing", unit="char", unit_scale=True, disable=not progress,
             mininterval=1.0)

  def done(marker: dict) -> None:
    markers[marker["index"]] = marker
    bar.update(marker["chars"])

  def existing(index: int, first: int, docs: list[str]) -> dict | None:
    path = marker_path(opts.out, index)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      marker = json.load(f)
    if (marker["first_doc"], marker["docs"]) != (first, len(docs)):
      raise ValueError(f"{path} covers documents {marker['first_doc']}..+{marker['docs']} but the "
                       f"sources now give {first}..+{len(docs)}: the sources changed since the "
                       "preparation started; use another --out directory")
    return marker

  try:
    if workers == 1:
      for index, first, docs in units(opts):
        marker = existing(index, first, docs)
        skipped += marker is not None
        done(marker or write_shard(opts.out, index, first, docs, opts.val_fraction,
                                   opts.tokenizer))
    else:
      ctx = multiprocessing.get_context("spawn")  # no fork of a process that may run JAX threads
      with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                  initargs=(opts.tokenizer,)) as pool:
        pending: set[cf.Future] = set()
        for index, first, docs in units(opts):
          marker = existing(index, first, docs)
          if marker is not None:
            skipped += 1
            done(marker)
            continue
          # At most workers + 1 units in flight: the reader never runs far ahead (bounded memory).
          while len(pending) > workers:
            finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
              done(fut.result())
          pending.add(pool.submit(write_shard, opts.out, index, first, docs, opts.val_fraction,
                                  opts.tokenizer))
        for fut in cf.as_completed(pending):
          done(fut.result())
  finally:
    bar.close()
  if not markers:
    raise ValueError(f"data.source={opts.source!r} yielded no documents")
  shards = [markers[i] for i in range(len(markers))]
  manifest = dict(plan, shards=shards, documents=sum(s["docs"] for s in shards),
                  train_tokens=sum(s["train_tokens"] for s in shards),
                  val_tokens=sum(s["val_tokens"] for s in shards))
  manifest["total_tokens"] = manifest["train_tokens"] + manifest["val_tokens"]
  _write_json_atomic(os.path.join(opts.out, MANIFEST), manifest)
  return dict(manifest, prepare_s=time.perf_counter() - t0, skipped_shards=skipped)
