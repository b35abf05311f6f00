"""Metrics: one JSON object per line (train and validation records), and their plot."""
from __future__ import annotations

import json
import math
import os

import numpy as np


def to_python(tree):
  """Arrays and numpy scalars -> floats/ints/lists, so records serialise as plain JSON."""
  if isinstance(tree, dict):
    return {k: to_python(v) for k, v in tree.items()}
  a = np.asarray(tree)
  if a.ndim == 0:
    v = a.item()
    return None if isinstance(v, float) and not math.isfinite(v) else v
  return a.tolist()


class MetricsLog:
  """Appends records to ``path``; on resume drops records past the restored step (they were
  written after the checkpoint the run continues from, and will be written again)."""

  def __init__(self, path: str, resume_step: int | None = None):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if resume_step is None:
      open(path, "w").close()
    elif os.path.exists(path):
      kept = [r for r in read_records(path) if r.get("step", 0) <= resume_step]
      with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)

  def write(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(to_python(record)) + "\n")


def read_records(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list[dict], path: str, *, d_ff: int, title: str = "") -> None:
  """Loss (train cross-entropy, validation) and sparsity (active neurons per token, % sparse)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [r for r in records if r.get("split") == "train"]
  val = [r for r in records if r.get("split") == "val"]
  fig, (ax_loss, ax_l0, ax_sp) = plt.subplots(1, 3, figsize=(15, 4))
  if train:
    ax_loss.plot([r["step"] for r in train], [r["ce"] for r in train], label="train")
  if val:
    ax_loss.plot([r["step"] for r in val], [r["ce"] for r in val], "o-", label="validation")
  ax_loss.set_ylabel("cross-entropy (nats/token)")
  ax_loss.set_title("loss")
  if train:
    steps = [r["step"] for r in train]
    l0 = np.asarray([r["l0_L"] for r in train])  # [records, layers]
    if l0.shape[1] <= 8:
      for layer in range(l0.shape[1]):
        ax_l0.plot(steps, l0[:, layer], lw=0.8, alpha=0.7, label=f"layer {layer}")
    ax_l0.plot(steps, l0.mean(axis=1), "k", lw=2, label="mean")
    ax_l0.set_yscale("log")
    ax_sp.plot(steps, 100 * (1 - l0.mean(axis=1) / d_ff), label="sparsity (train)")
    dead = [(r["step"], 100 * np.mean(r["dead_fraction_L"])) for r in train
            if min(r["dead_fraction_L"]) >= 0]
    if dead:
      ax_sp.plot(*zip(*dead), "--", label="dead neurons (last window)")
  if val:
    ax_sp.plot([r["step"] for r in val], [r["sparsity_pct"] for r in val], "o",
               label="sparsity (validation)")
  ax_l0.set_ylabel(f"active FFN neurons per token (of {d_ff})")
  ax_l0.set_title("active neurons")
  ax_sp.set_ylabel("%")
  ax_sp.set_ylim(0, 100)
  ax_sp.set_title("sparsity and dead neurons")
  for ax in (ax_loss, ax_l0, ax_sp):
    ax.set_xlabel("step")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
      ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
