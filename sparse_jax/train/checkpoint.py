"""Checkpoints with orbax ``CheckpointManager``: train state, data position, config.

Each step directory holds four items: ``state`` (every array of the TrainState under a flat
"params/blocks/0/ffn/w_gate_FxD/value"-style name), ``data`` (the data position, JSON),
``config`` (the run's config, JSON) and ``host`` (the loop's host-side state, JSON: the FFN
dispatch pattern of ``sparse_jax.train.dispatch``; absent in checkpoints that predate it). Restoring fills a template TrainState built from the config,
so the restored pytree has exactly the types the jitted step was compiled for.

Sharded state: each array is saved from its shards (every host writes its own), and restored
straight into the sharding of the template's array, whatever mesh saved it: a checkpoint of a
data:8 run resumes on data:2,fsdp:4 or on one device.

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp*`` and renames it to ``<step>``
only when every item is written, so a save interrupted half-way (crash, kill, pre-emption) leaves
a tmp directory that is never listed as a step, and the last complete step stays the latest one.

Integrity: once a save is complete, the size of every file of the step is recorded in
``<step>/file_sizes.json``; a file missing or of another size later marks the step damaged before
anything is read, and a step that fails to restore (a damaged file of a step saved before these
records, a broken metadata file) is damaged too. ``restore_intact`` reports a damaged step in one
line naming the step and the file or array, and falls back to the newest step that restores.
Nothing is deleted: ``set_aside`` moves a damaged step out of the way of the manager
(``OUT/damaged_checkpoints/``), which a resuming run does so that it can save that step again.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparse_jax.train.step import TrainState


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flatten_state(tree) -> tuple[dict[str, jax.Array], jax.tree_util.PyTreeDef]:
  """{"a/b/0/c": leaf} names for every leaf (orbax-friendly keys), and the tree's structure."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  flat = {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}
  if len(flat) != len(leaves):
    raise ValueError("two leaves of the train state map to the same checkpoint name")
  return flat, treedef


INTEGRITY_FILE = "file_sizes.json"


class DamagedCheckpoint(ValueError):
  """A listed checkpoint step that cannot be read back; ``str()`` is one line naming the step and
  the file or array that failed."""

  def __init__(self, path: str, step: int, what: str):
    self.path, self.step = path, step
    super().__init__(f"checkpoint step {step} ({path}) is damaged: {what}")


def _file_sizes(step_dir: str) -> dict[str, int]:
  sizes = {}
  for d, _, files in os.walk(step_dir):
    for f in files:
      full = os.path.join(d, f)
      rel = os.path.relpath(full, step_dir)
      if rel != INTEGRITY_FILE:
        sizes[rel] = os.path.getsize(full)
  return sizes


