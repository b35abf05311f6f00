"""Run tracking beside ``metrics.jsonl``: TensorBoard event files, optional Weights & Biases,
train metrics averaged over each log interval, and a progress bar that knows the time budget.

* ``IntervalMean``: sums each step's metrics on the device (one small jitted add per step,
  dispatched asynchronously: no host synchronisation between log steps) and returns the
  interval's averages at a log step. Per-step values are averaged over the steps not skipped as
  non-finite (``nonfinite`` counts those, train.nonfinite=skip); ``reinit_neurons`` is summed;
  ``lr``, ``l1_coeff`` and the tracker's state-like values (``l0_ema_L``, ``dead_fraction_L``) are
  the last step's. ``interval_steps`` says how many steps a record covers.
* ``RunTracker``: writes train and validation records as TensorBoard scalars (``train/ce``,
  ``train/lr``, ``train/tokens_per_s``, per-layer ``train/l0_L/layer_3`` active neurons per token,
  ``train/dead_fraction_L/layer_3`` dead neurons, ``val/...``) and, at every evaluation, a histogram
  per layer of the per-neuron firing frequency on the validation batches (``val/firing/layer_3``:
  the share of tokens each neuron fires on). Event files go into the run directory itself, so
  ``tensorboard --logdir RUN`` (or a parent of several runs) shows them. A resumed run writes a new
  event file whose first event purges the old file's records past the restored step. With
  ``train.wandb=true`` the same values go to Weights & Biases (imported only then; the run id is
  kept in ``RUN/wandb_id.txt`` so a resumed run continues the same W&B run).
* ``ProgressBar``: a tqdm bar over steps; under ``train.max_minutes`` its total is the number of
  steps the measured step rate reaches before the deadline (at most ``train.steps``), so its ETA
  is the time left whichever limit ends the run.
* ``read_events``: the scalars and histograms of a run's event files, read without TensorFlow.
"""
from __future__ import annotations

import glob
import math
import os
import secrets
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sparse_jax.config import TrainConfig

SUMMED = frozenset({"reinit_neurons", "nonfinite", "redone"})
LAST = frozenset({"lr", "l1_coeff", "l0_ema_L", "dead_fraction_L"})


def tensorboard_available() -> bool:
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    return False
  return True


def check_tracking(tcfg: TrainConfig) -> None:
  """Fails early (before any data is read) when W&B is asked for and cannot be used; says so when
  TensorBoard (on by default) cannot write (the run goes on: metrics.jsonl has every record)."""
  if tcfg.tensorboard and not tensorboard_available():
    print("warning: tensorboardX is not installed, so this run writes no TensorBoard event files "
          "(pip install tensorboardX, or set train.tensorboard=false to silence this)")
  if tcfg.wandb:
    try:
      import wandb  # noqa: F401
    except ImportError:
      raise ImportError("train.wandb=true (--wandb) needs the Weights & Biases client: pip "
                        "install wandb (and wandb login), or leave train.wandb=false") from None


@jax.jit
def _finite_part(metrics: dict) -> dict:
  """A step's metrics as summands: a step the guard flagged non-finite (``nonfinite``: its update
  was dropped, train.nonfinite=skip) adds zeros to the averaged values and 1 to ``nonfinite``, so
  one skipped step does not make the whole interval's averages NaN."""
  if "nonfinite" not in metrics:
    return metrics
  bad = metrics["nonfinite"]
  return {k: (bad.astype(jnp.int32) if k == "nonfinite" else
              v if k in LAST else jnp.where(bad, jnp.zeros_like(v), v)) for k, v in metrics.items()}


@jax.jit
def _add(sums: dict, metrics: dict) -> dict:
  return {k: metrics[k] if k in LAST else sums[k] + metrics[k] for k in metrics}


class IntervalMean:
  """Train metrics accumulated on the device over a log interval (module docstring)."""

  def __init__(self):
    self._sums, self.steps = None, 0

  def add(self, metrics: dict) -> None:
    metrics = _finite_part(metrics)
    self._sums = metrics if self._sums is None else _add(self._sums, metrics)
    self.steps += 1

  def take(self) -> dict:
    """The interval's averages as host values (this is the one host synchronisation), reset."""
    if self._sums is None:
      raise ValueError("no step was added since the last log record")
    sums, n = jax.device_get(self._sums), self.steps
    self._sums, self.steps = None, 0
    # Averages over the steps that counted: skipped non-finite steps are left out (an interval of
    # skipped steps only averages to NaN); ``nonfinite`` is how many were skipped.
    skipped = int(sums.get("nonfinite", 0))
    n_ok = n - skipped
    out = {k: v if k in LAST or k in SUMMED else
           np.asarray(v) / n_ok if n_ok else np.full_like(np.asarray(v, np.float64), np.nan)
           for k, v in sums.items()}
    return dict(out, interval_steps=n)


