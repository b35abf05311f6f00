"""The ``sparse-jax`` command line: train, prepare-data, eval, generate, export-hf,
prepare-inference (``USAGE`` is its help).

A subcommand is ``COMMANDS[name] = Command(help, add_arguments(parser), run(args) -> int)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from typing import Callable

from sparse_jax.config import PRESETS, Config, apply_overrides
from sparse_jax.errors import RunError

USAGE = """Train, evaluate, sample from and export sparse language models.

    sparse-jax train --config tiny --max-minutes 3 --out runs/tiny
    sparse-jax train --config small --set model.n_layers=4 train.lr=3e-4 data.source='shards/*.parquet'
    sparse-jax train --config tiny --print-config
    sparse-jax train --help-config                 # every config field: type, default, meaning
    sparse-jax train --config my_run.yaml --set train.lr=3e-4   # or a run's own config.json
    sparse-jax prepare-data --data 'corpus/*.jsonl' --out data/corpus   # tokenize once, then
    sparse-jax train --config 0.5b --data data/corpus                   # train from the shards
    sparse-jax eval --checkpoint runs/tiny --tasks arc_easy.jsonl piqa.jsonl
    sparse-jax generate --checkpoint runs/tiny --prompt 'def main(' --temperature 0.8 --top-p 0.95
    sparse-jax export-hf --checkpoint runs/tiny --out exported/tiny --dtype bfloat16
    sparse-jax prepare-inference --checkpoint runs/tiny --out prepared/tiny

