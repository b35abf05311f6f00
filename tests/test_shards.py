"""Prepared token shards: preparation (parallel, resumable, refused on changed settings), the
bounded-memory reader, training and exact resumption from shards, eval's validation split, and
two processes reading disjoint parts."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from sparse_jax.cli import main
from sparse_jax.config import DataConfig, apply_overrides, get_config
from sparse_jax.data import Batches, ByteTokenizer, validation_batches
from sparse_jax.data.dataset import examples
from sparse_jax.data.pipeline import load_splits
from sparse_jax.data.prepare import PrepareOptions, prepare_data
from sparse_jax.data.shards import open_split, read_manifest
from sparse_jax.train import Checkpointer, init_state, resolve_config, train
from test_checkpoint import ROOT, assert_trees_identical
from test_data import random_text
from test_train import fresh_seed


@pytest.fixture
def rng():
  seed = fresh_seed()
  return np.random.default_rng(seed)


def write_corpus(directory, rng, n_docs=60, words=(20, 400)):
  """Random documents in two JSONL files and three text files; returns them in source order."""
  os.makedirs(directory, exist_ok=True)
  docs = [random_text(rng, int(rng.integers(*words))) for _ in range(n_docs)]
  half = n_docs // 2
  for name, part in (("a.jsonl", docs[:half - 3]), ("b.jsonl", docs[half - 3:n_docs - 3])):
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
      f.writelines(json.dumps({"text": d}) + "\n" for d in part)
  for i, d in enumerate(docs[n_docs - 3:]):
    with open(os.path.join(directory, f"c{i}.txt"), "w", encoding="utf-8") as f:
      f.write(d)
  return docs


def opts(src, out, **kw):
  kw.setdefault("shard_tokens", 3000)
  kw.setdefault("workers", 1)
  kw.setdefault("val_fraction", 0.1)
  return PrepareOptions(source=os.path.join(src, "*"), out=str(out), **kw)


def files_of(directory):
  return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))
          if n.endswith(".bin") or n.startswith("shard_")}


def test_prepare_round_trip(tmp_path, rng):
  docs = write_corpus(tmp_path / "src", rng)
  m = prepare_data(opts(tmp_path / "src", tmp_path / "p"), progress=False)
  tok = ByteTokenizer()
  per_doc = [np.concatenate([tok.encode(d), [tok.EOS]]) for d in docs]
  assert m["documents"] == len(docs) and len(m["shards"]) > 3 and m["dtype"] == "uint16"
  assert m["total_tokens"] == sum(map(len, per_doc))
  # Train stream: each shard's leading documents; validation: its trailing ones.
  train_ref, val_ref = [], []
  for s in m["shards"]:
    shard_docs = per_doc[s["first_doc"]:s["first_doc"] + s["docs"]]
    split = s["docs"] - s["val_docs"]
    assert s["val_docs"] >= 1 and s["val_tokens"] >= 0.1 * (s["train_tokens"] + s["val_tokens"])
    train_ref += shard_docs[:split]
    val_ref += shard_docs[split:]
  train_ref, val_ref = np.concatenate(train_ref), np.concatenate(val_ref)
  train, val = open_split(str(tmp_path / "p"), "train"), open_split(str(tmp_path / "p"), "val")
  assert len(train) == len(train_ref) and len(val) == len(val_ref)
  np.testing.assert_array_equal(train.read(0, len(train)), train_ref)
  np.testing.assert_array_equal(val.read(0, len(val)), val_ref)
  for _ in range(20):  # reads across shard boundaries
    start = int(rng.integers(0, len(train) - 5000))
    np.testing.assert_array_equal(train.read(start, 5000), train_ref[start:start + 5000])
  # Packed examples and batches are those of the in-memory stream.
  ids = rng.permutation(len(train_ref) // 32 - 1)[:50]
  np.testing.assert_array_equal(examples(train, 32, ids), examples(train_ref, 32, ids))
  a, b = Batches(train, 32, 8, seed=3), Batches(train_ref, 32, 8, seed=3)
  for _ in range(5):
    np.testing.assert_array_equal(a.next(), b.next())
  assert a.state == b.state
  for x, y in zip(validation_batches(val, 16, 4, 3), validation_batches(val_ref, 16, 4, 3)):
    np.testing.assert_array_equal(x, y)
  # Already complete: nothing is redone.
  again = prepare_data(opts(tmp_path / "src", tmp_path / "p"), progress=False)
  assert again["skipped_shards"] == len(m["shards"])


def test_parallel_preparation_is_identical(tmp_path, rng):
  write_corpus(tmp_path / "src", rng)
  prepare_data(opts(tmp_path / "src", tmp_path / "one"), progress=False)
  prepare_data(opts(tmp_path / "src", tmp_path / "two", workers=2), progress=False)
  assert files_of(tmp_path / "one") == files_of(tmp_path / "two")
  assert read_manifest(str(tmp_path / "one"))["shards"] == read_manifest(
      str(tmp_path / "two"))["shards"]


_SLOW_PREPARE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from sparse_jax.data import prepare
    write = prepare.write_shard
    def slow(*a, **k):
      time.sleep(0.3)
      return write(*a, **k)
    prepare.write_shard = slow
    prepare.prepare_data(prepare.PrepareOptions(source={src!r}, out={out!r}, workers=1,
                                                shard_tokens=3000, val_fraction=0.1),
                         progress=False)
""")


