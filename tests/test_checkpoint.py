"""Checkpoints: round trip, keep-N, exact resume of a stopped run, interrupted saves."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from sparse_jax.config import apply_overrides
from sparse_jax.train import Checkpointer, init_state, load_model, resolve_config, train
from sparse_jax.train.checkpoint import flatten_state
from test_train import fresh_seed, short_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_trees_identical(a, b):
  fa, _ = flatten_state(a)
  fb, _ = flatten_state(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def randomise(tree, key):
  """Every leaf replaced by random values of its shape and dtype (floats, ints, bools)."""
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for i, leaf in enumerate(leaves):
    k = jax.random.fold_in(key, i)
    if leaf.dtype == bool:
      out.append(jax.random.bernoulli(k, 0.5, leaf.shape))
    elif jax.numpy.issubdtype(leaf.dtype, jax.numpy.integer):
      out.append(jax.random.randint(k, leaf.shape, 0, 1000).astype(leaf.dtype))
    else:
      out.append(jax.random.normal(k, leaf.shape, leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def test_round_trip(tmp_path, key):
  cfg, _ = resolve_config(short_run_config(seed=fresh_seed()))
  state = randomise(init_state(cfg)[1], key)
  ckpt = Checkpointer(str(tmp_path), keep=2)
  data_state = {"epoch": 1, "index": 7, "n_examples": 99, "seq_len": 16, "seed": 3}
  ckpt.save(12, state, data_state, cfg.to_dict())
  ckpt.close()
  restored, data, config, step = Checkpointer(str(tmp_path), keep=2).restore(init_state(cfg)[1])
  assert step == 12 and data == data_state and config == json.loads(json.dumps(cfg.to_dict()))
  assert_trees_identical(restored, state)


def test_stopped_and_resumed_run_is_identical(tmp_path):
  """A run stopped at step 4 and resumed ends bit-identical to one that never stopped.

  Covers params, AdamW moments, step, the data position, the sparsity tracker and the RNG
  (dead-neuron re-initialisation every 3 steps draws from it), and gradient accumulation.
  """
  cfg = short_run_config("train.steps=8", "train.ckpt_every=3", "train.keep_checkpoints=2",
                         "train.grad_accum=2", "train.reinit_dead=true", "train.dead_window=3",
                         "train.log_every=1", "train.warmup_steps=0", "train.lr=3e-2",
                         # A harsh penalty kills neurons within a window, so re-initialisation
                         # (and its RNG) really runs before and after the stop.
                         "train.l1_coeff=0.5", seed=fresh_seed())
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  a = train(cfg, straight, progress=False)
  b1 = train(cfg, stopped, stop_at=4, progress=False)
  assert b1["steps"] == 4 and b1["stop_reason"] == "stop_at"
  assert Checkpointer(os.path.join(stopped, "checkpoints"), keep=2).latest_step() == 4
  b = train(cfg, stopped, progress=False)
  assert a["steps"] == b["steps"] == 8
  # keep-N: periodic saves at 3 and 6 (and 4 for the stop), final save at 8, two kept.
  for run in (straight, stopped):
    assert Checkpointer(os.path.join(run, "checkpoints"), keep=2).all_steps() == [6, 8]
  cfg_r, _ = resolve_config(cfg)
  template = init_state(cfg_r)[1]
  sa, da, _, _ = Checkpointer(os.path.join(straight, "checkpoints"), keep=2).restore(template)
  sb, db, _, _ = Checkpointer(os.path.join(stopped, "checkpoints"), keep=2).restore(template)
  assert_trees_identical(sa, sb)
  assert da == db
  recs = lambda run: [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))
                      if r["split"] == "train"]
  ra, rb = recs(straight), recs(stopped)
  assert [r["step"] for r in rb] == list(range(1, 9))  # no duplicated records after resuming
  for x, y in zip(ra, rb):
    assert (x["loss"], x["l0_L"], x["dead_fraction_L"]) == (y["loss"], y["l0_L"],
                                                             y["dead_fraction_L"])
  assert a["val_ce"] == b["val_ce"]
  assert sum(r["reinit_neurons"] for r in ra if r["step"] > 4) > 0
  model, loaded_cfg, step = load_model(straight)
  assert step == 8 and loaded_cfg == cfg_r
  assert_trees_identical(nnx.state(model, nnx.Param), sa.params)
  # A time budget stops the run early, with its state saved for resumption.
  budget = str(tmp_path / "budget")
  c = train(apply_overrides(cfg, ["train.max_minutes=1e-4"]), budget, progress=False)
  assert c["stop_reason"] == "time budget" and 0 < c["steps"] < 8
  assert Checkpointer(os.path.join(budget, "checkpoints"), keep=2).latest_step() == c["steps"]
  with pytest.raises(ValueError, match="start over with --fresh"):
    train(cfg, stopped, resume=False, progress=False)
  # Resuming with another model is refused, naming what changed.
  other = apply_overrides(cfg, ["model.n_layers=3"])
  with pytest.raises(ValueError, match="other model settings.*n_layers"):
    train(other, stopped, progress=False)


def _small_state(seed: int):
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=(64, 32)).astype(np.float32), "step": np.int32(seed),
          "mask": rng.random(16) > 0.5}


def test_half_written_tmp_dir_is_ignored(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=3)
  ckpt.save(5, _small_state(5), {"index": 5}, {"run": "x"})
  ckpt.close()
  # What a save killed half-way leaves behind: a tmp directory with partial contents.
  tmp = tmp_path / "9.orbax-checkpoint-tmp-1234567"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(os.urandom(100))
  ckpt = Checkpointer(str(tmp_path), keep=3)
  assert ckpt.latest_step() == 5 and ckpt.all_steps() == [5]
  state, data, _, step = ckpt.restore(_small_state(0))
  assert step == 5 and data == {"index": 5}
  assert_trees_identical(state, _small_state(5))


_KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    os.environ["JAX_PLATFORMS"] = "cpu"
    from orbax.checkpoint._src.path import atomicity
    from sparse_jax.train.checkpoint import Checkpointer
    from test_checkpoint import _small_state

    ckpt = Checkpointer({directory!r}, keep=3, async_save=False)
    ckpt.save(1, _small_state(1), {{"index": 1}}, {{"run": "x"}})
    ckpt.wait()

    async def die(self, *args, **kwargs):  # every file of step 2 is written; the commit is not
      os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt.save(2, _small_state(2), {{"index": 2}}, {{"run": "x"}})
    ckpt.wait()
    print("the save was not interrupted")
""")


def test_save_killed_half_way_keeps_last_good_checkpoint(tmp_path):
  directory = str(tmp_path / "ckpt")
  script = _KILL_DURING_SAVE.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                                    directory=directory)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
  leftovers = [d for d in os.listdir(directory) if d.startswith("2.orbax-checkpoint-tmp")]
  assert leftovers, os.listdir(directory)  # the killed save had really started writing step 2
  ckpt = Checkpointer(directory, keep=3)
  assert ckpt.latest_step() == 1
  state, data, _, _ = ckpt.restore(_small_state(0))
  assert data == {"index": 1}
  assert_trees_identical(state, _small_state(1))
  # And the run can go on saving.
  ckpt.save(2, _small_state(2), {"index": 2}, {"run": "x"})
  ckpt.wait()
  assert ckpt.latest_step() == 2
  assert_trees_identical(ckpt.restore(_small_state(0))[0], _small_state(2))
  ckpt.close()
