"""The training run: data, model, jitted steps, logging, evaluation, checkpoints, summary.

Output directory layout::

    OUT/config.json      the resolved config of the run
    OUT/metrics.jsonl    one record per log step ("split": "train") and per evaluation ("val")
    OUT/curves.png       loss and sparsity curves
    OUT/summary.json     the final summary (also returned by ``train``)
    OUT/checkpoints/     orbax steps: train state, data position, config

On several devices (``cfg.parallel``, ``sparse_jax.parallel``) the state is sharded over the mesh,
each global batch is split over the devices, and orbax saves and restores the sharded state (onto
whatever mesh the resuming run uses). With several hosts every process runs this same function on
a shared ``OUT``; process 0 writes the files above, process i > 0 its own copies under
``OUT/process_<i>/`` (checkpoints are shared: orbax coordinates the hosts).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import parallel, runlock
from sparse_jax.config import Config, DataConfig, TrainConfig
from sparse_jax.data import Batches, load_tokenizer, validation_batches
from sparse_jax.data.pipeline import load_splits, next_batch
from sparse_jax.nn import count_params
from sparse_jax.train import guard
from sparse_jax.train.checkpoint import Checkpointer
from sparse_jax.train.dispatch import Dispatcher, step_lowering
from sparse_jax.train.step import HOT_COLD_COUNTS
from sparse_jax.train.metrics import MetricsLog, plot_curves, read_records, to_python
from sparse_jax.train.resume import start_or_resume
from sparse_jax.train.step import init_state, step_functions
from sparse_jax.train.tracking import IntervalMean, ProgressBar, RunTracker, check_tracking

# Train settings that may change between a checkpoint and its resumption without changing what
# the run computes (budgets and cadences). Any other change is reported: exact resume needs none.
_RESUMABLE_TRAIN_CHANGES = {"max_minutes", "log_every", "eval_every", "eval_batches",
                            "ckpt_every", "keep_checkpoints", "nonfinite", "tensorboard",
                            "wandb", "wandb_project"}


@dataclasses.dataclass(frozen=True)
class RunPaths:
  """The files of a run directory (see the module docstring)."""
  out: str
  checkpoints: str
  metrics: str
  plot: str
  summary: str
  config: str

  @classmethod
  def of(cls, out: str, process: int = 0) -> "RunPaths":
    names = dict(metrics="metrics.jsonl", plot="curves.png", summary="summary.json",
                 config="config.json")
    own = out if process == 0 else os.path.join(out, f"process_{process}")
    return cls(out=out, checkpoints=os.path.join(out, "checkpoints"),
               **{k: os.path.join(own, v) for k, v in names.items()})


def resolve_config(cfg: Config):
  """(cfg with model.vocab_size fixed for its tokenizer, the tokenizer)."""
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  return dataclasses.replace(cfg, model=cfg.model.resolve_vocab(tokenizer.vocab_size)), tokenizer


def step_config(cfg: Config) -> Config:
  """``cfg`` reduced to what the compiled steps depend on (they take the config as a static
  argument): budgets, cadences, names and data settings do not change the step, so runs that differ
  only in those share one compilation. (The sequence length stays: the batch's shape is it.)"""
  train_cfg = dataclasses.replace(cfg.train, **{k: getattr(TrainConfig(), k)
                                                for k in _RESUMABLE_TRAIN_CHANGES})
  return Config(name="", model=cfg.model, data=DataConfig(seq_len=cfg.data.seq_len),
                train=train_cfg)


def _check_resumable(saved: dict, cfg: Config) -> None:
  saved = Config.from_dict(saved).to_dict()  # an older run's config in today's fields
  now = cfg.to_dict()
  for section in ("model", "data"):
    diff = {k: (saved[section].get(k), v) for k, v in now[section].items()
            if saved[section].get(k) != v}
    if diff:
      raise ValueError(f"the checkpoint was saved with other {section} settings "
                       f"(saved, now): {diff}; use another --out directory or --fresh")
  diff = {k: (saved["train"].get(k), v) for k, v in now["train"].items()
          if saved["train"].get(k) != v and k not in _RESUMABLE_TRAIN_CHANGES}
  if diff:
    print(f"warning: resuming with changed train settings (saved, now): {diff}; the run will "
          "not match an uninterrupted one")


def evaluate(params, graphdef, cfg: Config, batches: list[np.ndarray], *, mesh=None) -> dict:
  """Validation cross-entropy and FFN sparsity over ``batches`` (inference path, no gradient);
  on ``mesh`` (then ``graphdef`` and ``params`` must be ``init_state(cfg, mesh)``'s)."""
  eval_step = step_functions(graphdef, cfg, mesh)[1]
  sums = None
  for b in batches:
    m = eval_step(params, b)
    sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
  sums = jax.device_get(sums)
  n = len(batches)
  l0_L = sums["l0_L"] / n
  tokens = n * batches[0].shape[0] * (batches[0].shape[1] - 1)
  return dict(firing_LxF=sums["active_per_neuron_LxF"] / tokens,
      ce=float(sums["ce"] / n), ppl=float(np.exp(sums["ce"] / n)), l0_L=l0_L,
      l1_L=sums["l1_L"] / n, sparsity_pct=float(100 * (1 - l0_L.mean() / cfg.model.d_ff)),
      dead_on_val_L=np.mean(sums["active_per_neuron_LxF"] == 0, axis=1),
      overflow_rows=int(sums["overflow_rows_L"].sum()),
      dense_fallback=float(sums["dense_fallback_L"].mean() / n))


def _postfix(rec: dict, d_ff: int) -> dict:
  l0 = float(np.mean(rec["l0_L"]))
  return dict(loss=f"{rec['ce']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
              active=f"{l0:.1f}", sparse=f"{100 * (1 - l0 / d_ff):.1f}%")


def train(cfg: Config, out: str, *, resume: bool = True, fresh: bool = False,
          stop_at: int | None = None, progress: bool = True) -> dict:
  """Trains (or resumes) the run in ``out`` and returns its summary.

  resume: continue from the latest complete checkpoint in ``out`` if there is one (False: refuse
    to run over existing checkpoints).
  fresh: delete ``out``'s checkpoints first (a new run in the same directory).
  stop_at: stop at this step (saving a checkpoint) as if interrupted; a later call resumes.

  Process 0 holds ``out``'s lock (``sparse_jax.runlock``) for the whole run, so a second trainer
  on the same directory is refused. SIGTERM, SIGINT and SIGHUP stop the run at the next step
  boundary with a checkpoint saved and raise ``guard.StoppedBySignal`` (a ``KeyboardInterrupt``)
  with the resume message; a non-finite step raises ``guard.DivergenceError`` with
  ``train.nonfinite="stop"`` (the default) or is skipped and counted with ``"skip"``.
  """
  parallel.initialize_distributed(cfg.parallel)
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  lock = runlock.RunLock(out, say=say) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, guard.StopSignals(say=say) as signals:
    return _train_locked(cfg, out, resume=resume, fresh=fresh, stop_at=stop_at,
                         progress=progress, signals=signals, say=say)


def _train_locked(cfg: Config, out: str, *, resume: bool, fresh: bool, stop_at: int | None,
                  progress: bool, signals: guard.StopSignals, say) -> dict:
  t0 = time.perf_counter()
  paths = RunPaths.of(out, jax.process_index())
  progress = progress and jax.process_index() == 0
  cfg, tokenizer = resolve_config(cfg)
  check_tracking(cfg.train)
  tcfg, d_ff = cfg.train, cfg.model.d_ff
  micro = tcfg.batch_size // tcfg.grad_accum
  mesh = parallel.run_mesh(cfg.parallel)
  if mesh is not None:
    parallel.check_batch(micro, mesh)
  train_tokens, val_tokens = load_splits(cfg.data, tokenizer, progress=progress)
  graphdef, state = init_state(cfg, mesh)
  if fresh and os.path.isdir(paths.checkpoints) and jax.process_index() == 0:
    shutil.rmtree(paths.checkpoints)
  parallel.sync_hosts("fresh checkpoints directory")
  ckpt = Checkpointer(paths.checkpoints, keep=tcfg.keep_checkpoints)
  try:
    state, data_state, resumed_from = start_or_resume(
        ckpt, state, out, paths.metrics, resume=resume, fresh=fresh, say=say,
        check_config=lambda saved: _check_resumable(saved, cfg))
  except BaseException:
    ckpt.close()
    raise
  watch = guard.NonfiniteWatch(tcfg.nonfinite, say=say)
  batches = Batches(train_tokens, cfg.data.seq_len, tcfg.batch_size, cfg.data.seed,
                    state=data_state)
  val = validation_batches(val_tokens, cfg.data.seq_len, micro, tcfg.eval_batches)
  log = MetricsLog(paths.metrics, resume_step=resumed_from)
  tracker = RunTracker(cfg, paths.out, resume_step=resumed_from,
                       enabled=jax.process_index() == 0)
  compiled_cfg = step_config(cfg)
  # One compiled step per pattern of per-layer FFN modes (train.dispatch; sparse_jax.train.dispatch).
  train_step = Dispatcher(cfg, graphdef, state.params,
                          lambda gd: step_functions(gd, compiled_cfg, mesh)[0],
                          tokens_per_call=micro * cfg.data.seq_len // (mesh.size if mesh else 1),
                          tokens_per_step=tcfg.batch_size * cfg.data.seq_len,
                          lower=step_lowering(compiled_cfg, mesh)
                          if tcfg.dispatch_compile_ahead else None)
  if resumed_from is not None:
    train_step.load_state_dict(ckpt.read_host(resumed_from))
  with open(paths.config, "w") as f:
    json.dump(cfg.to_dict(), f, indent=2)

  def run_eval(step):
    rec = dict(split="val", step=step, **evaluate(state.params, graphdef, compiled_cfg, val,
                                                  mesh=mesh))
    firing_LxF = rec.pop("firing_LxF")  # per neuron: TensorBoard histograms, not the JSONL
    log.write(rec)
    tracker.write(rec, firing_LxF)
    return rec

  step = start_step = int(state.step)
  if resumed_from is None:
    run_eval(0)
  target = tcfg.steps if stop_at is None else min(stop_at, tcfg.steps)
  deadline = None if tcfg.max_minutes is None else time.perf_counter() + 60 * tcfg.max_minutes
  tokens_per_step = tcfg.batch_size * cfg.data.seq_len
  stop_reason = "steps" if step < target else "already done"
  last_val = None
  t_loop = last_t = time.perf_counter()
  last_step, steady = step, []  # (tokens, seconds) of log intervals after the first (compile)
  bar = ProgressBar(tcfg, step, desc=f"train {cfg.name}", disable=not progress)
  interval = IntervalMean()  # train metrics averaged over each log interval

  def save():
    watch.flush()  # a non-finite last step stops here with train.nonfinite=stop, unsaved
    bad = guard.nonfinite_leaves(state.params)
    if bad:
      raise guard.DivergenceError(f"step {step}: the weights {', '.join(bad[:3])} hold "
                                  "non-finite values; not saved over the finite checkpoints")
    ckpt.save(step, state, data_state, cfg.to_dict(), train_step.state_dict())

  diverged = False
  sharding = None if mesh is None else parallel.batch_sharding(mesh, 3, 1)

  def redo(state, batch, metrics, number):
    """(state, metrics) of a step whose 'redone' flag is read: a deferring layer that needed the
    dense backward left the state as it was, and the step is redone exactly
    (train.overflow_fallback=defer)."""
    if not bool(metrics["redone"]):
      return state, metrics
    state, metrics = train_step.exact_step(state, batch)
    if train_step.redone_steps == 1:
      say(f"step {number}: a layer's sparse backward overflowed its capacity; the step was "
          "redone on the exact path (train.overflow_fallback=defer; the log's 'redone' counts "
          "such steps)")
    return state, dict(metrics, redone=jnp.ones((), jnp.int32))

  def finish(metrics, data_after):
    """The host's part of a step done: log, dispatch decision, evaluation, checkpoint."""
    nonlocal step, data_state, last_t, last_step, last_val, state
    data_state = data_after
    # The per-neuron counts of train.hot_cold are for the dispatcher only, not for the log.
    step_metrics = metrics
    metrics = {k: v for k, v in metrics.items() if k != HOT_COLD_COUNTS}
    interval.add(metrics)
    step += 1
    bar.update(step)
    watch.after_step(step, metrics)
    # The dispatcher reads this step's own metrics (the log records hold interval averages).
    if step % tcfg.log_every == 0 or step == target:
      metrics = interval.take()
      now = time.perf_counter()
      dt, n_tok = now - last_t, (step - last_step) * tokens_per_step
      if last_step != start_step:
        steady.append((n_tok, dt))
      rec = dict(split="train", step=step, tokens=step * tokens_per_step,
                 tokens_per_s=n_tok / dt, elapsed_s=now - t_loop, ffn_modes=train_step.code(),
                 **metrics)
      log.write(rec)
      tracker.write(rec)
      bar.set_postfix(_postfix(rec, d_ff))
      last_t, last_step = time.perf_counter(), step
    train_step.after_step(step, step_metrics)
    state = train_step.refresh(state)  # train.hot_cold's neuron reorderings, if any
    if step % tcfg.eval_every == 0:
      last_val = run_eval(step)
    if step % tcfg.ckpt_every == 0:
      save()

  def light(n):
    """Whether step ``n`` (1-based) needs nothing of the host before step n + 1 runs: its flag
    can then be read once step n + 1 is queued (no dispatch decision, evaluation or checkpoint;
    a log record only reads the step's metrics, so it is written then)."""
    return (train_step.defers and n < target and not train_step.due(n)
            and all(n % every for every in (tcfg.eval_every, tcfg.ckpt_every)))

  # With deferring layers (train.overflow_fallback=defer) a step's 'redone' flag is read on the
  # host only once the next step is queued, so the device never idles on the read: the next step
  # gets the unread flag as its ``hold`` and keeps the state too if it is set, and the loop then
  # redoes the flagged step exactly and reruns the one after. ``lagged`` is such a step (its batch,
  # metrics and the data position after it). A step the host must finish first (not ``light``)
  # has its flag read at once, after the next batch is read ahead (``upcoming``). ``data_state`` is
  # the position after the last batch finished: what a checkpoint saves.
  data_state, upcoming, lagged = batches.state, None, None
  try:
    while step + (lagged is not None) < target:
      if signals.received is not None:
        stop_reason = f"signal {signals.name}"
        break
      if deadline is not None and time.perf_counter() > deadline:
        stop_reason = "time budget"
        break
      n = step + (lagged is not None) + 1  # steps done once this one is
      batch = next_batch(batches, tcfg.grad_accum, sharding) if upcoming is None else upcoming
      data_after, upcoming = batches.state, None
      state, metrics = train_step(state, batch, None if lagged is None else lagged[1]["redone"])
      done = []
      if lagged is not None:
        l_batch, l_metrics, l_data = lagged
        lagged = None
        if bool(l_metrics["redone"]):  # waits for the lagged step only: this one is queued
          # This step kept the state it got, the lagged step's input: redo that one, rerun this.
          state, l_metrics = redo(state, l_batch, l_metrics, n - 1)
          state, metrics = train_step(state, batch)
        done.append((l_metrics, l_data))
      if light(n):
        lagged = (batch, metrics, data_after)
      else:
        if train_step.defers:
          if n < target:  # read while the device runs this step, before its flag is read
            upcoming = next_batch(batches, tcfg.grad_accum, sharding)
          state, metrics = redo(state, batch, metrics, n)
        done.append((metrics, data_after))
      for metrics, data_after in done:
        finish(metrics, data_after)
    if lagged is not None:  # stopped early (signal, time budget) behind a lagged step
      (l_batch, l_metrics, l_data), lagged = lagged, None
      state, l_metrics = redo(state, l_batch, l_metrics, step + 1)
      finish(l_metrics, l_data)
    watch.flush()
  except guard.StopNow:
    raise
  except KeyboardInterrupt:
    stop_reason = "interrupted"
  except guard.DivergenceError:
    diverged = True
    raise
  finally:
    bar.close()
    if diverged:
      ckpt.close()  # an async save of earlier, finite steps completes; nothing new is saved
    tracker.flush()
  if stop_reason == "steps" and step < tcfg.steps:
    stop_reason = "stop_at"
  # However the loop ended, the state it reached is saved (unless that step already is). An
  # interrupt raised inside a step (not a signal: those stop between steps) can leave a state that
  # is not the one of the steps finished; it is then not saved.
  if (step > 0 and ckpt.latest_step() != step
      and (stop_reason != "interrupted" or _state_is_at(state, step))):
    save()
  saved = ckpt.latest_step()
  ckpt.close()
  if stop_reason == "interrupted" or signals.received is not None:
    tracker.close()  # the records so far stay in the event files / the W&B run
    where = (f"the checkpoint of step {saved} is saved in {paths.checkpoints}, rerun the same "
             "command to resume" if saved else "nothing was trained or saved yet")
    message = f"stopped by {signals.name or 'an interrupt'} at step {step}; {where}"
    if signals.received is not None:
      raise guard.StoppedBySignal(message, signals.received)
    raise KeyboardInterrupt(message)
  records = read_records(paths.metrics)
  if last_val is None or last_val["step"] != step:
    # A resumed run that was already finished has its final evaluation on record.
    done = [r for r in records if r["split"] == "val" and r["step"] == step]
    last_val = done[-1] if done else run_eval(step)
    records += [] if done else [to_python(last_val)]
  tracker.close()
  plot_curves(records, paths.plot, d_ff=d_ff, title=f"{cfg.name}: {cfg.model.ffn}, "
              f"L1 {tcfg.l1_coeff:g} ({tcfg.l1_norm})")
  summary = _summary(cfg, state, records, last_val, steady, paths, stop_reason,
                     time.perf_counter() - t0, mesh)
  summary["nonfinite_steps_skipped"] = watch.skipped
  summary["steps_redone_exactly"] = train_step.redone_steps  # train.overflow_fallback=defer
  with open(paths.summary, "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def _state_is_at(state, step: int) -> bool:
  """Whether ``state`` is readable and has taken ``step`` optimiser steps."""
  try:
    return int(jax.device_get(state.step)) == step
  except RuntimeError:  # its arrays were donated to a step that did not return
    return False


def _summary(cfg, state, records, last_val, steady, paths, stop_reason, wall_s, mesh) -> dict:
  train_recs = [r for r in records if r["split"] == "train"]
  val_recs = [r for r in records if r["split"] == "val"]
  tok, sec = (sum(x) for x in zip(*steady)) if steady else (0, 0.0)
  d_ff = cfg.model.d_ff
  return dict(
      config=cfg.name, ffn=cfg.model.ffn, params=count_params(state.params),
      devices=1 if mesh is None else mesh.size,
      mesh="single device" if mesh is None else parallel.describe(mesh),
      steps=int(state.step), target_steps=cfg.train.steps, stop_reason=stop_reason,
      tokens=int(state.step) * cfg.train.batch_size * cfg.data.seq_len,
      tokens_per_s=tok / sec if sec else None, wall_s=wall_s,
      l1_coeff=cfg.train.l1_coeff, l1_norm=cfg.train.l1_norm,
      train_ce_first=train_recs[0]["ce"] if train_recs else None,
      train_ce_last=train_recs[-1]["ce"] if train_recs else None,
      val_ce_initial=val_recs[0]["ce"] if val_recs and val_recs[0]["step"] == 0 else None,
      val_ce=last_val["ce"], val_ppl=last_val["ppl"],
      val_active_per_token_L=[float(x) for x in last_val["l0_L"]],
      val_active_per_token=float(np.mean(last_val["l0_L"])), d_ff=d_ff,
      val_sparsity_pct=last_val["sparsity_pct"],
      dead_on_val_pct=float(100 * np.mean(last_val["dead_on_val_L"])),
      dead_last_window_pct=(float(100 * np.mean(train_recs[-1]["dead_fraction_L"]))
                            if train_recs and min(train_recs[-1]["dead_fraction_L"]) >= 0
                            else None),
      val_overflow_rows=last_val["overflow_rows"], val_dense_fallback=last_val["dense_fallback"],
      checkpoint_dir=paths.checkpoints, plot=paths.plot, metrics=paths.metrics)
