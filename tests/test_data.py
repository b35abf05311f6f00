"""Data: tokenizers, sources, corpus building, packing, deterministic and resumable batches."""
import json

import jax
import numpy as np
import pytest

from sparse_jax.config import DataConfig
from sparse_jax.data import (Batches, ByteTokenizer, HFTokenizer, build_corpus, expand_paths,
                             iter_documents, load_tokenizer, stdlib_files, validation_batches)
from sparse_jax.data.sources import module_prose, pydoc_topics, stdlib_prose_documents

_WORDS = ["sparse", "relu", "gate", "neuron", "token", "jax", "ffn", "layer", "über", "naïve",
          "中文", "loss", "\t", "\n", "def", "return", "(", ")", ":", "=", "0", "42"]


def random_text(rng: np.random.Generator, n_words: int) -> str:
  return " ".join(rng.choice(_WORDS, n_words))


@pytest.fixture
def np_rng(key):
  """A numpy generator seeded from the test's fresh random key."""
  return np.random.default_rng(int(jax.random.randint(key, (), 0, 1 << 30)))


def write_docs(tmp_path, np_rng, per_file=4):
  """A .txt file, a .jsonl file and a nested .md file with random text; returns the docs."""
  docs = {}
  (tmp_path / "sub").mkdir()
  txt = random_text(np_rng, 300)
  (tmp_path / "a.txt").write_text(txt, encoding="utf-8")
  docs["a.txt"] = [txt]
  lines = [random_text(np_rng, 80) for _ in range(per_file)]
  with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
    for line in lines:
      f.write(json.dumps({"text": line, "id": 1}) + "\n")
  docs["b.jsonl"] = lines
  md = random_text(np_rng, 200)
  (tmp_path / "sub" / "c.md").write_text(md, encoding="utf-8")
  docs["c.md"] = [md]
  return docs


def test_byte_tokenizer_round_trip(np_rng):
  tok = ByteTokenizer()
  text = random_text(np_rng, 200)
  ids = tok.encode(text)
  assert ids.max() < 256 and tok.vocab_size == 259 and tok.eos_id == 257
  assert tok.decode(ids) == text
  assert tok.decode(list(ids) + [tok.EOS, tok.BOS]) == text  # specials are not text


def test_hf_tokenizer_json(tmp_path, np_rng):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<|endoftext|>"])
  tok.train_from_iterator([random_text(np_rng, 50) for _ in range(50)], trainer)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  hf = load_tokenizer(path)
  assert isinstance(hf, HFTokenizer) and hf.eos_id == 1 and hf.vocab_size <= 120
  text = random_text(np_rng, 30)
  (ids,) = hf.encode_batch([text])
  assert ids.dtype == np.int32 and len(ids) > 0
  assert hf.decode(ids).replace(" ", "") == text.replace(" ", "").replace("\t", "").replace("\n", "")
  # Used end to end: the corpus separates documents with its end-of-text id.
  (tmp_path / "d.txt").write_text(random_text(np_rng, 400))
  corpus = build_corpus(DataConfig(source=str(tmp_path / "d.txt"), tokenizer=path, seq_len=8,
                                   val_fraction=0.2), hf, progress=False)
  assert corpus.train_tokens.max() < hf.vocab_size


def test_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such tokenizer.json"):
    load_tokenizer(str(tmp_path / "missing.json"))
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="not a valid tokenizer.json"):
    load_tokenizer(str(bad))


def test_stdlib_corpus_is_deterministic():
  files = stdlib_files()
  assert len(files) > 100 and files == sorted(files)
  assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
  cfg = DataConfig(max_docs=40, seq_len=32)
  a = build_corpus(cfg, ByteTokenizer(), progress=False)
  b = build_corpus(cfg, ByteTokenizer(), progress=False)
  np.testing.assert_array_equal(a.train_tokens, b.train_tokens)
  np.testing.assert_array_equal(a.val_tokens, b.val_tokens)
  assert a.n_docs == 40
  n = len(a.train_tokens) + len(a.val_tokens)
  assert abs(len(a.val_tokens) / n - cfg.val_fraction) < 0.01
  assert np.sum(a.train_tokens == ByteTokenizer.EOS) + np.sum(a.val_tokens == ByteTokenizer.EOS) == 40
  # Another seed shuffles the documents differently.
  c = build_corpus(DataConfig(max_docs=40, seq_len=32, seed=1), ByteTokenizer(), progress=False)
  assert not np.array_equal(a.val_tokens[:1000], c.val_tokens[:1000])


