"""Fault injection on short CPU runs: stop signals at random points of training and of saving,
damaged checkpoints, non-finite steps, concurrent starts, bad data files, and the messages a user
sees. Each case ends with no lost or corrupted state and a clear message, and a resumed run stays
bit-identical to one that never stopped."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.cli import main
from sparse_jax.config import apply_overrides
from sparse_jax.train import Checkpointer, init_state, load_model, resolve_config, train
from test_checkpoint import assert_trees_identical
from test_train import fresh_seed, short_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small model and short sequences: these tests are about the run's machinery, not the model.
# Every run of the module shares one random seed and differs only in settings that do not change
# the compiled step (cadences, train.nonfinite), so the whole file compiles the model once.
SMALL = ["model.n_layers=1", "data.seq_len=32", "train.batch_size=8", "data.max_docs=120",
         "train.log_every=1", "train.eval_batches=1", "train.warmup_steps=2", "train.steps=8",
         "train.ckpt_every=2", "train.keep_checkpoints=10", "train.eval_every=4"]
SEED = fresh_seed()


def small_config(*overrides, seed=SEED):
  return short_run_config(*SMALL, *overrides, seed=seed)


def cli_overrides(cfg) -> list[str]:
  """--set arguments reproducing ``cfg`` (of the tiny preset) on the command line."""
  def flat(prefix, d):  # nested sections (model.sparse) as dotted paths
    for k, v in d.items():
      if isinstance(v, dict):
        yield from flat(f"{prefix}.{k}", v)
      elif k != "vocab_size":
        yield f"{prefix}.{k}={'none' if v is None else v}"
  d = cfg.to_dict()
  return [o for s in ("model", "data", "train") for o in flat(s, d[s])]


def ckpt_state(run: str, cfg, step=None):
  cfg_r, _ = resolve_config(cfg)
  ckpt = Checkpointer(os.path.join(run, "checkpoints"), keep=100)
  try:
    return ckpt.restore(init_state(cfg_r)[1], step)
  finally:
    ckpt.close()


def steps_of(run: str) -> list[int]:
  ckpt = Checkpointer(os.path.join(run, "checkpoints"), keep=100)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


# --------------------------------------------------------------------------- stop signals


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """An 8-step run with checkpoints at 2, 4, 6, 8, never stopped (shared; tests damage copies)."""
  cfg = small_config()
  out = str(tmp_path_factory.mktemp("finished") / "run")
  summary = train(cfg, out, progress=False)
  return cfg, out, summary


@pytest.mark.parametrize("where", ["step", "save"])
def test_signal_saves_and_resume_is_bit_identical(tmp_path, capsys, monkeypatch, where,
                                                  finished_run):
  """SIGTERM/SIGINT/SIGHUP at a random step, or in the middle of a random periodic save: the run
  stops at the step boundary with that step saved and says how to resume; the resumed run ends
  bit-identical to one that never stopped."""
  from sparse_jax.train import guard
  from sparse_jax.train.checkpoint import Checkpointer as Ckpt
  cfg, straight, _ = finished_run
  stopped = str(tmp_path / "stopped")
  sig = random.choice([signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
  at = random.choice([2, 4, 6]) if where == "save" else random.randint(1, 7)
  capsys.readouterr()
  print(f"signal {sig.name} at step {at} ({where})")
  if where == "step":
    real = guard.NonfiniteWatch.after_step

    def after_step(self, step, metrics):
      real(self, step, metrics)
      if step == at:
        os.kill(os.getpid(), sig)
    monkeypatch.setattr(guard.NonfiniteWatch, "after_step", after_step)
  else:
    real = Ckpt.save

    def save(self, step, *args):
      if step == at:  # the signal lands while orbax writes this step
        os.kill(os.getpid(), sig)
      real(self, step, *args)
    monkeypatch.setattr(Ckpt, "save", save)
  capsys.readouterr()
  with pytest.raises(guard.StoppedBySignal) as stop:
    train(cfg, stopped, progress=False)
  out = capsys.readouterr().out
  assert f"starting a new run in {stopped}" in out
  assert f"received {sig.name}: saving a checkpoint" in out
  assert str(stop.value) == (f"stopped by {sig.name} at step {at}; the checkpoint of step {at} "
                             f"is saved in {os.path.join(stopped, 'checkpoints')}, rerun the "
                             "same command to resume")
  assert stop.value.signum == sig and max(steps_of(stopped)) == at
  monkeypatch.undo()
  train(cfg, stopped, progress=False)
  assert f"resumed from step {at} of {stopped}" in capsys.readouterr().out
  sa, da, _, _ = ckpt_state(straight, cfg)
  sb, db, _, _ = ckpt_state(stopped, cfg)
  assert_trees_identical(sa, sb)
  assert da == db


def test_sigterm_to_the_cli_saves_and_exits(tmp_path):
  """A real SIGTERM (what `timeout`, schedulers and container stops send) to `sparse-jax train`
  at a random point of its training: exit status 128 + 15 after saving, the resume message on
  stderr, the checkpoint of that step readable. (Bit-identical resumption after a signal is the
  in-process test above; a dense FFN keeps this process's compilation short.)"""
  cfg = small_config("train.steps=400", "train.ckpt_every=1000", "train.eval_every=1000",
                     "model.ffn=relu_dense")
  out = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "sparse_jax.cli", "train", "--no-progress", "--out", out,
         "--stop-at", "200", "--set", *cli_overrides(cfg)]
  # One device (not the tests' eight simulated ones): a shorter start-up for the subprocess.
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS="")
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  at = random.randint(1, 40)
  metrics = os.path.join(out, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and sum(1 for ln in open(metrics) if '"train"' in ln) >= at:
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=240)
  assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
  n = max(steps_of(out))
  assert n >= at
  assert (f"stopped by SIGTERM at step {n}; the checkpoint of step {n} is saved in "
          f"{os.path.join(out, 'checkpoints')}, rerun the same command to resume") in stderr
  assert "Traceback" not in stderr
  assert int(ckpt_state(out, cfg)[0].step) == n