eval and generate take a run directory or a Hugging Face Llama-format checkpoint directory.
Rerunning train with the same --out resumes it; SIGTERM, SIGINT and SIGHUP save a checkpoint
first (exit status 128 + the signal's number).
"""


@dataclasses.dataclass(frozen=True)
class Command:
  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace], int]


def add_config_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default="tiny",
                 help=f"a preset ({', '.join(PRESETS)}; default tiny) or a JSON/YAML config file "
                      "(a run's own config.json too)")
  p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                 metavar="SECTION.FIELD=VALUE",
                 help="override config fields, e.g. model.n_layers=4 train.lr=3e-4")
  p.add_argument("--print-config", action="store_true", help="print the config and exit")
  p.add_argument("--help-config", action="store_true",
                 help="list every config field with its type, default and meaning, and exit")


def config_from_args(args: argparse.Namespace, shortcuts: dict[str, object]) -> Config:
  """The preset with ``shortcuts`` ({"train.steps": 100}, None = not given) and --set applied
  (--set last, so it wins)."""
  given = [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
  from sparse_jax.config_files import load_config
  return apply_overrides(load_config(args.config), given + list(args.overrides))


def _train_arguments(p: argparse.ArgumentParser) -> None:
  add_config_arguments(p)
  p.add_argument("--steps", type=int, help="train.steps: optimiser steps (the LR schedule's end)")
  p.add_argument("--max-minutes", type=float, help="train.max_minutes: wall-time budget")
  p.add_argument("--data", help="data.source: stdlib, files/globs, or hf:NAME[:CONFIG]")
  p.add_argument("--mesh", help="parallel.mesh: device mesh such as data:2,fsdp:4 (default auto: "
                                "data parallel over all devices)")
  p.add_argument("--out", help="run directory (default runs/<config>)")
  p.add_argument("--fresh", action="store_true", help="delete the run's checkpoints first")
  p.add_argument("--no-resume", action="store_true",
                 help="fail instead of resuming if the run directory has checkpoints")
  p.add_argument("--stop-at", type=int, help="stop (and save) at this step; resume later")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument("--wandb", metavar="PROJECT",
                 help="train.wandb=true, train.wandb_project=PROJECT: also log to Weights & Biases")


def two_column_table(rows: list[tuple[str, str]]) -> str:
  w = max(len(k) for k, _ in rows)
  line = "-" * (w + 3 + max(len(v) for _, v in rows))
  return "\n".join([line] + [f"{k:<{w}} | {v}" for k, v in rows] + [line])


def format_summary(s: dict) -> str:
  """The run summary as a two-column table."""
  def f(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)
  layers = " ".join(f"{x:.1f}" for x in s["val_active_per_token_L"])
  rows = [
      ("config", f"{s['config']} ({s['ffn']}, {s['params'] / 1e6:.2f}M params)"),
      ("steps", f"{s['steps']} of {s['target_steps']} (stopped by: {s['stop_reason']})"),
      ("tokens seen", f"{s['tokens']:,}"),
      ("throughput", f"{f(s['tokens_per_s'], '{:,.0f}')} tokens/s (after compilation)"
                     + (f" on {s['devices']} devices ({s['mesh']})" if s.get("devices", 1) > 1
                        else "")),
      ("L1 coefficient", f"{s['l1_coeff']:g} ({s['l1_norm']} normalisation)"),
      ("train loss", f"{f(s['train_ce_first'])} -> {f(s['train_ce_last'])} (cross-entropy)"),
      ("val loss", f"{f(s['val_ce_initial'])} -> {f(s['val_ce'])} (ppl {s['val_ppl']:.2f})"),
      ("active neurons/token", f"{s['val_active_per_token']:.1f} of {s['d_ff']} "
                               f"(per layer: {layers})"),
      ("sparsity", f"{s['val_sparsity_pct']:.2f}% of FFN activations are zero (validation)"),
      ("dead neurons", f"{s['dead_on_val_pct']:.1f}% never fire on validation; "
                       f"{f(s['dead_last_window_pct'], '{:.1f}%')} over the last train window"),
      ("sparse fallbacks", f"{s['val_overflow_rows']} overflow rows, dense-path share "
                           f"{s['val_dense_fallback']:.2f} (validation)"),
      ("checkpoint", s["checkpoint_dir"]),
      ("curves", s["plot"]),
      ("wall time", f"{s['wall_s']:.1f} s"),
  ]
  if s["stop_reason"] == "time budget":
    rows.append(("note", f"the time budget stopped the run at step {s['steps']} of "
                         f"{s['target_steps']}: rerun the same command to continue"))
  if s.get("nonfinite_steps_skipped"):
    rows.append(("skipped steps", f"{len(s['nonfinite_steps_skipped'])} non-finite steps "
                                  "skipped (train.nonfinite=skip)"))
  return two_column_table(rows)


def _train(args: argparse.Namespace) -> int:
  if args.help_config:
    from sparse_jax.config_files import field_reference, load_config
    print(field_reference(load_config(args.config)))
    return 0
  cfg = config_from_args(args, {"train.steps": args.steps, "train.max_minutes": args.max_minutes,
                                "data.source": args.data, "parallel.mesh": args.mesh,
                                "train.wandb": args.wandb and "true",
                                "train.wandb_project": args.wandb})
  if args.print_config:
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0
  from sparse_jax.train import train  # imports JAX: keep --help and config errors fast
  summary = train(cfg, args.out or f"runs/{cfg.name}", resume=not args.no_resume,
                  fresh=args.fresh, stop_at=args.stop_at, progress=not args.no_progress)
  print(format_summary(summary))
  return 0


def _checkpoint_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True,
                 help="a run directory (sparse-jax train --out) or a Hugging Face Llama-format "
                      "directory (config.json + safetensors)")
  p.add_argument("--step", type=int, help="run directories: this step (default: the latest)")
  p.add_argument("--ffn", choices=["relu_sparse", "relu_dense", "silu_dense"],
                 help="rebuild the FFN as this kind (same weights); for Hugging Face checkpoints "
                      "it overrides the gate activation of config.json's hidden_act")
  p.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"],
                 help="compute dtype (default: the run's; float32 for Hugging Face checkpoints)")
  p.add_argument("--tokenizer", help="'bytes' or a tokenizer.json (default: the checkpoint's)")
  p.add_argument("--allow-unknown-config", action="store_true",
                 help="Hugging Face checkpoints: ignore config.json fields the importer does not "
                      "know (default: refuse them)")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
  _checkpoint_arguments(p)
  p.add_argument("--out", help="report directory (default CHECKPOINT/eval for run directories, "
                               "runs/eval-NAME for Hugging Face checkpoints)")
  p.add_argument("--data", help="evaluate every document of these files/globs (or 'stdlib') "
                                "instead of the checkpoint's validation split")
  p.add_argument("--seq-len", type=int, help="tokens per evaluation window (default: the "
                                             "run's data.seq_len)")
  p.add_argument("--batch-size", type=int,
                 help="windows per batch (default: the run's own validation batch, "
                      "train.batch_size / train.grad_accum; 8 for Hugging Face checkpoints)")
  p.add_argument("--max-batches", type=int,
                 help="evaluate at most this many batches (default: the run's "
                      "train.eval_batches, so the numbers match its validation; 32 for Hugging "
                      "Face checkpoints)")
  p.add_argument("--tasks", nargs="+", default=[], metavar="[FORMAT:]FILE.jsonl",
                 help="zero-shot multiple-choice files in HellaSwag, ARC or PIQA shape")
  p.add_argument("--mc-batch-size", type=int, default=16, help="choices scored per batch")
  p.add_argument("--mc-max-len", type=int,
                 help="longest context + choice in tokens (default: --seq-len)")
  p.add_argument("--no-lm", action="store_true",
                 help="skip perplexity and sparsity (multiple choice only)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  h = p.add_argument_group("lm-evaluation-harness (pip install 'sparse-jax[harness]')")
  h.add_argument("--harness", metavar="TASKS",
                 help="run these comma-separated lm-eval tasks instead (with --include-path for "
                      "local task YAMLs); scores and FFN sparsity go to --out")
  h.add_argument("--include-path", help="directory of extra lm-eval task YAMLs")
  h.add_argument("--limit", type=int, help="lm-eval: at most this many examples per task")
  h.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples per prompt")
  h.add_argument("--mesh", help="lm-eval: split each batch over a device mesh, e.g. data:8")


def format_eval(r: dict) -> str:
  """The evaluation's headline numbers as a two-column table."""
  rows = [("checkpoint", f"{r['checkpoint']}: {r['model']['ffn']}, {r['params'] / 1e6:.2f}M "
                         "params")]
  lm = r.get("lm")
  if lm:
    layers = " ".join(f"{x['mean_active']:.1f}" for x in lm["layers"])
    by_pos = r["lm"]["by_position"]["mean_active"]
    rows += [
        ("tokens", f"{lm['tokens']:,} ({r['data']})"),
        ("loss", f"{lm['ce']:.4f} nats/token, perplexity {lm['ppl']:.3f}"),
        ("active neurons/token", f"{lm['mean_active']:.2f} of {lm['d_ff']} (per layer: "
                                 f"{layers})"),
        ("sparsity", f"{lm['sparsity_pct']:.2f}% of FFN activations are zero"),
        ("dead neurons", f"{lm['dead_pct']:.2f}% never fire on these tokens"),
        ("by position", f"first token {by_pos[0]:.1f}, last {by_pos[-1]:.1f} active "
                        "(mean over layers)"),
    ]
  for t in r["multiple_choice"]:
    err = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    rows.append((f"{t['task']} ({t['format']})",
                 f"acc {t['acc']:.3f} +- {err(t['acc_stderr'])}, acc_norm {t['acc_norm']:.3f} "
                 f"+- {err(t['acc_norm_stderr'])} (n={t['n']}, chance {t['chance']:.3f})"))
  rows += [("report", f"{r['report_md']} (+ .json, plots)"), ("wall time", f"{r['wall_s']:.1f} s")]
  return two_column_table(rows)


def _eval(args: argparse.Namespace) -> int:
  if args.harness:
    from sparse_jax.eval.harness import evaluate_harness
    print(evaluate_harness(
        args.checkpoint, args.harness.split(","), out=args.out, include_path=args.include_path,
        limit=args.limit, num_fewshot=args.num_fewshot, step=args.step, ffn=args.ffn,
        compute_dtype=args.compute_dtype or "float32", tokenizer=args.tokenizer,
        batch_size=args.mc_batch_size, max_length=args.mc_max_len, mesh=args.mesh,
        allow_unknown_config=args.allow_unknown_config))
    return 0
  from sparse_jax.eval import EvalOptions, evaluate_checkpoint
  report = evaluate_checkpoint(EvalOptions(
      checkpoint=args.checkpoint, out=args.out, step=args.step, data=args.data,
      seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.max_batches,
      lm=not args.no_lm, tasks=tuple(args.tasks), mc_batch_size=args.mc_batch_size,
      mc_max_len=args.mc_max_len, ffn=args.ffn, compute_dtype=args.compute_dtype,
      tokenizer=args.tokenizer, allow_unknown_config=args.allow_unknown_config,
      progress=not args.no_progress))
  print(format_eval(report))
  return 0


def _load(args: argparse.Namespace):
  from sparse_jax.checkpoints import load_model
  return load_model(args.checkpoint, step=args.step, ffn=args.ffn,
                    compute_dtype=args.compute_dtype, tokenizer=args.tokenizer,
                    allow_unknown_config=args.allow_unknown_config)


def _generate_arguments(p: argparse.ArgumentParser) -> None:
  _checkpoint_arguments(p)
  p.add_argument("--prompt", action="append", default=None,
                 help="text to continue (repeat for a batch of prompts of any lengths; "
                      "default: a new document)")
  p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                 help="new tokens to generate per sample (default 200)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
  p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
  p.add_argument("--num-samples", type=int, default=1, help="continuations of each prompt")
  p.add_argument("--no-stop", action="store_true",
                 help="keep generating past the end-of-document token")
  p.add_argument("--layers", choices=("unrolled", "scan"), default="unrolled",
                 help="unrolled (default: fastest steps) or one scanned block over stacked "
                      "weights (compiles faster for deep models; XLA copies each layer's weights "
                      "every step)")


def _generate(args: argparse.Namespace) -> int:
  from sparse_jax.nn.generate import check_sampling, generation_report, generate
  check_sampling(args.temperature, args.top_p, args.top_k)  # before the checkpoint is loaded
  if args.num_samples < 1:
    raise ValueError(f"--num-samples={args.num_samples}: must be a positive integer")
  from sparse_jax.eval.context import warn_past_context
  loaded = _load(args)
  tok = loaded.tokenizer
  texts = [t for t in (args.prompt or [""]) for _ in range(args.num_samples)]
  # A document starts after an end-of-document token: an empty prompt is that token alone.
  prompts = [list(tok.encode_batch([t])[0]) if t else [] for t in texts]
  prompts = [ids if len(ids) else [tok.eos_id] for ids in prompts]
  warn_past_context(max(len(ids) for ids in prompts) + args.max_new_tokens,
                    loaded.cfg.data.seq_len, "prompt + new tokens span")
  gen = generate(loaded.model, prompts, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                 seed=args.seed, eos_id=None if args.no_stop else tok.eos_id, n_ids=tok.vocab_size,
                 scan_layers=args.layers == "scan")
  for b, text in enumerate(texts):
    row = gen.row(b)
    ended = bool(gen.finished_B[b])
    print(f"--- sample {b} ({len(row)} tokens{', ended' if ended else ''}) ---")
    print(text + tok.decode(row[:-1] if ended else row))
  print(generation_report(gen, loaded.cfg.model.d_ff))
  return 0


def _export_arguments(p: argparse.ArgumentParser) -> None:
  _checkpoint_arguments(p)
  p.add_argument("--out", required=True, help="new directory for the Hugging Face checkpoint")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                 help="storage dtype of the weights (default float32)")
  p.add_argument("--max-shard-mb", type=float,
                 help="split the weights into shards of at most this size, with an index")