def test_killed_preparation_resumes(tmp_path, rng):
  write_corpus(tmp_path / "src", rng)
  out = tmp_path / "killed"
  script = _SLOW_PREPARE.format(root=ROOT, src=os.path.join(tmp_path / "src", "*"), out=str(out))
  proc = subprocess.Popen([sys.executable, "-c", script])
  deadline = time.time() + 120
  while not (out / "shard_00002.json").exists():
    assert proc.poll() is None and time.time() < deadline, "the preparation ended too early"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "manifest.json").exists()
  with pytest.raises(FileNotFoundError, match="has not finished: rerun"):
    read_manifest(str(out))
  with pytest.raises(FileNotFoundError, match="has not finished: rerun"):  # not read as text
    load_splits(DataConfig(source=str(out)), ByteTokenizer(), progress=False)
  done = len([n for n in os.listdir(out) if n.startswith("shard_") and n.endswith(".json")])
  # A half-written file of the shard being written when killed is left for the rerun to replace.
  (out / f"train_{done:05d}.bin.tmp-1").write_bytes(b"partial")
  m = prepare_data(opts(tmp_path / "src", out), progress=False)
  assert m["skipped_shards"] == done >= 3 and len(m["shards"]) > done
  prepare_data(opts(tmp_path / "src", tmp_path / "straight"), progress=False)
  assert files_of(out) == files_of(tmp_path / "straight")


def test_changed_settings_or_sources_are_refused(tmp_path, rng):
  write_corpus(tmp_path / "src", rng)
  out = tmp_path / "p"
  prepare_data(opts(tmp_path / "src", out), progress=False)
  os.remove(out / "manifest.json")  # as if interrupted before the end
  with pytest.raises(ValueError, match="other settings or source files.*shard_tokens"):
    prepare_data(opts(tmp_path / "src", out, shard_tokens=5000), progress=False)
  with open(tmp_path / "src" / "c0.txt", "a") as f:
    f.write(" more")
  with pytest.raises(ValueError, match="differing: sources"):
    prepare_data(opts(tmp_path / "src", out), progress=False)
  with pytest.raises(ValueError, match="val_fraction=0.7"):
    opts(tmp_path / "src", out, val_fraction=0.7)
  # A damaged shard is caught when it is opened.
  shutil.copy(out / "plan.json", tmp_path / "plan.json")
  prepare_data(opts(tmp_path / "src", tmp_path / "q"), progress=False)
  with open(tmp_path / "q" / "train_00001.bin", "ab") as f:
    f.write(b"\0\0")
  with pytest.raises(ValueError, match="train_00001.bin: .* bytes, but its manifest"):
    open_split(str(tmp_path / "q"), "train")


def _shard_cfg(directory, *overrides):
  return apply_overrides(get_config("tiny"), [
      f"data.source={directory}", "data.seq_len=32", "train.batch_size=16", "train.log_every=1",
      "train.eval_every=1000", "train.eval_batches=2", "train.ckpt_every=1000",
      "train.warmup_steps=0", f"train.seed={fresh_seed()}", f"data.seed={fresh_seed()}",
      *overrides])


def test_train_from_shards_resumes_bit_identically(tmp_path, rng, capsys):
  write_corpus(tmp_path / "src", rng, n_docs=80)
  assert main(["prepare-data", "--data", os.path.join(tmp_path / "src", "*"), "--out",
               str(tmp_path / "p"), "--workers", "1", "--shard-tokens", "4000",
               "--val-fraction", "0.1", "--no-progress"]) == 0
  assert "sparse-jax train --data" in capsys.readouterr().out
  cfg = _shard_cfg(tmp_path / "p", "train.steps=6", "train.grad_accum=2")
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  a = train(cfg, straight, progress=False)
  train(cfg, stopped, stop_at=3, progress=False)
  b = train(cfg, stopped, progress=False)
  assert a["steps"] == b["steps"] == 6 and a["val_ce"] == b["val_ce"]
  template = init_state(resolve_config(cfg)[0])[1]
  sa, da, _, _ = Checkpointer(os.path.join(straight, "checkpoints"), keep=2).restore(template)
  sb, db, _, _ = Checkpointer(os.path.join(stopped, "checkpoints"), keep=2).restore(template)
  assert_trees_identical(sa, sb)
  assert da == db and da["index"] == 6 * 16 % da["n_examples"]
  # The tokenizer must be the shards' own.
  bad = apply_overrides(cfg, [f"data.tokenizer={_bpe_tokenizer(tmp_path, rng)}"])
  with pytest.raises(ValueError, match="not the tokenizer the shards .* were prepared with"):
    train(bad, str(tmp_path / "bad"), progress=False)


