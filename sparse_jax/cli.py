"""The ``sparse-jax`` command: ``sparse-jax train ...`` (more subcommands register in COMMANDS).

    sparse-jax train --config tiny --max-minutes 3 --out runs/tiny
    sparse-jax train --config small --set model.n_layers=4 train.lr=3e-4 data.source='shards/*.parquet'
    sparse-jax train --config tiny --print-config

A subcommand is ``COMMANDS[name] = Command(help, add_arguments(parser), run(args) -> int)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Callable

from sparse_jax.config import PRESETS, Config, apply_overrides, get_config


@dataclasses.dataclass(frozen=True)
class Command:
  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace], int]


def add_config_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default="tiny", choices=list(PRESETS), help="preset (default tiny)")
  p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                 metavar="SECTION.FIELD=VALUE",
                 help="override config fields, e.g. model.n_layers=4 train.lr=3e-4")
  p.add_argument("--print-config", action="store_true", help="print the config and exit")


def config_from_args(args: argparse.Namespace, shortcuts: dict[str, object]) -> Config:
  """The preset with ``shortcuts`` ({"train.steps": 100}, None = not given) and --set applied
  (--set last, so it wins)."""
  given = [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
  return apply_overrides(get_config(args.config), given + list(args.overrides))


def _train_arguments(p: argparse.ArgumentParser) -> None:
  add_config_arguments(p)
  p.add_argument("--steps", type=int, help="train.steps: optimiser steps (the LR schedule's end)")
  p.add_argument("--max-minutes", type=float, help="train.max_minutes: wall-time budget")
  p.add_argument("--data", help="data.source: stdlib, files/globs, or hf:NAME[:CONFIG]")
  p.add_argument("--out", help="run directory (default runs/<config>)")
  p.add_argument("--fresh", action="store_true", help="delete the run's checkpoints first")
  p.add_argument("--no-resume", action="store_true",
                 help="fail instead of resuming if the run directory has checkpoints")
  p.add_argument("--stop-at", type=int, help="stop (and save) at this step; resume later")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")


def format_summary(s: dict) -> str:
  """The run summary as a two-column table."""
  def f(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)
  layers = " ".join(f"{x:.1f}" for x in s["val_active_per_token_L"])
  rows = [
      ("config", f"{s['config']} ({s['ffn']}, {s['params'] / 1e6:.2f}M params)"),
      ("steps", f"{s['steps']} of {s['target_steps']} (stopped by: {s['stop_reason']})"),
      ("tokens seen", f"{s['tokens']:,}"),
      ("throughput", f"{f(s['tokens_per_s'], '{:,.0f}')} tokens/s (after compilation)"),
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
  w = max(len(k) for k, _ in rows)
  line = "-" * (w + 3 + max(len(v) for _, v in rows))
  return "\n".join([line] + [f"{k:<{w}} | {v}" for k, v in rows] + [line])


def _train(args: argparse.Namespace) -> int:
  cfg = config_from_args(args, {"train.steps": args.steps, "train.max_minutes": args.max_minutes,
                                "data.source": args.data})
  if args.print_config:
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0
  from sparse_jax.train import train  # imports JAX: keep --help and config errors fast
  summary = train(cfg, args.out or f"runs/{cfg.name}", resume=not args.no_resume,
                  fresh=args.fresh, stop_at=args.stop_at, progress=not args.no_progress)
  print(format_summary(summary))
  return 0


COMMANDS: dict[str, Command] = {
    "train": Command("train a sparse language model (resumes from its checkpoints)",
                     _train_arguments, _train),
}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="sparse-jax", description=__doc__,
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
    return 130
  except (ValueError, FileNotFoundError, ImportError) as e:
    if args.debug:
      raise
    print(f"sparse-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
