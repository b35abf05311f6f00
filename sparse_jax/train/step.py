"""The train state and the jit-compiled train and eval steps.

The model crosses the jit boundary as (graphdef, params): ``nnx.split`` outside, ``nnx.merge``
inside. Parameters stay fp32 (master weights); the modules cast them to the compute dtype at use,
so gradients and AdamW moments are fp32 while the matmuls run in bf16.

On a device mesh (``sparse_jax.parallel``) the same step functions are compiled with the state's
named shardings (FSDP rule) and the batch split over every device as in/out shardings, and the
model's sparse FFNs run per device (``Transformer(mesh=...)``); ``mesh=None`` is plain
single-device training.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparse_jax import parallel
from sparse_jax.config import Config
from sparse_jax.nn import Transformer, forward_with_stats
from sparse_jax.train import guard
from sparse_jax.train.loss import head_cross_entropy, l1_coeff_at, lm_loss
from sparse_jax.train.optimizer import lr_schedule, make_optimizer
from sparse_jax.train.sparsity import SparsityTracker, init_tracker, update_tracker

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array        # int32, optimiser steps taken
  params: nnx.State      # fp32 master weights
  opt_state: optax.OptState
  tracker: SparsityTracker
  rng: jax.Array         # uint32 raw key data (checkpointable), for dead-neuron re-initialisation


def _split_model(cfg: Config, mesh: Mesh | None) -> tuple[nnx.GraphDef, nnx.State]:
  model = Transformer(cfg.model, rngs=nnx.Rngs(params=cfg.train.seed), mesh=mesh)
  return nnx.split(model, nnx.Param)


def _state_around(params: nnx.State, cfg: Config) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=make_optimizer(cfg.train).init(params),
      tracker=init_tracker(cfg.model.n_layers, cfg.model.d_ff),
      rng=jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.train.seed), 1)))


def init_state(cfg: Config, mesh: Mesh | None = None) -> tuple[nnx.GraphDef, TrainState]:
  """A fresh model and optimiser from ``cfg`` (model.vocab_size must be resolved).

  With a ``mesh`` the graphdef's sparse FFNs run per device and the state is placed in its
  ``state_shardings``. The parameters are drawn eagerly as on one device (a compiled
  initialisation rounds some values differently), so a seed gives the same model on any mesh;
  the optimiser state is created already sharded.
  """
  graphdef, params = _split_model(cfg, mesh)
  if mesh is None:
    return graphdef, _state_around(params, cfg)
  params = parallel.place(params, parallel.tree_shardings(params, mesh))
  state = jax.jit(functools.partial(_state_around, cfg=cfg), donate_argnums=0,
                  out_shardings=state_shardings(cfg, mesh))(params)
  return graphdef, state


def state_shardings(cfg: Config, mesh: Mesh) -> TrainState:
  """The NamedSharding of every array of the train state on ``mesh`` (the FSDP rule of
  ``sparse_jax.parallel.sharding``: AdamW moments are sharded like their parameters)."""
  abstract_params = nnx.eval_shape(lambda: _split_model(cfg, None)[1])
  abstract = jax.eval_shape(functools.partial(_state_around, cfg=cfg), abstract_params)
  return parallel.tree_shardings(abstract, mesh)


def _ce_and_stats(model: Transformer, tokens_BxL1: jax.Array, cfg: Config):
  """(mean next-token cross-entropy, FFNStats) of a [B, L + 1] batch: the head's logits formed
  train.loss_chunk positions at a time (``head_cross_entropy``; 0: all at once)."""
  x_BxLxD, stats = forward_with_stats(model, tokens_BxL1[:, :-1], logits=False)
  return head_cross_entropy(x_BxLxD, model.output_head(), tokens_BxL1[:, 1:],
                            chunk=cfg.train.loss_chunk, compute_dtype=model.compute_dtype), stats


def _loss_fn(params, graphdef, tokens_BxL1, coeff, cfg: Config):
  ce, stats = _ce_and_stats(nnx.merge(graphdef, params), tokens_BxL1, cfg)
  loss, (ce, l1) = lm_loss(ce, stats.l1, coeff=coeff, norm=cfg.train.l1_norm,
                           d_ff=cfg.model.d_ff)
  return loss, (ce, l1, stats)


def _accumulate(params, graphdef, batch_AxBxL1, coeff, cfg: Config):
  """Gradients and metrics averaged over the A micro-batches (a scan: one compiled body)."""
  grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)

  def micro(tokens_BxL1):
    (loss, (ce, l1, stats)), grads = grad_fn(params, graphdef, tokens_BxL1, coeff, cfg)
    stats = dataclasses.replace(stats, dense_fallback=stats.dense_fallback.astype(F32))
    return grads, loss, ce, l1, stats

  def body(sums, tokens_BxL1):
    return jax.tree.map(jnp.add, sums, micro(tokens_BxL1)), None

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(micro, batch_AxBxL1[0]))
  sums, _ = jax.lax.scan(body, zeros, batch_AxBxL1)
  grads, loss, ce, l1, stats = sums
  n = batch_AxBxL1.shape[0]
  # Counts (overflow rows, per-neuron activity) stay sums over the step; the rest become means.
  stats = dataclasses.replace(stats, l0=stats.l0 / n, l1=stats.l1 / n,
                              dense_fallback=stats.dense_fallback / n)
  return jax.tree.map(lambda g: g / n, grads), loss / n, ce / n, l1 / n, stats


def _reinit_dead(params, graphdef, dead_LxF, key):
  model = nnx.merge(graphdef, params)
  for i, block in enumerate(model.blocks):
    block.ffn.reinit_gate_rows(dead_LxF[i], jax.random.fold_in(key, i))
  return nnx.state(model, nnx.Param)


# The step's per-neuron activity counts [n_layers, d_ff] (tokens of the step): a metric only with
# train.hot_cold, read by the dispatcher on decision steps and never logged.
HOT_COLD_COUNTS = "active_per_neuron_LxF"


def _train_step(state: TrainState, batch_AxBxL1: jax.Array, hold: jax.Array | None = None, *,
                graphdef: nnx.GraphDef, cfg: Config):
  """One optimiser step on a [grad_accum, micro_batch, seq_len + 1] int32 batch.

  ``hold`` (int32 scalar, or None): with deferring layers (train.overflow_fallback=defer), a
  non-zero value keeps the state as it was, as the step's own flag does: the loop passes the
  previous step's ``metrics["redone"]`` without reading it, so a step queued behind a flagged one
  gives that step's input state back for the exact redo (``train/loop.py``)."""
  tcfg = cfg.train
  coeff = l1_coeff_at(state.step, tcfg)
  grads, loss, ce, l1, stats = _accumulate(state.params, graphdef, batch_AxBxL1, coeff, cfg)
  updates, opt_state = make_optimizer(tcfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  tracker, window_done, dead_LxF = update_tracker(state.tracker, stats,
                                                  ema_decay=tcfg.l0_ema_decay,
                                                  window=tcfg.dead_window)
  if tcfg.reinit_dead:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    params = jax.lax.cond(window_done, lambda p: _reinit_dead(p, graphdef, dead_LxF, key),
                          lambda p: p, params)
  metrics = dict(
      loss=loss, ce=ce, l1=l1, l1_coeff=coeff, lr=lr_schedule(tcfg)(state.step),
      grad_norm=optax.tree.norm(grads), l0_L=stats.l0, l0_ema_L=tracker.l0_ema_L,
      overflow_rows_L=stats.overflow_rows, dense_fallback_L=stats.dense_fallback,
      dead_fraction_L=tracker.dead_fraction_L,
      reinit_neurons=jnp.where(window_done & tcfg.reinit_dead, jnp.sum(dead_LxF), 0))
  if tcfg.hot_cold:  # the hot/cold split's decisions read them (train/dispatch.py)
    metrics[HOT_COLD_COUNTS] = stats.active_per_neuron
  new_state = dataclasses.replace(state, step=state.step + 1, params=params,
                                  opt_state=opt_state, tracker=tracker)
  # A non-finite step leaves the weights as they were (train.nonfinite says what the loop does).
  new_state, metrics["nonfinite"] = guard.keep_finite(state, new_state, loss, grads, updates)
  # A layer with overflow_fallback="defer" that needed the dense backward has inexact gradients:
  # the whole state stays as it was (step counter included) and the loop redoes the step with
  # "cond" (train.overflow_fallback).
  redo = _needs_redo(graphdef, state.params, stats.dense_fallback, hold)
  new_state = jax.tree.map(lambda old, new: jnp.where(redo, old, new), state, new_state)
  metrics["redone"] = redo.astype(jnp.int32)
  return new_state, metrics


def _needs_redo(graphdef, params, dense_fallback_L, hold=None) -> jax.Array:
  """bool: some FFN layer that defers its rare overflow (``SparseFFNConfig.defers_overflow``, a
  static property of the graphdef) flagged this step (``FFNStats.dense_fallback``: per layer, a
  mean over micro-batches and devices), or ``hold`` is non-zero (only where a layer defers: a
  graphdef without one is never held)."""
  defer_L = np.asarray([bool(getattr(b.ffn, "sparse_config", None) is not None
                             and b.ffn.sparse_config.defers_overflow)
                        for b in nnx.merge(graphdef, params).blocks])
  if not defer_L.any():
    return jnp.zeros((), bool)
  own = jnp.any(jnp.where(defer_L, jnp.asarray(dense_fallback_L) > 0, False))
  return own if hold is None else own | (hold != 0)


def _eval_step(params: nnx.State, batch_BxL1: jax.Array, graphdef: nnx.GraphDef, cfg: Config):
  """Validation metrics of one batch: inference path of the FFN op (no gradient)."""
  ce, stats = _ce_and_stats(nnx.merge(graphdef, params), batch_BxL1, cfg)
  return dict(ce=ce, l0_L=stats.l0, l1_L=stats.l1,
              overflow_rows_L=stats.overflow_rows,
              dense_fallback_L=stats.dense_fallback.astype(F32),
              active_per_neuron_LxF=stats.active_per_neuron)


train_step = jax.jit(_train_step, static_argnames=("graphdef", "cfg"), donate_argnames=("state",))
eval_step = jax.jit(_eval_step, static_argnames=("graphdef", "cfg"))


@functools.lru_cache(maxsize=8)
def sharded_steps(graphdef: nnx.GraphDef, cfg: Config, mesh: Mesh):
  """(train_step(state, batch, hold), eval_step(params, batch)) compiled for ``mesh``: the state
  in its ``state_shardings`` in and out (donated), batches split over every device along their
  sequence axis, ``hold`` and the metrics replicated. Cached, so runs of the same settings compile
  once."""
  shardings = state_shardings(cfg, mesh)
  replicated = NamedSharding(mesh, P())
  train = jax.jit(functools.partial(_train_step, graphdef=graphdef, cfg=cfg),
                  in_shardings=(shardings, parallel.batch_sharding(mesh, ndim=3, axis=1),
                                replicated),
                  out_shardings=(shardings, replicated), donate_argnums=0)
  evaluate = jax.jit(functools.partial(_eval_step, graphdef=graphdef, cfg=cfg),
                     in_shardings=(shardings.params, parallel.batch_sharding(mesh, ndim=2, axis=0)),
                     out_shardings=replicated)
  return train, evaluate


@functools.lru_cache(maxsize=8)
def no_hold(mesh: Mesh | None = None) -> jax.Array:
  """The ``hold`` of a step queued behind none (a committed int32 zero: on the first device, or
  replicated on ``mesh``), so that every call of a step hits one compiled executable."""
  if mesh is None:
    return jax.device_put(np.zeros((), np.int32), jax.devices()[0])
  return parallel.put(np.zeros((), np.int32), NamedSharding(mesh, P()))


def step_functions(graphdef: nnx.GraphDef, cfg: Config, mesh: Mesh | None = None):
  """(train(state, batch, hold=None), evaluate(params, batch)) taking host (numpy) batches: the
  jitted single-device steps, or on ``mesh`` the ``sharded_steps`` with each batch placed split
  over the devices (each process places only its own devices' part). ``hold`` None is
  ``no_hold(mesh)``."""
  if mesh is None:
    train = lambda state, batch, hold=None: train_step(
        state, batch, no_hold() if hold is None else hold, graphdef=graphdef, cfg=cfg)
    return train, functools.partial(eval_step, graphdef=graphdef, cfg=cfg)
  train, evaluate = sharded_steps(graphdef, cfg, mesh)
  train_in = parallel.batch_sharding(mesh, ndim=3, axis=1)
  eval_in = parallel.batch_sharding(mesh, ndim=2, axis=0)
  return (lambda state, batch, hold=None: train(state, parallel.put(np.asarray(batch), train_in),
                                                no_hold(mesh) if hold is None else hold),
          lambda params, batch: evaluate(params, parallel.put(np.asarray(batch), eval_in)))
