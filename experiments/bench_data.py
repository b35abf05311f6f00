"""Data pipeline benchmark: prepare >= 2 GB of text into token shards, read it back, train from it.

1. Text: the documents of the built-in corpora (``stdlib`` code and ``stdlib-prose``), repeated in
   a fresh random order per repetition until ``--size`` bytes of UTF-8 text are written, as JSONL
   files of about 128 MB (``DIR/text/``).
2. Preparation: ``sparse_jax.data.prepare.prepare_data`` with ``--workers`` processes (byte
   tokenizer by default: one token per byte, uint16 shards); tokens/s = tokens / wall time.
3. Loading: ``Batches`` over the shards' ``TokenStream`` (random examples of seq_len 2048 in the
   seeded epoch permutation, as training reads them) for ``--load-batches`` batches of 64;
   tokens/s of reading and packing them.
4. Memory: ``--steps`` steps of the ``tiny`` preset trained from the shards and, for comparison,
   the same run on a tiny in-memory corpus (200 stdlib-prose documents), each in its own process;
   each reports its peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The
   difference is what reading the 2 GB corpus costs beyond the model and the framework.

    python experiments/bench_data.py                      # 2 GB in a temporary directory
    python experiments/bench_data.py --size 200M --dir /data/bench --keep

Writes ``--out`` (default experiments/results/bench_data_cpu.json).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sparse_jax.config import DataConfig  # noqa: E402
from sparse_jax.data import Batches, iter_documents  # noqa: E402
from sparse_jax.data.prepare import PrepareOptions, prepare_data  # noqa: E402
from sparse_jax.data.shards import open_split  # noqa: E402

_FILE_BYTES = 128 << 20
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
  text = text.strip().upper().rstrip("B")
  scale = _UNITS.get(text[-1:], 1)
  value = float(text[:-1] if text[-1:] in _UNITS else text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"--size {text!r}: must be positive")
  return int(value * scale)


def write_text(directory: str, size: int, seed: int) -> dict:
  """JSONL files of the built-in documents, reshuffled per repetition, ``size`` bytes in all."""
  os.makedirs(directory, exist_ok=True)
  docs = [d for src in ("stdlib", "stdlib-prose") for d in iter_documents(DataConfig(source=src))]
  lines = [(json.dumps({"text": d}) + "\n").encode() for d in docs]
  text_bytes = [len(d.encode()) for d in docs]
  rng = np.random.default_rng(seed)
  written, n_files, reps, f, in_file = 0, 0, 0, None, 0
  try:
    while written < size:
      reps += 1
      for i in rng.permutation(len(lines)):
        if f is None or in_file >= _FILE_BYTES:
          if f is not None:
            f.close()
          f = open(os.path.join(directory, f"part_{n_files:04d}.jsonl"), "wb")
          n_files, in_file = n_files + 1, 0
        f.write(lines[i])
        in_file += len(lines[i])
        written += text_bytes[i]
        if written >= size:
          break
  finally:
    if f is not None:
      f.close()
  return dict(text_bytes=written, files=n_files, repetitions=reps, distinct_documents=len(docs))


def bench_loading(directory: str, seq_len: int, batch_size: int, n_batches: int) -> dict:
  stream = open_split(directory, "train")
  batches = Batches(stream, seq_len, batch_size, seed=0)
  t0 = time.perf_counter()
  checksum = 0
  for _ in range(n_batches):
    checksum += int(batches.next()[:, 0].sum())
  dt = time.perf_counter() - t0
  tokens = n_batches * batch_size * (seq_len + 1)
  return dict(load_tokens_per_s=tokens / dt, load_batches=n_batches, load_batch_size=batch_size,
              load_seq_len=seq_len, load_seconds=dt, load_checksum=checksum)


_TRAIN = """
import json, os, resource, sys
sys.path.insert(0, {root!r})
from sparse_jax.config import apply_overrides, get_config
from sparse_jax.train import train
cfg = apply_overrides(get_config("tiny"), {overrides!r})
s = train(cfg, {out!r}, progress=False)
print("RESULT", json.dumps(dict(max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                * 1024, steps=s["steps"], train_ce_last=s["train_ce_last"],
                                tokens_per_s=s["tokens_per_s"])))