# --------------------------------------------------------------------------- run-directory lock


_HOLD_LOCK = """
import sys, time
from sparse_jax.runlock import RunLock
with RunLock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(600)
"""


def test_second_trainer_is_refused_and_stale_lock_recovered(tmp_path, capsys):
  cfg = small_config()
  out = str(tmp_path / "run")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, out], stdout=subprocess.PIPE,
                            text=True, env=env)
  try:
    assert holder.stdout.readline().strip() == "locked"
    code = main(["train", "--no-progress", "--out", out, "--set", *cli_overrides(cfg)])
    err = capsys.readouterr().err
    assert code == 2
    assert (f"sparse-jax train: error: run directory {out} is in use by another trainer (pid "
            f"{holder.pid} on host ") in err
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # nothing touched
  finally:
    holder.kill()  # SIGKILL: the lock file stays, its flock dies with the process
    holder.wait()
  summary = train(cfg, out, progress=False)
  assert summary["steps"] == 8
  assert (f"note: recovered a stale lock of {out} (left by pid {holder.pid} on host"
          in capsys.readouterr().out)
  # A lock file written on another machine whose holder is gone is recovered the same way.
  with open(os.path.join(out, ".lock"), "w") as f:
    json.dump({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00+00:00"}, f)
  train(cfg, out, progress=False)  # (the run is complete: this only resumes and reports)
  assert "left by pid 1 on host elsewhere" in capsys.readouterr().out


# --------------------------------------------------------------------------- damaged checkpoints


def _damage(run: str, step: int, how: str) -> str:
  """Truncates or removes a random array data file of the step; returns its path in the step."""
  step_dir = os.path.join(run, "checkpoints", str(step))
  data = [os.path.relpath(os.path.join(d, f), step_dir) for d, _, fs in os.walk(step_dir)
          for f in fs if os.path.basename(d) == "d"]
  victim = random.choice(sorted(data))
  full = os.path.join(step_dir, victim)
  if how == "unrecorded":  # a step saved before size records: found when its arrays are read
    os.remove(os.path.join(step_dir, "file_sizes.json"))
    for f in data:
      with open(os.path.join(step_dir, f), "r+b") as fh:
        fh.truncate(os.path.getsize(os.path.join(step_dir, f)) // 3)
  elif how == "truncated":
    with open(full, "r+b") as f:
      f.truncate(os.path.getsize(full) // 3)
  else:
    os.remove(full)
  return victim


@pytest.mark.parametrize("how", ["truncated", "missing", "unrecorded"])
def test_damaged_latest_checkpoint_falls_back(tmp_path, capsys, finished_run, how):
  cfg, good, _ = finished_run
  run = str(tmp_path / "run")
  shutil.copytree(good, run)
  victim = _damage(run, 8, how)
  print(f"{how}: {victim}")
  capsys.readouterr()
  model, _, step = load_model(run)  # what eval and generate load
  out = capsys.readouterr().out.strip().splitlines()
  assert step == 6
  assert len(out) == 2, out
  what = {"missing": f"file {victim} is missing", "truncated": f"file {victim} has ",
          "unrecorded": ""}[how]
  assert out[0].startswith(f"warning: checkpoint step 8 ({os.path.join(run, 'checkpoints', '8')})"
                           f" is damaged: {what}")
  if how == "unrecorded":
    assert re.search(r"damaged: .* cannot be read \(\w+: .*\)$", out[0]), out[0]
  assert out[1] == "falling back to checkpoint step 6, the newest complete one (nothing was " \
                   "deleted)"
  with pytest.raises(ValueError, match=rf"^checkpoint step 8 \(.*\) is damaged: "
                     rf"(file {victim} (is missing|has \d+ of its \d+ bytes)|.* cannot be read)"):
    load_model(run, step=8)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 999 under .* \(steps saved: "
                                              r"2, 4, 6, 8\)"):
    load_model(run, step=999)
  assert os.path.exists(os.path.join(run, "checkpoints", "8"))  # eval moves nothing
  # Training resumes from step 6, keeps the damaged step aside, and ends where the undamaged run
  # ended, bit for bit.
  train(cfg, run, progress=False)
  out = capsys.readouterr().out
  assert f"resumed from step 6 of {run}" in out
  aside = os.listdir(os.path.join(run, "damaged_checkpoints"))
  assert len(aside) == 1 and aside[0].startswith("8-")
  assert f"moved the damaged step 8 to {os.path.join(run, 'damaged_checkpoints', aside[0])}" in out
  assert_trees_identical(ckpt_state(good, cfg)[0], ckpt_state(run, cfg)[0])


def test_step_that_does_not_exist_lists_the_steps(finished_run, capsys):
  _, run, _ = finished_run
  code = main(["generate", "--checkpoint", run, "--step", "999", "--max-new-tokens", "1"])
  assert code == 2
  assert capsys.readouterr().err.strip() == (
      f"sparse-jax generate: error: no checkpoint of step 999 under "
      f"{os.path.abspath(os.path.join(run, 'checkpoints'))} (steps saved: 2, 4, 6, 8)")


# --------------------------------------------------------------------------- non-finite steps

POISON = 10 ** 6  # a target id past the vocabulary: its cross-entropy is NaN (a NaN loss)


def _poison(monkeypatch, at_call: int):
  """The at_call-th training batch carries POISON: a NaN loss inside the compiled step, as a
  diverging run produces, without compiling anything new."""
  from sparse_jax.data import dataset
  real_next, calls = dataset.Batches.next, [0]

  def next_batch(self):
    b = real_next(self)
    calls[0] += 1
    if calls[0] == at_call:
      b = b.copy()
      b[0, 5] = POISON
    return b
  monkeypatch.setattr(dataset.Batches, "next", next_batch)


def test_nonfinite_step_stops_without_saving_it(tmp_path, monkeypatch, capsys, finished_run):
  """train.nonfinite=stop (the default): a NaN loss at a random step stops the run with a clear
  error; no checkpoint at or after that step, every saved one finite; rerun (the fault gone), it
  resumes from the last finite checkpoint and ends bit-identical to a run that never diverged."""
  from sparse_jax.train import guard
  cfg, straight, _ = finished_run
  bad = random.randint(3, 8)
  _poison(monkeypatch, bad)
  run = str(tmp_path / "run")
  with pytest.raises(guard.DivergenceError, match=rf"^training diverged: step {bad} has a "
                     r"non-finite loss or gradient \(loss nan, .*train.nonfinite=skip"):
    train(cfg, run, progress=False)
  saved = steps_of(run)
  assert saved == [s for s in (2, 4, 6, 8) if s < bad]
  for s in saved:
    assert not guard.nonfinite_leaves(ckpt_state(run, cfg, s)[0])
  # The command line says it in one line, exit status 2.
  _poison(monkeypatch, bad)
  code = main(["train", "--no-progress", "--out", str(tmp_path / "cli"), "--set",
               *cli_overrides(cfg)])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith(f"sparse-jax train: error: training diverged: step {bad}")
  assert len(err.strip().splitlines()) == 1
  monkeypatch.undo()
  train(cfg, run, progress=False)
  assert f"resumed from step {saved[-1]} of {run}" in capsys.readouterr().out
  assert_trees_identical(ckpt_state(straight, cfg)[0], ckpt_state(run, cfg)[0])


def test_nonfinite_step_skipped_and_counted(tmp_path, monkeypatch, capsys):
  from sparse_jax.train import guard
  cfg = small_config("train.nonfinite=skip")
  bad = random.randint(1, 8)
  _poison(monkeypatch, bad)
  run = str(tmp_path / "run")
  summary = train(cfg, run, progress=False)
  assert summary["nonfinite_steps_skipped"] == [bad] and summary["steps"] == 8
  assert f"warning: step {bad} skipped: non-finite loss or gradient (loss nan" in \
      capsys.readouterr().out
  state = ckpt_state(run, cfg)[0]
  assert not guard.nonfinite_leaves(state)


def test_export_refuses_nonfinite_weights(tmp_path, key):
  from flax import nnx

  from sparse_jax import hf
  from sparse_jax.nn import Transformer
  cfg, _ = resolve_config(small_config())
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  w = model.blocks[0].ffn.w_up_FxD
  w.value = w.value.at[3, 4].set(jnp.inf)
  with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight holds non-finite "
                                       r"values \(1 of"):
    hf.export_hf(model, str(tmp_path / "hf"))
  assert not os.path.exists(tmp_path / "hf") and os.listdir(tmp_path) == []


def test_export_permissions_follow_umask(tmp_path, finished_run):
  _, run, _ = finished_run
  out = str(tmp_path / "hf")
  old = os.umask(0o022)
  try:
    assert main(["export-hf", "--checkpoint", run, "--out", out]) == 0
  finally:
    os.umask(old)
  assert os.stat(out).st_mode & 0o777 == 0o755
  for f in os.listdir(out):
    assert os.stat(os.path.join(out, f)).st_mode & 0o777 == 0o644, f


# --------------------------------------------------------------------------- bad input


def test_bad_data_files_refused_or_skipped(tmp_path, capsys):
  from sparse_jax.data.sources import iter_documents
  good = tmp_path / "good.txt"
  good.write_text("plain text, ünïcode fine\n")
  png = tmp_path / "image.png"
  # Random bytes without NUL: a NUL byte is the binary-file check, tested below.
  png.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64).replace(b"\0", b"\1"))
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("caf\u00e9 au lait".encode("latin-1"))
  data = lambda src, **kw: apply_overrides(small_config(), [f"data.source={src}"] + [
      f"data.{k}={v}" for k, v in kw.items()]).data
  with pytest.raises(ValueError, match=rf"^data file {png} is not UTF-8 text \(byte 0x89 at "
                                       "offset 0\\)"):
    list(iter_documents(data(f"{good},{png}")))
  with pytest.raises(ValueError, match=rf"^data file {latin} is not UTF-8 text \(byte 0xe9 at "
                                       "offset 3\\)"):
    list(iter_documents(data(str(latin))))
  binary = tmp_path / "zeros.txt"
  binary.write_bytes(b"abc\0def")
  with pytest.raises(ValueError, match=rf"^data file {binary} is binary, not text"):
    list(iter_documents(data(str(binary))))
  docs = list(iter_documents(data(f"{good},{png},{latin}", bad_files="skip")))
  assert docs == ["plain text, ünïcode fine\n"]
  assert (f"warning: data.bad_files=skip: left out 2 of 3 files that are not UTF-8 text: {png}, "
          f"{latin}") in capsys.readouterr().err
  jl = tmp_path / "docs.jsonl"
  jl.write_text('{"text": "fine"}\n{"text": 123}\n')
  with pytest.raises(ValueError, match=rf"^{jl}:2: field 'text' is int '123', not a string"):
    list(iter_documents(data(str(jl))))
  jl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=rf"^data file {jl}, line 2, is not UTF-8 text"):
    list(iter_documents(data(str(jl))))
  # Through the CLI: one line naming the file, exit status 2, nothing trained.
  code = main(["train", "--no-progress", "--out", str(tmp_path / "run"), "--data", str(png)])
  err = capsys.readouterr().err
  assert code == 2 and err.strip() == (f"sparse-jax train: error: data file {png} is not UTF-8 "
                                       "text (byte 0x89 at offset 0); convert it to UTF-8, leave "
                                       "it out or set data.bad_files=skip")