class ProgressBar:
  """Steps done of the steps reachable (module docstring)."""

  def __init__(self, tcfg: TrainConfig, start_step: int, *, desc: str, disable: bool):
    self.steps = tcfg.steps
    self.deadline = (None if tcfg.max_minutes is None
                     else time.perf_counter() + 60 * tcfg.max_minutes)
    self.bar = tqdm(total=tcfg.steps, initial=start_step, desc=desc, unit="step",
                    disable=disable, mininterval=1.0, dynamic_ncols=True)
    self._first: tuple[float, int] | None = None  # after the first (compiling) step

  def update(self, step: int) -> None:
    self.bar.update(1)
    if self.deadline is None:
      return
    now = time.perf_counter()
    if self._first is None:
      self._first = (now, step)
      return
    t0, s0 = self._first
    if now > t0 and step > s0:
      rate = (step - s0) / (now - t0)
      reachable = step + rate * max(0.0, self.deadline - now)
      self.bar.total = max(step, min(self.steps, int(math.ceil(reachable))))

  def set_postfix(self, postfix: dict) -> None:
    self.bar.set_postfix(postfix, refresh=False)

  def close(self) -> None:
    self.bar.close()


def _layer_values(name: str, value) -> list[tuple[str, float]]:
  a = np.asarray(value, np.float64)
  if a.ndim == 0:
    return [(name, float(a))]
  if a.ndim == 1 and name.endswith("_L"):
    if name == "dead_fraction_L" and a.min() < 0:  # no full window yet
      return []
    return ([(f"{name}/layer_{i}", float(x)) for i, x in enumerate(a)]
            + [(f"{name}/mean", float(a.mean()))])
  return []


def scalars(record: dict) -> dict[str, float]:
  """The TensorBoard scalars of a metrics record: ``SPLIT/NAME`` for numbers, and
  ``SPLIT/NAME/layer_i`` plus ``SPLIT/NAME/mean`` for per-layer vectors (``*_L``)."""
  split = record["split"]
  out = {}
  for k, v in record.items():
    if k in ("split", "step") or isinstance(v, str):
      continue
    for name, x in _layer_values(k, v):
      if math.isfinite(x):
        out[f"{split}/{name}"] = x
  return out


class RunTracker:
  """TensorBoard and W&B writers of one run directory (process 0 only; ``enabled=False`` writes
  nothing)."""

  def __init__(self, cfg, out: str, *, resume_step: int | None, enabled: bool = True):
    self._tb = self._wandb = None
    if not enabled:
      return
    tcfg = cfg.train
    if tcfg.wandb:
      import wandb
      id_path = os.path.join(out, "wandb_id.txt")
      if resume_step is not None and os.path.exists(id_path):
        with open(id_path) as f:
          run_id = f.read().strip()
      else:
        run_id = secrets.token_hex(4)
        with open(id_path, "w") as f:
          f.write(run_id)
      self._wandb = wandb.init(project=tcfg.wandb_project or "sparse-jax", name=cfg.name,
                               id=run_id, resume="allow", dir=out, config=cfg.to_dict())
    if tcfg.tensorboard and tensorboard_available():
      from tensorboardX import SummaryWriter
      # purge_step: TensorBoard drops the earlier files' events from this step on (written after
      # the checkpoint this run resumes from, and written again now).
      self._tb = SummaryWriter(out, purge_step=None if resume_step is None else resume_step + 1,
                               flush_secs=30)

  def write(self, record: dict, firing_LxF: np.ndarray | None = None) -> None:
    step = int(record["step"])
    values = scalars(record)
    if self._tb is not None:
      for tag, x in values.items():
        self._tb.add_scalar(tag, x, step)
    if firing_LxF is not None:
      firing = np.asarray(firing_LxF, np.float64)
      if self._tb is not None:
        for i, row in enumerate(firing):
          self._tb.add_histogram(f"{record['split']}/firing/layer_{i}", row, step)
      if self._wandb is not None:
        import wandb
        values = dict(values, **{f"{record['split']}/firing/layer_{i}": wandb.Histogram(row)
                                 for i, row in enumerate(firing)})
    if self._wandb is not None:
      self._wandb.log(values, step=step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


# --------------------------------------------------------------------------- reading events


def _records(path: str):
  """The payloads of a TFRecord file (length, masked CRC, data, masked CRC per record)."""
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (n,) = struct.unpack("<Q", header[:8])
      data = f.read(n)
      f.read(4)
      if len(data) < n:
        return  # a record cut short by a crash
      yield data


def read_events(logdir: str) -> dict:
  """{"scalars": {tag: [(step, value)]}, "histograms": {tag: [(step, count)]}} of every event
  file in ``logdir`` (in file order; a purge event drops earlier events at or past its step, as
  TensorBoard does)."""
  from tensorboardX.proto import event_pb2
  out = {"scalars": {}, "histograms": {}}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    for data in _records(path):
      ev = event_pb2.Event.FromString(data)
      if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
        for kind in out.values():
          for tag in kind:
            kind[tag] = [(s, v) for s, v in kind[tag] if s < ev.step]
      if not ev.HasField("summary"):
        continue
      for v in ev.summary.value:
        if v.HasField("histo"):
          out["histograms"].setdefault(v.tag, []).append((ev.step, v.histo.num))
        elif v.HasField("simple_value") or v.WhichOneof("value") == "simple_value":
          out["scalars"].setdefault(v.tag, []).append((ev.step, v.simple_value))
  return out