def _export_hf(args: argparse.Namespace) -> int:
  import os

  from sparse_jax import hf
  if os.path.exists(args.out):
    raise ValueError(f"--out {args.out} already exists; export into a new directory")
  loaded = _load(args)
  shard = None if args.max_shard_mb is None else int(args.max_shard_mb * 2 ** 20)
  files = hf.export_hf(loaded.model, args.out, tokenizer=loaded.cfg.data.tokenizer,
                       dtype=args.dtype, max_position_embeddings=loaded.context,
                       max_shard_bytes=shard, source=loaded.path if loaded.kind == "hf" else None)
  print(f"wrote {loaded.label} ({loaded.cfg.model.ffn}) to {args.out}: {', '.join(files)}")
  return 0


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True, help="a run directory or a Hugging Face "
                                                     "Llama-format directory (ReLU-gated FFN)")
  p.add_argument("--out", required=True, help="new directory for the prepared checkpoint "
                                              "(Hugging Face Llama format + sparse_inference.json)")
  p.add_argument("--data", help="calibration text: files/globs or 'stdlib' (default: the run's "
                                "validation split)")
  p.add_argument("--max-tokens", type=int, default=65536, help="calibration tokens (default 65536)")
  p.add_argument("--seq-len", type=int, help="tokens per window (default: the run's data.seq_len)")
  p.add_argument("--batch-size", type=int, default=8, help="windows per batch (default 8)")
  p.add_argument("--m", type=int, default=16384,
                 help="tokens per FFN call the split is planned for (default 16384)")
  p.add_argument("--step", type=int, help="run directories: this step (default: the latest)")
  p.add_argument("--tokenizer", help="'bytes' or a tokenizer.json (default: the checkpoint's)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                 help="storage dtype of the written weights (default float32)")
  p.add_argument("--allow-unknown-config", action="store_true",
                 help="Hugging Face checkpoints: ignore unknown config.json fields")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _prepare_inference(args: argparse.Namespace) -> int:
  from sparse_jax import inference
  summary = inference.prepare(
      args.checkpoint, out=args.out, data=args.data, max_tokens=args.max_tokens,
      seq_len=args.seq_len, batch_size=args.batch_size, step=args.step, tokenizer=args.tokenizer,
      m=args.m, dtype=args.dtype, allow_unknown_config=args.allow_unknown_config,
      progress=not args.no_progress)
  print(inference.format_summary(summary))
  return 0


def _prepare_data_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--data", required=True,
                 help="sources: files/globs/directories separated by commas (.txt/.md/... one "
                      "document per file, .jsonl per line, .parquet per row), stdlib, "
                      "stdlib-prose, or hf:NAME[:CONFIG] (with --max-docs)")
  p.add_argument("--tokenizer", default="bytes", help="'bytes' (default) or a tokenizer.json")
  p.add_argument("--out", required=True, help="directory of the shards (rerun to complete it)")
  p.add_argument("--workers", type=int, help="tokenizing processes (default: the CPU count)")
  p.add_argument("--shard-tokens", type=int, default=1 << 26,
                 help="about this many tokens per shard (default 2**26)")
  p.add_argument("--val-fraction", type=float, default=0.01,
                 help="share of each shard's tokens held out for validation (default 0.01)")
  p.add_argument("--text-field", default="text", help="JSONL/Parquet/HF text field")
  p.add_argument("--max-docs", type=int, help="use at most this many documents")
  p.add_argument("--hf-split", default="train", help="split of an hf: dataset")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _prepare_data(args: argparse.Namespace) -> int:
  from sparse_jax.data.prepare import PrepareOptions, prepare_data
  m = prepare_data(PrepareOptions(
      source=args.data, tokenizer=args.tokenizer, out=args.out, workers=args.workers,
      shard_tokens=args.shard_tokens, val_fraction=args.val_fraction,
      text_field=args.text_field, max_docs=args.max_docs, hf_split=args.hf_split),
      progress=not args.no_progress)
  print(two_column_table([
      ("prepared", f"{args.out} ({len(m['shards'])} shards, {m['skipped_shards']} found "
                   "complete)"),
      ("documents", f"{m['documents']:,}"),
      ("tokens", f"{m['train_tokens']:,} train + {m['val_tokens']:,} validation "
                 f"({m['dtype']}, tokenizer {m['tokenizer']['spec']})"),
      ("wall time", f"{m['prepare_s']:.1f} s"),
      ("train from it", f"sparse-jax train --data {args.out}"
                        + ("" if args.tokenizer == "bytes" else
                           f" --set data.tokenizer={args.tokenizer}")),
  ]))
  return 0


