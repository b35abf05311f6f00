"""Starting or resuming a run directory, and saying which.

* Checkpoints present: restore the newest step that reads back (``Checkpointer.restore_intact``:
  a damaged newer step is reported in one line and moved to ``OUT/damaged_checkpoints/``, never
  deleted), then "resumed from step N of OUT".
* No checkpoint: "starting a new run in OUT". If the directory already holds metrics of a run
  that stopped before its first checkpoint, they are kept under a new name (``metrics.1.jsonl``,
  ``metrics.2.jsonl``, ...) and the message says so, instead of being silently overwritten.
"""
from __future__ import annotations

import os

import jax

from sparse_jax import parallel
from sparse_jax.train.checkpoint import Checkpointer


def _last_step(metrics_path: str) -> int | None:
  from sparse_jax.train.metrics import read_records
  try:
    steps = [r.get("step", 0) for r in read_records(metrics_path)]
  except (OSError, ValueError):
    return None
  return max(steps) if steps else None


def keep_old_metrics(metrics_path: str) -> str | None:
  """Renames a non-empty ``metrics.jsonl`` to the first free ``metrics.<n>.jsonl``; returns the
  new path (None if there was nothing to keep)."""
  if not os.path.isfile(metrics_path) or os.path.getsize(metrics_path) == 0:
    return None
  stem, ext = os.path.splitext(metrics_path)
  n = 1
  while os.path.exists(f"{stem}.{n}{ext}"):
    n += 1
  os.rename(metrics_path, f"{stem}.{n}{ext}")
  return f"{stem}.{n}{ext}"


def start_or_resume(ckpt: Checkpointer, template, out: str, metrics_path: str, *, resume: bool,
                    fresh: bool = False, check_config, say=print):
  """(state, data_state, resumed_from step or None) for the run in ``out``.

  template: the fresh train state (the restore template, returned as is for a new run).
  check_config(saved_config): raises if the checkpoint cannot be resumed with this run's config.
  fresh: the caller deleted the checkpoints on request (--fresh): the run starts over and its
    metrics are rewritten.
  """
  steps = ckpt.all_steps()
  if steps and not resume:
    raise ValueError(f"{ckpt.directory} holds checkpoints up to step {max(steps)}; resume from "
                     "them, start over with --fresh, or use another --out")
  if fresh and not steps:
    say(f"starting a new run in {out} (--fresh: earlier checkpoints and metrics replaced)")
    return template, None, None
  if not steps:
    last = _last_step(metrics_path)
    kept = keep_old_metrics(metrics_path) if jax.process_index() == 0 else None
    if kept:
      say(f"no checkpoint in {out}: an earlier run there stopped before its first checkpoint "
          f"(its metrics reach step {last}); starting a new run in {out}, the earlier metrics are "
          f"kept in {kept}")
    else:
      say(f"starting a new run in {out}")
    return template, None, None

  def template_fn(saved_config):
    check_config(saved_config)
    return template

  state, data_state, _, step, damaged = ckpt.restore_intact(template_fn, say=say)
  if damaged:
    aside = os.path.join(os.path.dirname(ckpt.directory), "damaged_checkpoints")
    if jax.process_index() == 0:
      for d in damaged:
        say(f"moved the damaged step {d.step} to {ckpt.set_aside(d, aside)} (kept for "
            "inspection; the run will save that step again)")
    parallel.sync_hosts("damaged checkpoints set aside")
    ckpt.reload()
  say(f"resumed from step {step} of {out}")
  return state, data_state, step