def test_killed_before_first_checkpoint_keeps_old_metrics(tmp_path, capsys):
  cfg = small_config()
  run = tmp_path / "run"
  run.mkdir()
  old = '{"split": "val", "step": 0, "ce": 6.0}\n{"split": "train", "step": 1, "ce": 5.9}\n'
  (run / "metrics.jsonl").write_text(old)  # what a run SIGKILLed at step 1 leaves behind
  train(cfg, str(run), progress=False)
  out = capsys.readouterr().out
  assert (f"no checkpoint in {run}: an earlier run there stopped before its first checkpoint (its "
          f"metrics reach step 1); starting a new run in {run}, the earlier metrics are kept in "
          f"{run / 'metrics.1.jsonl'}") in out
  assert (run / "metrics.1.jsonl").read_text() == old


# --------------------------------------------------------------------------- usability


def test_eval_defaults_reproduce_the_runs_validation(finished_run, tmp_path):
  from sparse_jax.eval import EvalOptions, evaluate_checkpoint
  _, run, summary = finished_run
  report = evaluate_checkpoint(EvalOptions(checkpoint=run, out=str(tmp_path / "eval"),
                                           progress=False))
  np.testing.assert_allclose(report["lm"]["ce"], summary["val_ce"], rtol=1e-5)


