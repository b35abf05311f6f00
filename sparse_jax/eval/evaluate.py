"""``sparse-jax eval``: evaluate a checkpoint and write the report.

Output directory (default ``CHECKPOINT/eval`` for a run directory, ``runs/eval-NAME`` for a
Hugging Face checkpoint)::

    report.json, report.md     every number below; the Markdown embeds the plots
    sparsity_by_layer.png      mean / p50 / p90 / p99 active neurons per layer, dead neurons
    active_distribution.png    distribution of active neurons per token, and its tail per layer
    sparsity_by_position.png   mean active neurons vs position in the sequence
    sparsity_by_surprisal.png  mean active neurons vs surprisal and vs next-token loss
    neuron_firing.png          per-neuron firing frequencies, sorted
    sparsity_counts.npz        the raw histograms and per-neuron counts
    mc_TASK.jsonl              per-example multiple-choice predictions and log-likelihoods

The evaluation text is the run's own validation split by default (the same windows its training
evaluation used, first ``max_batches`` batches), or every document of ``data``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from sparse_jax.data import build_corpus, iter_documents, validation_batches
from sparse_jax.data.pipeline import load_splits
from sparse_jax.data.shards import is_prepared
from sparse_jax.eval import report as report_lib
from sparse_jax.eval.context import warn_past_context
from sparse_jax.eval.lm import evaluate_lm
from sparse_jax.checkpoints import Loaded, load_model
from sparse_jax.eval.multiple_choice import evaluate_task, load_task
from sparse_jax.nn import count_params


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """What ``evaluate_checkpoint`` does; the CLI flags of ``sparse-jax eval`` map one to one.

  data: None evaluates the checkpoint's validation split; else files/globs/"stdlib" whose
    documents (all of them) are the evaluation text, or a directory made by ``sparse-jax
    prepare-data``, whose validation split is.
  seq_len: window length (default: the run's data.seq_len; a Hugging Face checkpoint's
    max_position_embeddings, at most 2048). Longer than the trained context warns.
  batch_size, max_batches: default to the run's own validation (train.batch_size / grad_accum
    windows per batch, train.eval_batches batches), so the default evaluation reproduces the
    run's validation loss; 8 and 32 for a Hugging Face checkpoint.
  tasks: multiple-choice JSONL files ("path" or "FORMAT:path").
  mc_max_len: longest context + choice scored (default: seq_len); longer ones keep their end.
  """
  checkpoint: str
  out: str | None = None
  step: int | None = None
  data: str | None = None
  seq_len: int | None = None
  batch_size: int | None = None
  max_batches: int | None = None
  lm: bool = True
  tasks: tuple[str, ...] = ()
  mc_batch_size: int = 16
  mc_max_len: int | None = None
  ffn: str | None = None
  compute_dtype: str | None = None
  tokenizer: str | None = None
  allow_unknown_config: bool = False
  progress: bool = True

  def __post_init__(self):
    for name in ("batch_size", "max_batches", "mc_batch_size", "seq_len", "mc_max_len"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"{name}={v!r}: must be a positive integer")
    if not self.lm and not self.tasks:
      raise ValueError("nothing to evaluate: the language-model evaluation is off and no "
                       "multiple-choice task is given")


def default_out(loaded: Loaded) -> str:
  if loaded.kind == "run":
    return os.path.join(loaded.path, "eval")
  return os.path.join("runs", "eval-" + os.path.basename(os.path.normpath(loaded.path)))


def evaluation_tokens(loaded: Loaded, data: str | None, *, progress: bool
                      ) -> tuple[np.ndarray, str]:
  """(token stream, description) of the evaluation text."""
  cfg, tok = loaded.cfg, loaded.tokenizer
  source = cfg.data.source if data is None else data
  if is_prepared(source):
    # The prepared validation split, read from disk: the training shards are not touched.
    return load_splits(dataclasses.replace(cfg.data, source=source), tok,
                       progress=progress)[1], f"validation split of the prepared data {source!r}"
  if data is None:
    corpus = build_corpus(cfg.data, tok, progress=progress)
    return corpus.val_tokens, (f"validation split of data.source={cfg.data.source!r} "
                               f"(val_fraction {cfg.data.val_fraction}, seed {cfg.data.seed})")
  docs = list(iter_documents(dataclasses.replace(cfg.data, source=data, max_docs=None)))
  if not docs:
    raise ValueError(f"data {data!r} holds no documents")
  pieces = []
  for ids in tqdm(tok.encode_batch(docs), desc="tokenizing", disable=not progress, leave=False):
    pieces += [ids.astype(np.int32), np.asarray([tok.eos_id], np.int32)]
  return np.concatenate(pieces), f"all {len(docs)} documents of {data!r}"


def default_batches(loaded: Loaded) -> tuple[int, int]:
  """(windows per batch, batches): a run's own validation settings, else (8, 32)."""
  if loaded.kind == "run":
    t = loaded.cfg.train
    return t.batch_size // t.grad_accum, t.eval_batches
  return 8, 32


def _device() -> str:
  d = jax.devices()[0]
  return f"{d.platform} ({getattr(d, 'device_kind', d.platform)})"


def evaluate_checkpoint(opts: EvalOptions) -> dict:
  """Evaluates ``opts.checkpoint``, writes the report files, returns the report dict."""
  t0 = time.perf_counter()
  loaded = load_model(opts.checkpoint, step=opts.step, ffn=opts.ffn,
                      compute_dtype=opts.compute_dtype, tokenizer=opts.tokenizer,
                      allow_unknown_config=opts.allow_unknown_config)
  cfg = loaded.cfg
  seq_len = opts.seq_len or cfg.data.seq_len
  warn_past_context(seq_len, cfg.data.seq_len, "evaluation windows span")
  if opts.tasks:
    warn_past_context(opts.mc_max_len or seq_len, cfg.data.seq_len,
                      "multiple-choice contexts + choices span up to")
  tasks = [load_task(spec) for spec in opts.tasks]  # bad task files fail before the long work
  out = opts.out or default_out(loaded)
  os.makedirs(out, exist_ok=True)
  batch_size, max_batches = default_batches(loaded)
  batch_size, max_batches = opts.batch_size or batch_size, opts.max_batches or max_batches
  report = dict(checkpoint=loaded.label, path=os.path.abspath(loaded.path), kind=loaded.kind,
                step=loaded.step, model=dataclasses.asdict(cfg.model),
                params=count_params(loaded.model), tokenizer=cfg.data.tokenizer, out=out)
  if opts.lm:
    tokens, report["data"] = evaluation_tokens(loaded, opts.data, progress=opts.progress)
    batches = validation_batches(tokens, seq_len, batch_size, max_batches)
    acc = evaluate_lm(loaded.model, batches, progress=opts.progress)
    report["lm"] = acc.result()
    np.savez_compressed(os.path.join(out, "sparsity_counts.npz"), **acc.arrays())
    report["plots"] = report_lib.write_plots(report["lm"], acc.arrays(), out)
  report["multiple_choice"] = []
  for task in tasks:
    summary, preds = evaluate_task(loaded.model, loaded.tokenizer, task,
                                   max_len=opts.mc_max_len or seq_len,
                                   batch_size=opts.mc_batch_size, progress=opts.progress)
    with open(os.path.join(out, f"mc_{task.name}.jsonl"), "w") as fh:
      fh.writelines(json.dumps(p) + "\n" for p in preds)
    report["multiple_choice"].append(summary)
  report["wall_s"] = time.perf_counter() - t0
  report["device"] = _device()
  report["report_json"], report["report_md"] = report_lib.write_report(report, out)
  return report