def _check_file_sizes(step_dir: str) -> str | None:
  """What is wrong with the files of ``step_dir`` against its size record (None: all there, or
  no record)."""
  try:
    with open(os.path.join(step_dir, INTEGRITY_FILE)) as f:
      recorded = json.load(f)
  except FileNotFoundError:
    return None
  except ValueError:
    return f"its record {INTEGRITY_FILE} is not valid JSON"
  bad = []
  for rel, size in sorted(recorded.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      bad.append(f"file {rel} is missing")
    elif os.path.getsize(full) != size:
      bad.append(f"file {rel} has {os.path.getsize(full)} of its {size} bytes")
  if not bad:
    return None
  return bad[0] + (f" (and {len(bad) - 1} more files)" if len(bad) > 1 else "")


def _what_failed(error: BaseException) -> str:
  """One line from an orbax/TensorStore error chain: what could not be read and the storage error
  if a TensorStore read failed (e.g. 'OUT_OF_RANGE: Error reading "params/x/0.0" in OCDBT
  database at local file ...: ...'), else the innermost error's first line."""
  chain, e = [], error
  while e is not None and len(chain) < 10:
    chain.append(e)
    e = e.__cause__ or e.__context__
  for e in reversed(chain):
    line = str(e).split("\n")[0]
    m = re.search(r'Error reading (.*?) in OCDBT database at [^"]*"[^"]*"(?:: (.*))?$', line)
    code = re.match(r"(\w+): ", line)
    if m and code:
      code, thing, why = code.group(1), m.group(1), m.group(2) or "read error"
      if thing.startswith('"'):  # a chunk of an array: name the array
        thing = "array " + thing.strip('"').rsplit("/", 1)[0]
      return f"{thing} cannot be read ({code}: {why[:200]})"
  line = next((ln.strip() for ln in str(chain[-1]).splitlines() if ln.strip()),
              type(chain[-1]).__name__)
  return f"{type(chain[-1]).__name__}: {line[:300]}"


class Checkpointer:
  """Periodic and final saves, keep-N, restore of the latest (or a given) complete step."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                      item_names=("state", "data", "config", "host"))
    self._unrecorded: list[int] = []  # steps saved here whose file sizes are not recorded yet

  def _record_file_sizes(self) -> None:
    """Writes the size record of every step this checkpointer saved that is now complete
    (waiting for an async save in flight first)."""
    if not self._unrecorded:
      return
    self._mgr.wait_until_finished()
    if jax.process_index() == 0:
      for step in self._unrecorded:
        step_dir = self.step_dir(step)
        if not os.path.isdir(step_dir):  # already removed by keep-N
          continue
        sizes = _file_sizes(step_dir)
        tmp = os.path.join(step_dir, INTEGRITY_FILE + ".tmp")
        with open(tmp, "w") as f:
          json.dump(sizes, f, indent=0)
        os.replace(tmp, os.path.join(step_dir, INTEGRITY_FILE))
    self._unrecorded = []

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict, config: dict,
           host_state: dict | None = None) -> None:
    self._record_file_sizes()  # of the previous save, complete once the manager is idle
    self._unrecorded.append(step)
    flat, _ = flatten_state(state)
    self._mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flat), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config), host=ocp.args.JsonSave(host_state or {})), force=True)

  def _check_step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
    elif step not in self.all_steps():
      have = ", ".join(map(str, self.all_steps())) or "none"
      raise FileNotFoundError(f"no checkpoint of step {step} under {self.directory} (steps "
                              f"saved: {have})")
    return step

  def restore(self, template: TrainState, step: int | None = None
              ) -> tuple[TrainState, dict, dict, int]:
    """(state, data_state, config, step) of ``step`` (default: the latest complete one), each
    array placed like the template's (arrays or ``jax.ShapeDtypeStruct``s with a sharding).
    A step that does not restore raises ``DamagedCheckpoint`` (one line naming what is
    damaged)."""
    step = self._check_step(step)
    self._check_files(step)
    flat, treedef = flatten_state(template)
    # Host (numpy) template leaves keep orbax's default placement.
    abstract = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=getattr(v, "sharding", None))
                for k, v in flat.items()}
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore()))
    except Exception as e:  # orbax/TensorStore raise bare Exceptions with 100-line specs
      raise DamagedCheckpoint(self.step_dir(step), step, _what_failed(e)) from e
    restored = out["state"]
    missing = sorted(set(abstract) - set(restored))
    if missing:
      raise ValueError(f"checkpoint step {step} lacks {missing[:3]}...: saved by another model?")
    state = jax.tree_util.tree_unflatten(treedef, [restored[k] for k in flat])
    return state, dict(out["data"]), dict(out["config"]), step

  def _check_files(self, step: int) -> None:
    problem = _check_file_sizes(self.step_dir(step))
    if problem:
      raise DamagedCheckpoint(self.step_dir(step), step, problem)

  def read_config(self, step: int | None = None) -> dict:
    step = self._check_step(step)
    self._check_files(step)
    try:
      return dict(self._mgr.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))["config"])
    except Exception as e:
      raise DamagedCheckpoint(self.step_dir(step), step, _what_failed(e)) from e

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore_intact(self, template_fn, step: int | None = None, *, say=print
                     ) -> tuple[TrainState, dict, dict, int, list[DamagedCheckpoint]]:
    """``restore`` of ``step``, or by default of the newest step that restores: each damaged
    newer step is reported through ``say`` in one line and skipped. ``template_fn(config)`` builds
    the restore template from the step's saved config. Returns (state, data_state, config, step,
    the damaged steps skipped). An explicitly given damaged ``step`` raises."""
    if step is not None:
      return (*self.restore(template_fn(self.read_config(step)), step), [])
    damaged: list[DamagedCheckpoint] = []
    for candidate in sorted(self.all_steps(), reverse=True):
      try:
        result = self.restore(template_fn(self.read_config(candidate)), candidate)
      except DamagedCheckpoint as e:
        damaged.append(e)
        say(f"warning: {e}")
        continue
      if damaged:
        say(f"falling back to checkpoint step {candidate}, the newest complete one (nothing "
            "was deleted)")
      return (*result, damaged)
    raise FileNotFoundError(
        f"no checkpoint under {self.directory} restores: " + "; ".join(map(str, damaged))
        if damaged else f"no complete checkpoint under {self.directory}")

  def set_aside(self, damaged: DamagedCheckpoint, into: str) -> str:
    """Moves a damaged step directory into ``into`` (created; a timestamp keeps names unique) so
    that the manager no longer lists it after ``reload``; returns the new path. Nothing is
    deleted."""
    os.makedirs(into, exist_ok=True)
    target = os.path.join(into, f"{damaged.step}-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(damaged.path, target)
    return target

  def reload(self) -> None:
    """Re-reads the step list from disk (after steps were moved by ``set_aside``)."""
    self._mgr.reload()

  def read_host(self, step: int | None = None) -> dict:
    """The ``host`` item of ``step`` (default: the latest), {} for checkpoints without one."""
    step = self._check_step(step)
    if not os.path.isdir(os.path.join(self.step_dir(step), "host")):
      return {}
    self._check_files(step)
    try:
      return dict(self._mgr.restore(step, args=ocp.args.Composite(
          host=ocp.args.JsonRestore()))["host"])
    except Exception as e:
      raise DamagedCheckpoint(self.step_dir(step), step, _what_failed(e)) from e

  def wait(self) -> None:
    self._mgr.wait_until_finished()
    self._record_file_sizes()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._record_file_sizes()
    self._mgr.close()