def test_past_trained_context_warns(finished_run, capsys):
  from sparse_jax.eval.context import warn_past_context
  warn_past_context(40, 32, "generation spans")
  assert capsys.readouterr().err.strip() == (
      "warning: generation spans 40 tokens, past the 32-token context the model was trained "
      "on (data.seq_len); quality degrades beyond it")
  warn_past_context(32, 32, "generation spans")
  assert capsys.readouterr().err == ""
  _, run, _ = finished_run
  # eval: the warning comes before any work (here a missing task file stops it right after).
  assert main(["eval", "--checkpoint", run, "--seq-len", "64", "--tasks", "missing.jsonl"]) == 2
  assert capsys.readouterr().err.startswith(
      "warning: evaluation windows span 64 tokens, past the 32-token context the model was "
      "trained on (data.seq_len); quality degrades beyond it\nwarning: multiple-choice contexts "
      "+ choices span up to 64 tokens")
  assert main(["generate", "--checkpoint", run, "--prompt", "def f(x):", "--max-new-tokens",
               "30"]) == 0
  assert "warning: prompt + new tokens span 39 tokens, past the 32-token context" in \
      capsys.readouterr().err
  # A ragged batch of prompts: the longest one sets the span.
  assert main(["generate", "--checkpoint", run, "--prompt", "a", "--prompt", "def f(x):",
               "--max-new-tokens", "30"]) == 0
  assert "warning: prompt + new tokens span 39 tokens, past the 32-token context" in \
      capsys.readouterr().err


