"""Document sources: the Python standard library, local files and globs, Hugging Face datasets.

Every source yields documents (str) in a deterministic order, so a corpus built twice from the
same files is the same corpus.
"""
from __future__ import annotations

import glob
import json
import os
import pathlib
import sysconfig
from typing import Iterator

from sparse_jax.config import DataConfig

_JSONL = (".jsonl", ".jsonl.gz")
_PARQUET = (".parquet",)


def stdlib_files() -> list[pathlib.Path]:
  """The running interpreter's standard-library *.py files, sorted (site-packages excluded)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.rglob("*.py")
                 if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
  if not files:
    raise FileNotFoundError(f"no *.py files under the standard library path {root}")
  return files


def expand_paths(spec: str) -> list[str]:
  """Comma-separated files, directories (all files below) or globs -> sorted file list."""
  out: list[str] = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    if os.path.isdir(part):
      found = sorted(str(p) for p in pathlib.Path(part).rglob("*") if p.is_file())
    elif glob.has_magic(part):
      found = sorted(p for p in glob.glob(part, recursive=True) if os.path.isfile(p))
    else:
      found = [part] if os.path.isfile(part) else []
    if not found:
      raise FileNotFoundError(f"data.source: {part!r} matches no files")
    out.extend(found)
  return out


def read_jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) for every non-blank line of a JSONL file (``.gz`` too); a line that is
  not a JSON object raises an error naming the file and line."""
  opener = open
  if path.endswith(".gz"):
    import gzip
    opener = gzip.open
  with opener(path, "rt", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object per line")
      yield n, record


def _read_jsonl(path: str, field: str) -> Iterator[str]:
  for n, record in read_jsonl_records(path):
    if field not in record:
      raise ValueError(f"{path}:{n}: no {field!r} field (set data.text_field)")
    yield str(record[field])


def _read_parquet(path: str, field: str) -> Iterator[str]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError("reading Parquet needs pyarrow: pip install 'sparse-jax[data]' "
                      "(or pip install pyarrow)") from None
  pf = pq.ParquetFile(path)
  if field not in pf.schema_arrow.names:
    raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)}; "
                     "set data.text_field)")
  for batch in pf.iter_batches(columns=[field], batch_size=4096):
    yield from (str(t) for t in batch.column(0).to_pylist() if t is not None)


def _read_file(path: str, field: str) -> Iterator[str]:
  if path.endswith(_JSONL):
    yield from _read_jsonl(path, field)
  elif path.endswith(_PARQUET):
    yield from _read_parquet(path, field)
  else:
    yield pathlib.Path(path).read_text(encoding="utf-8", errors="replace")


def _hf_documents(cfg: DataConfig) -> Iterator[str]:
  if cfg.max_docs is None:
    raise ValueError(f"data.source={cfg.source!r} streams a remote dataset: set data.max_docs to "
                     "the number of documents to use")
  try:
    import datasets
  except ImportError:
    raise ImportError(f"data.source={cfg.source!r} needs the Hugging Face datasets package: "
                      "pip install datasets (and a network connection)") from None
  name, _, subset = cfg.source[len("hf:"):].partition(":")
  ds = datasets.load_dataset(name, subset or None, split=cfg.hf_split, streaming=True)
  for record in ds:
    yield str(record[cfg.text_field])


def iter_documents(cfg: DataConfig) -> Iterator[str]:
  """The documents of ``cfg.source``, in a fixed order, at most ``cfg.max_docs`` of them."""
  if cfg.source == "stdlib":
    docs = (p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files())
  elif cfg.source.startswith("hf:"):
    docs = _hf_documents(cfg)
  else:
    paths = expand_paths(cfg.source)
    docs = (d for p in paths for d in _read_file(p, cfg.text_field))
  for n, doc in enumerate(docs):
    if cfg.max_docs is not None and n >= cfg.max_docs:
      return
    yield doc