COMMANDS: dict[str, Command] = {
    "prepare-data": Command("tokenize a corpus once into token shards that train and eval read "
                            "(parallel, resumable)", _prepare_data_arguments, _prepare_data),
    "train": Command("train a sparse language model (resumes from its checkpoints)",
                     _train_arguments, _train),
    "eval": Command("evaluate a checkpoint: perplexity, sparsity analysis with plots, zero-shot "
                    "multiple choice", _eval_arguments, _eval),
    "generate": Command("generate text from a checkpoint (KV cache; ragged prompt batches; "
                        "greedy, temperature, top-k, top-p; tokens/s)",
                        _generate_arguments, _generate),
    "export-hf": Command("write a checkpoint as a Hugging Face Llama-format directory",
                         _export_arguments, _export_hf),
    "prepare-inference": Command("measure firing frequencies, split each FFN into dense hot and "
                                 "sparse cold neurons, save the permuted checkpoint (issue 14)",
                                 _prepare_arguments, _prepare_inference),
}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="sparse-jax", description=USAGE,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--debug", action="store_true", help="full tracebacks for input errors")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, cmd in COMMANDS.items():
    cmd.add_arguments(sub.add_parser(name, help=cmd.help, description=cmd.help))
  args = parser.parse_args(argv)
  try:
    return COMMANDS[args.command].run(args)
  except KeyboardInterrupt as e:
    print(f"sparse-jax {args.command}: {e or 'interrupted'}", file=sys.stderr)
    return 128 + getattr(e, "signum", signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM
  except (ValueError, FileNotFoundError, FileExistsError, ImportError, RunError) as e:
    if args.debug:
      raise
    print(f"sparse-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