def test_local_files_globs_and_formats(tmp_path, np_rng):
  docs = write_docs(tmp_path, np_rng)
  got = list(iter_documents(DataConfig(source=str(tmp_path))))
  assert got == docs["a.txt"] + docs["b.jsonl"] + docs["c.md"]  # sorted paths, jsonl per line
  got = list(iter_documents(DataConfig(source=f"{tmp_path}/**/*.md, {tmp_path}/a.txt")))
  assert got == docs["c.md"] + docs["a.txt"]
  assert len(list(iter_documents(DataConfig(source=str(tmp_path), max_docs=2)))) == 2


def test_parquet(tmp_path, np_rng):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  texts = [random_text(np_rng, 40) for _ in range(5)]
  pq.write_table(pa.table({"content": texts, "n": list(range(5))}), tmp_path / "shard.parquet")
  cfg = DataConfig(source=str(tmp_path / "*.parquet"), text_field="content")
  assert list(iter_documents(cfg)) == texts
  with pytest.raises(ValueError, match="no column 'text'"):
    list(iter_documents(DataConfig(source=str(tmp_path / "shard.parquet"))))


def test_missing_and_bad_sources(tmp_path, np_rng):
  with pytest.raises(FileNotFoundError, match="matches no files"):
    list(iter_documents(DataConfig(source=str(tmp_path / "nope" / "*.jsonl"))))
  with pytest.raises(FileNotFoundError, match="matches no files"):
    expand_paths(str(tmp_path / "absent.txt"))
  (tmp_path / "x.jsonl").write_text('{"body": "hello"}\n')
  with pytest.raises(ValueError, match="x.jsonl:1: no 'text' field"):
    list(iter_documents(DataConfig(source=str(tmp_path / "x.jsonl"))))
  (tmp_path / "y.jsonl").write_text('{"text": "ok"}\n{broken\n')
  with pytest.raises(ValueError, match="y.jsonl:2: not valid JSON"):
    list(iter_documents(DataConfig(source=str(tmp_path / "y.jsonl"))))
  (tmp_path / "small.txt").write_text(random_text(np_rng, 5))
  with pytest.raises(ValueError, match="too few"):
    build_corpus(DataConfig(source=str(tmp_path / "small.txt"), seq_len=512), ByteTokenizer(),
                 progress=False)
  with pytest.raises(ValueError, match="max_docs"):
    list(iter_documents(DataConfig(source="hf:HuggingFaceFW/fineweb-edu")))


def test_hf_source_needs_datasets():
  try:
    import datasets  # noqa: F401  (only probing whether it is installed)
  except ImportError:
    with pytest.raises(ImportError, match="pip install datasets"):
      list(iter_documents(DataConfig(source="hf:HuggingFaceFW/fineweb-edu", max_docs=10)))
  else:
    pytest.skip("datasets is installed; the remote path needs a network")


def make_batches(tokens, state=None, batch=3, seq_len=8, seed=5):
  return Batches(tokens, seq_len, batch, seed, state=state)


def test_batches_pack_shift_and_cover_every_example(np_rng):
  tokens = np_rng.integers(0, 259, 8 * 10 + 1).astype(np.uint16)
  b = make_batches(tokens, batch=5)
  seen = np.concatenate([b.next(), b.next()])
  assert seen.shape == (10, 9) and seen.dtype == np.int32
  # One epoch visits each example once: example i is tokens[8 i : 8 i + 9].
  expected = {tuple(tokens[8 * i: 8 * i + 9]) for i in range(10)}
  assert {tuple(r) for r in seen} == expected
  assert b.state["epoch"] == 1 and b.state["index"] == 0


