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
"""
from __future__ import annotations

import os

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


class Checkpointer:
  """Periodic and final saves, keep-N, restore of the latest (or a given) complete step."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                      item_names=("state", "data", "config", "host"))

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict, config: dict,
           host_state: dict | None = None) -> None:
    flat, _ = flatten_state(state)
    self._mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flat), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config), host=ocp.args.JsonSave(host_state or {})), force=True)

  def restore(self, template: TrainState, step: int | None = None
              ) -> tuple[TrainState, dict, dict, int]:
    """(state, data_state, config, step) of ``step`` (default: the latest complete one), each
    array placed like the template's (arrays or ``jax.ShapeDtypeStruct``s with a sharding)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
    flat, treedef = flatten_state(template)
    # Host (numpy) template leaves keep orbax's default placement.
    abstract = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=getattr(v, "sharding", None))
                for k, v in flat.items()}
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    restored = out["state"]
    missing = sorted(set(abstract) - set(restored))
    if missing:
      raise ValueError(f"checkpoint step {step} lacks {missing[:3]}...: saved by another model?")
    state = jax.tree_util.tree_unflatten(treedef, [restored[k] for k in flat])
    return state, dict(out["data"]), dict(out["config"]), step

  def read_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
    return dict(self._mgr.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"])

  def read_host(self, step: int | None = None) -> dict:
    """The ``host`` item of ``step`` (default: the latest), {} for checkpoints without one."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
    if not os.path.isdir(os.path.join(self.directory, str(step), "host")):
      return {}
    return dict(self._mgr.restore(step, args=ocp.args.Composite(
        host=ocp.args.JsonRestore()))["host"])

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