"""


def train_rss(source: str, out: str, steps: int, extra: list[str]) -> dict:
  overrides = [f"data.source={source}", f"train.steps={steps}", "train.eval_every=1000000",
               "train.ckpt_every=1000000", *extra]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run([sys.executable, "-c", _TRAIN.format(root=ROOT, overrides=overrides,
                                                             out=out)],
                        capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"training from {source} failed:\n{proc.stdout[-2000:]}"
                       f"{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", type=parse_size, default=parse_size("2G"),
                 help="bytes of text to generate (e.g. 2G, 500M; default 2G)")
  p.add_argument("--dir", help="working directory (default: a temporary one, deleted at the end)")
  p.add_argument("--keep", action="store_true", help="keep the working directory")
  p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizing processes")
  p.add_argument("--tokenizer", default="bytes")
  p.add_argument("--shard-tokens", type=int, default=1 << 26)
  p.add_argument("--load-batches", type=int, default=200)
  p.add_argument("--steps", type=int, default=50, help="training steps of the memory runs")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results",
                                               "bench_data_cpu.json"))
  args = p.parse_args(argv)
  work = args.dir or tempfile.mkdtemp(prefix="bench_data_")
  os.makedirs(work, exist_ok=True)
  result: dict = dict(size_requested=args.size, workers=args.workers, tokenizer=args.tokenizer,
                      cpu_count=os.cpu_count())
  try:
    t0 = time.perf_counter()
    result.update(write_text(os.path.join(work, "text"), args.size, args.seed))
    result["generate_s"] = time.perf_counter() - t0
    print(f"text: {result['text_bytes']:,} bytes in {result['files']} files "
          f"({result['generate_s']:.0f} s)", flush=True)
    shards = os.path.join(work, "shards")
    m = prepare_data(PrepareOptions(source=os.path.join(work, "text", "*.jsonl"),
                                    tokenizer=args.tokenizer, out=shards, workers=args.workers,
                                    shard_tokens=args.shard_tokens), progress=False)
    result.update(prepare_s=m["prepare_s"], shards=len(m["shards"]), documents=m["documents"],
                  train_tokens=m["train_tokens"], val_tokens=m["val_tokens"],
                  shard_bytes=sum(os.path.getsize(os.path.join(shards, s[k]))
                                  for s in m["shards"] for k in ("train_file", "val_file")),
                  prepare_tokens_per_s=m["total_tokens"] / m["prepare_s"],
                  prepare_text_mb_per_s=result["text_bytes"] / m["prepare_s"] / 1e6)
    print(f"prepared {m['total_tokens']:,} tokens in {m['prepare_s']:.0f} s "
          f"({result['prepare_tokens_per_s']:,.0f} tokens/s)", flush=True)
    result.update(bench_loading(shards, 2048, 64, args.load_batches))
    print(f"loading: {result['load_tokens_per_s']:,.0f} tokens/s", flush=True)
    extra = ["data.seq_len=128", "train.batch_size=16"] + (
        [] if args.tokenizer == "bytes" else [f"data.tokenizer={args.tokenizer}"])
    small = train_rss("stdlib-prose", os.path.join(work, "run_small"), args.steps,
                      extra + ["data.max_docs=200"])
    big = train_rss(shards, os.path.join(work, "run_shards"), args.steps, extra)
    result.update(train_steps=args.steps, max_rss_small_corpus_bytes=small["max_rss_bytes"],
                  max_rss_shards_bytes=big["max_rss_bytes"],
                  max_rss_extra_bytes=big["max_rss_bytes"] - small["max_rss_bytes"],
                  train_ce_last_shards=big["train_ce_last"],
                  train_tokens_per_s_shards=big["tokens_per_s"])
    result["rss_extra_under_2gb"] = result["max_rss_extra_bytes"] < 2 << 30
    print(f"peak RSS: {big['max_rss_bytes'] / 2**20:.0f} MiB from the shards, "
          f"{small['max_rss_bytes'] / 2**20:.0f} MiB on the tiny corpus", flush=True)
  finally:
    if not (args.keep or args.dir):
      shutil.rmtree(work, ignore_errors=True)
  result["bench_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