def _bpe_tokenizer(tmp_path, rng):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<|endoftext|>"])
  tok.train_from_iterator([random_text(rng, 50) for _ in range(30)], trainer)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  return path


def test_eval_reads_the_prepared_validation_split(tmp_path, rng, monkeypatch):
  write_corpus(tmp_path / "src", rng, n_docs=40)
  prepare_data(opts(tmp_path / "src", tmp_path / "p"), progress=False)
  run = str(tmp_path / "run")
  train(_shard_cfg(tmp_path / "p", "train.steps=2", "train.batch_size=8"), run, progress=False)
  from sparse_jax.eval import EvalOptions, evaluate_checkpoint
  from sparse_jax.eval import evaluate as evaluate_module

  def no_tokenizing(*a, **k):
    raise AssertionError("eval re-tokenized the corpus")
  monkeypatch.setattr(evaluate_module, "build_corpus", no_tokenizing)
  report = evaluate_checkpoint(EvalOptions(checkpoint=run, batch_size=2, max_batches=2,
                                           progress=False))
  assert "validation split of the prepared data" in report["data"]
  assert report["lm"]["tokens"] == 2 * 2 * 32
  # --data naming a prepared directory: its validation split too (not its files read as text).
  from sparse_jax.eval import load_checkpoint
  tokens, what = evaluate_module.evaluation_tokens(load_checkpoint(run), str(tmp_path / "p"),
                                                   progress=False)
  assert len(tokens) == read_manifest(str(tmp_path / "p"))["val_tokens"] and "prepared" in what


_HOST_PROCESS = textwrap.dedent("""
    import json, os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.path.insert(0, {root!r})
    from sparse_jax.config import DataConfig, apply_overrides, get_config
    from sparse_jax.data import shards
    from sparse_jax.train import train

    read = []
    examples = shards.TokenStream.examples
    def spy(self, ids, seq_len):
      if self.paths[0].endswith("train_00000.bin"):
        read.extend(int(i) for i in ids)
      return examples(self, ids, seq_len)
    shards.TokenStream.examples = spy
    cfg = apply_overrides(get_config("tiny"), {overrides!r} + [
        "parallel.distributed=true", "parallel.coordinator_address=localhost:{port}",
        "parallel.num_processes=2", "parallel.process_id=" + sys.argv[1]])
    summary = train(cfg, {out!r}, progress=False)
    print("RESULT", json.dumps([jax.process_count(), summary["val_ce"], read]))
""")


def test_two_processes_read_disjoint_parts(tmp_path, rng):
  """Two processes of 4 CPU devices each read disjoint examples of the shards (together: every
  example of the global batches) and train as one process of 8 devices does."""
  write_corpus(tmp_path / "src", rng, n_docs=60)
  prepare_data(opts(tmp_path / "src", tmp_path / "p"), progress=False)
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  cfg = _shard_cfg(tmp_path / "p", "train.steps=3", "train.batch_size=8", "parallel.mesh=data:8")
  overrides = [f"{s}.{k}={v}" for s in ("data", "train", "parallel")
               for k, v in cfg.to_dict()[s].items() if v is not None]
  out = str(tmp_path / "hosts")
  script = _HOST_PROCESS.format(root=ROOT, overrides=overrides, port=port, out=out)
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  results = []
  for proc, log in zip(procs, logs):
    assert proc.returncode == 0, log[-3000:]
    results.append(json.loads(log.split("RESULT ", 1)[1].splitlines()[0]))
  reads = [set(r[2]) for r in results]
  assert len(results[0][2]) == len(results[1][2]) == 3 * 8 // 2  # half of every batch each
  assert not reads[0] & reads[1]
  batches = Batches(open_split(str(tmp_path / "p"), "train"), 32, 8, cfg.data.seed)
  assert reads[0] | reads[1] == set(np.concatenate([batches.next_ids() for _ in range(3)]))
  # One process of 8 devices (the same mesh shape) trains to the same loss.
  one = train(cfg, str(tmp_path / "one"), progress=False)["val_ce"]
  for count, val_ce, _ in results:
    assert count == 2
    np.testing.assert_allclose(val_ce, one, rtol=1e-4)

