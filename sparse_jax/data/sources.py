"""Document sources: the Python standard library, local files and globs, Hugging Face datasets.

Every source yields documents (str) in a deterministic order, so a corpus built twice from the
same files is the same corpus.

* ``stdlib``: the running interpreter's standard-library ``*.py`` files (code), one per file.
* ``stdlib-prose``: English prose from the standard library, no download and no module imported:
  per non-test module, its docstrings (module, classes, functions, in source order, read with
  ``ast``), then every topic text of ``pydoc_data/topics.py`` (the reference-manual sections
  ``help()`` shows), one document per topic in sorted topic order.
"""
from __future__ import annotations

import ast
import functools
import glob
import json
import os
import pathlib
import sys
import sysconfig
import warnings
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


# Directories of the standard library's own test suites: their docstrings describe tests, and
# some Python builds ship without them, so stdlib-prose leaves them out.
_TEST_DIRS = {"test", "tests", "idle_test"}
STDLIB_PROSE = "stdlib-prose"


def _docstrings(tree: ast.AST) -> Iterator[str]:
  """Docstrings of a module and of its classes and functions (nested too), in source order."""
  if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
    doc = ast.get_docstring(tree, clean=True)
    if doc and doc.strip():
      yield doc.strip()
  for child in ast.iter_child_nodes(tree):
    yield from _docstrings(child)


@functools.lru_cache(maxsize=None)
def module_prose(path: str) -> str:
  """The docstrings of one source file joined by blank lines ("" when it has none or does not
  parse). Cached: a sweep builds the same corpus many times in one process."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. SyntaxWarning: invalid escape sequences
      tree = ast.parse(pathlib.Path(path).read_bytes(), filename=path)
  except (SyntaxError, ValueError):  # Python 2 examples, null bytes
    return ""
  return "\n\n".join(_docstrings(tree))


@functools.lru_cache(maxsize=None)
def pydoc_topics() -> tuple[tuple[str, str], ...]:
  """(topic, text) pairs of ``pydoc_data/topics.py``, sorted by topic, read as a literal."""
  path = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
  if not path.is_file():
    raise FileNotFoundError(f"data.source={STDLIB_PROSE!r}: no {path} in this Python")
  for node in ast.parse(path.read_bytes(), filename=str(path)).body:
    if (isinstance(node, ast.Assign) and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "topics"):
      topics = ast.literal_eval(node.value)
      return tuple(sorted((str(k), str(v).strip()) for k, v in topics.items() if str(v).strip()))
  raise ValueError(f"{path} defines no 'topics' dictionary")


def stdlib_prose_documents() -> Iterator[tuple[str, str]]:
  """(kind, text) of the stdlib-prose source in its fixed order: kind "docstrings" for each
  non-test module with docstrings (sorted by path), then "topic" for each pydoc topic."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  for path in stdlib_files():
    if _TEST_DIRS & set(path.relative_to(root).parts):
      continue
    text = module_prose(str(path))
    if text:
      yield "docstrings", text
  for _, text in pydoc_topics():
    yield "topic", text


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


class NotText(ValueError):
  """A data file that is not UTF-8 text (``data.bad_files`` decides: refuse or skip)."""


def decode_text(where: str, raw: bytes) -> str:
  """``raw`` as UTF-8 text, or ``NotText`` naming ``where`` (the file) and the first bad byte.
  NUL bytes, which text never holds, mark a binary file even where they decode."""
  nul = raw.find(b"\0")
  if nul >= 0:
    raise NotText(f"{where} is binary, not text (a NUL byte at offset {nul}); leave it out of "
                  "data.source or set data.bad_files=skip")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise NotText(f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                  "convert it to UTF-8, leave it out or set data.bad_files=skip") from None


def _open_raw(path: str):
  if path.endswith(".gz"):
    import gzip
    return gzip.open(path, "rb")
  return open(path, "rb")


def read_jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) for every non-blank line of a JSONL file (``.gz`` too); a line that is
  not a JSON object raises an error naming the file and line."""
  with _open_raw(path) as f:
    for n, raw in enumerate(f, 1):
      line = decode_text(f"data file {path}, line {n},", raw)
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
    yield text_value(record[field], f"{path}:{n}: field {field!r}")


def text_value(value, where: str) -> str:
  """``value`` if it is a string; anything else (numbers, lists, null) is refused rather than
  trained on as its ``str()``."""
  if not isinstance(value, str):
    raise ValueError(f"{where} is {type(value).__name__} {str(value)[:40]!r}, not a string; "
                     "fix the data or set data.text_field to the text field")
  return value


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
  import pyarrow as pa
  kind = pf.schema_arrow.field(field).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise ValueError(f"{path}: column {field!r} holds {kind}, not strings; set data.text_field "
                     "to the text column")
  for batch in pf.iter_batches(columns=[field], batch_size=4096):
    yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _read_file(path: str, field: str) -> Iterator[str]:
  if path.endswith(_JSONL):
    yield from _read_jsonl(path, field)
  elif path.endswith(_PARQUET):
    yield from _read_parquet(path, field)
  else:
    yield decode_text(f"data file {path}", pathlib.Path(path).read_bytes())


def _file_is_text(path: str) -> bool:
  """Whether every byte of ``path`` (decompressed for .gz) is UTF-8 text: the pre-check of
  ``data.bad_files=skip`` (Parquet stores typed columns, checked when read)."""
  if path.endswith(_PARQUET):
    return True
  with _open_raw(path) as f:
    try:
      decode_text(path, f.read())
    except NotText:
      return False
  return True


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
  for n, record in enumerate(ds):
    yield text_value(record[cfg.text_field], f"{cfg.source} record {n}: field "
                                             f"{cfg.text_field!r}")


def iter_documents(cfg: DataConfig) -> Iterator[str]:
  """The documents of ``cfg.source``, in a fixed order, at most ``cfg.max_docs`` of them."""
  if cfg.source == "stdlib":
    docs = (p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files())
  elif cfg.source == STDLIB_PROSE:
    docs = (text for _, text in stdlib_prose_documents())
  elif cfg.source.startswith("hf:"):
    docs = _hf_documents(cfg)
  else:
    paths = expand_paths(cfg.source)
    if cfg.bad_files == "skip":
      bad = [p for p in paths if not _file_is_text(p)]
      if bad:
        print(f"warning: data.bad_files=skip: left out {len(bad)} of {len(paths)} files that are "
              f"not UTF-8 text: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}",
              file=sys.stderr)
        paths = [p for p in paths if p not in set(bad)]
      if not paths:
        raise ValueError(f"data.source={cfg.source!r}: no file is UTF-8 text")
    docs = (d for p in paths for d in _read_file(p, cfg.text_field))
  for n, doc in enumerate(docs):
    if cfg.max_docs is not None and n >= cfg.max_docs:
      return
    yield doc