def test_help_texts_are_clean(capsys):
  with pytest.raises(SystemExit):
    main(["--help"])
  text = capsys.readouterr().out
  assert "COMMANDS" not in text and "register" not in text
  with pytest.raises(SystemExit):
    main(["generate", "--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert "--max-new-tokens N new tokens to generate per sample (default 200)" in text


def test_readme_commands_work_from_the_repo_root(tmp_path):
  """`python3 experiments/train.py` runs this checkout's package with no PYTHONPATH, and the
  `./sparse-jax` wrapper runs the command without an activated venv (here: the python3 on PATH,
  as in a checkout whose .venv is elsewhere; with a .venv it takes that one)."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  for cmd in ([sys.executable, "experiments/train.py", "--help"],
              [os.path.join(ROOT, "sparse-jax"), "train", "--help"]):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--max-minutes" in proc.stdout, proc.stderr


def test_main_sh_resumes_and_its_result_does_not_depend_on_speed():
  """scripts/main.sh never deletes the previous run (no --fresh: rerunning resumes), and its
  learning-rate schedule is set by a step count, with a time budget that is only a generous cap
  (1600 steps take ~2.5 minutes on a quiet 2-core CPU)."""
  text = open(os.path.join(ROOT, "scripts", "main.sh")).read()
  command = text[text.index("exec "):]
  assert "--fresh" not in command
  steps = int(re.search(r"--steps (\d+)", command).group(1))
  minutes = float(re.search(r"--max-minutes (\S+)", command).group(1))
  assert steps == 1600 and minutes >= 5 * 2.5