def test_batches_deterministic_and_resumable(np_rng):
  tokens = np_rng.integers(0, 259, 8 * 7 + 1).astype(np.uint16)  # 7 examples: batches span epochs
  ref = make_batches(tokens)
  run = [ref.next() for _ in range(9)]
  again = make_batches(tokens)
  np.testing.assert_array_equal(np.stack(run), np.stack([again.next() for _ in range(9)]))
  first = make_batches(tokens)
  for _ in range(4):
    first.next()
  state = json.loads(json.dumps(first.state))  # what a checkpoint stores
  resumed = make_batches(tokens, state=state)
  for want in run[4:]:
    np.testing.assert_array_equal(resumed.next(), want)
  # Epochs are shuffled differently from each other.
  assert not np.array_equal(ref._permutation(0), ref._permutation(1))


def test_batches_reject_changed_data(np_rng):
  tokens = np_rng.integers(0, 259, 200).astype(np.uint16)
  state = make_batches(tokens).state
  with pytest.raises(ValueError, match="changed since the checkpoint"):
    make_batches(tokens[:150], state=state)
  with pytest.raises(ValueError, match="fewer than one batch"):
    make_batches(tokens[:20], batch=4)


def test_validation_batches(np_rng):
  tokens = np_rng.integers(0, 259, 8 * 7 + 1).astype(np.uint16)
  vb = validation_batches(tokens, 8, 3, max_batches=5)
  assert len(vb) == 2 and vb[0].shape == (3, 9)
  np.testing.assert_array_equal(vb[0][1], tokens[8:17])
  with pytest.raises(ValueError, match="raise data.val_fraction"):
    validation_batches(tokens[:20], 8, 3, 5)


def test_module_prose_reads_docstrings_in_source_order(tmp_path):
  src = tmp_path / "mod.py"
  src.write_text('''"""Module summary.

    Indented body line.
"""
import os  # comments are not prose here

X = "a string that is not a docstring"


class A:
  """Class A does things."""

  def method(self):
    """Method of A."""

    def inner():
      """Nested function."""


async def g():
  """An async function."""


def no_doc():
  return 1
''')
  assert module_prose(str(src)) == ("Module summary.\n\nIndented body line.\n\nClass A does "
                                    "things.\n\nMethod of A.\n\nNested function.\n\nAn async "
                                    "function.")
  bad = tmp_path / "py2.py"
  bad.write_text('print "not python 3"\n')
  assert module_prose(str(bad)) == ""  # skipped, not an error
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  assert module_prose(str(empty)) == ""


def test_stdlib_prose_source():
  docs = list(stdlib_prose_documents())
  kinds = [k for k, _ in docs]
  n_topics = len(pydoc_topics())
  # Module docstrings first, then every pydoc topic (sorted by topic name).
  assert n_topics > 50 and kinds == ["docstrings"] * (len(docs) - n_topics) + ["topic"] * n_topics
  assert len(docs) - n_topics > 300
  assert [t for _, t in docs[-n_topics:]] == [t for _, t in pydoc_topics()]
  assert any(t.startswith('The "while" statement') for _, t in docs[-n_topics:])
  assert all(t and t == t.strip() for _, t in docs)
  total = sum(len(t.encode()) for _, t in docs)
  assert total > 1_000_000  # ~2.2 MB with Python 3.12
  # Mostly letters and spaces: prose, not code.
  text = "".join(t for _, t in docs[:50])
  assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.85
  # Selectable like the other sources; deterministic; test suites left out.
  cfg = DataConfig(source="stdlib-prose", max_docs=30, seq_len=32)
  got = list(iter_documents(cfg))
  assert got == [t for _, t in docs[:30]] == list(iter_documents(cfg))
  prose = {t for _, t in docs}
  tests = [p for p in stdlib_files() if "test" in p.parts][:40]
  if tests:  # some Python builds ship without the test suite
    assert not any(module_prose(str(p)) in prose for p in tests if module_prose(str(p)))
  corpus = build_corpus(cfg, ByteTokenizer(), progress=False)
  assert corpus.n_docs == 30
  assert np.sum(corpus.train_tokens == ByteTokenizer.EOS) + np.sum(
      corpus.val_tokens == ByteTokenizer.EOS) == 30
