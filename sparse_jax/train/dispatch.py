"""Each sparse FFN layer's path (sparse kernels or plain dense), decided on the host.

The Pallas backend can decide per call on device (``SparseFFNConfig.mode="auto"``: a gate probe and
a ``lax.cond``, forward and backward), but kernels inside XLA conditionals run outside the step's
command buffer, and the dense branch must recompute in chunks to keep the conditional's memory
bounded (its dense branch measured 0.6-0.8x of a dense model's FFN). Here the training loop
decides instead (``train.dispatch=auto_host``, which the default ``auto`` is for a sparse FFN on
the kernels; ``resolve_kind``), from the sparsity tracker's EMA of active neurons per layer
(``train/sparsity.py``), with hysteresis, every ``train.dispatch_every`` steps:

* a sparse layer goes dense when its active fraction rises above ``train.dispatch_dense_above``;
* a dense layer goes sparse when it falls below ``train.dispatch_sparse_below`` (lower, so a
  layer near the line does not flip back and forth);

both fractions of d_ff hold for >= 16384 tokens per call and scale with sqrt(tokens / 16384)
below, as the on-device line does (``sparse_jax.ops.pallas_backend.dispatch_threshold``: fewer
tokens leave the sparse kernels less work to balance).

The active fraction alone misses what makes a sparse layer slow at a low mean: activity
concentrated in a few TwELL tiles or in a few very busy tokens overflows the op's capacities, and
its backward then runs the kernels *and* the dense correction (measured 0.63x of dense on
clustered hot neurons at ~28 active/token, ``bench_ffn_train.py``). So a sparse layer whose step
reported ``dense_fallback`` (the op's statistics; under a mesh the share of devices) above
``FALLBACK_DENSE_SHARE`` on a decision step goes dense too, and stays dense for a back-off of
decisions that doubles each time it falls back again (1, 2, 4, ... up to ``MAX_HOLD``) and halves
after each decision it stays sparse without one: a layer whose pattern changes (training moves
activity around; ``train.hot_cold`` spreads hot neurons over the tiles) is retried, a layer that
keeps overflowing costs at most one window of ``dispatch_every`` slow steps per ``MAX_HOLD``
windows. ``settled_mode`` is the rule's fixed point for one layer (the benchmarks' host column).

How the choice reaches the FFNs: as static configuration. The model's graphdef carries each
FFN's ``SparseFFNConfig`` (a static attribute); ``graphdef_for`` rebuilds the graphdef with each
layer's ``mode`` set, and the step is compiled for that graphdef (a static argument, like the
config). Nothing changes in the parameters or the optimiser state, so one ``TrainState`` runs
under every pattern; each pattern (tuple of per-layer ops) is one cached compiled step. No context
or global is read at trace time, and ``nnx.split``/``merge`` at the jit boundary stay as they are.

No per-step host sync: the decision reads the EMA from the step's metrics only on decision steps
(with ``dispatch_every`` a multiple of ``log_every`` the loop fetches them anyway), and the new
pattern runs from the next step. Compiling a new pattern's step stalls the run once; with a
``lower`` function (``jit(...).lower``) the dispatcher compiles the likely next pattern ahead, in
a background thread: the pattern that the decision would give if each layer's band shrank to its
midpoint (layers past the middle of the band towards their switch). XLA keeps the executable in
jit's cache, so the switch itself then compiles nothing. The state (``kind``, per-layer modes) is saved in the checkpoint
(``Checkpointer`` item ``host``), so a resumed run continues with the same pattern and the same
hysteresis state: bit-identical to an uninterrupted one.

Hot/cold split in training (``train.hot_cold``; the inference split's op, ``ops.hotcold``): each
layer's op carries ``n_hot``, its neurons ``[0, n_hot)`` computed densely (forward and backward:
XLA autodiff of the dense part, the sparse op's VJP for the rest; ``FFN.hot_neurons``). On each
decision step a sparse layer's split is re-planned (``ops.hotcold.plan_layer``) from that step's
per-neuron counts (its size changes only where the current one costs over ``N_HOT_SLACK`` more
than the plan's: each size is a compiled step); if the size changed, or the current hot block
holds less than ``HOT_KEEP`` of the activity the hottest neurons would, the layer's neurons are
reordered (hot first, the cold ones spread over the TwELL tiles) by
``train.neuron_order.permute_neurons`` in the parameters, both AdamW moments and the tracker
(``refresh``), which changes neither the function nor the optimisation.
The reordering lives in the saved state and ``n_hot`` in the saved pattern, so a resumed run
continues bit-identically. Dense layers have no split.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from typing import Callable

import jax
import numpy as np
from flax import nnx

from sparse_jax.config import DISPATCH_KINDS as KINDS   # train.dispatch

MIN_FULL_TOKENS = 16384   # tokens per call at which the thresholds hold unscaled
HOT_KEEP = 0.95           # a layer's hot block is kept while it holds this share of the plan's
N_HOT_SLACK = 0.1         # a layer keeps its n_hot while it costs at most 10% over the plan's
FALLBACK_DENSE_SHARE = 0.25  # a sparse layer whose step fell back to dense above this goes dense
MAX_HOLD = 16             # the longest back-off (decisions) before such a layer is retried sparse


@dataclasses.dataclass(frozen=True)
class LayerOp:
  """The static op choice of one FFN layer. mode: ``SparseFFNConfig.mode``. n_hot: hot neurons
  computed densely (0: none; the hot/cold extension point, see the module docstring)."""
  mode: str
  n_hot: int = 0

  def code(self) -> str:
    return {"auto": "A", "sparse": "S", "dense": "D"}[self.mode] + (
        f"{self.n_hot}" if self.n_hot else "")


Pattern = tuple[LayerOp, ...]


def pattern_code(pattern: Pattern) -> str:
  """"SSDD"-style summary (one letter per layer, n_hot after it when set) for logs."""
  return "".join(op.code() for op in pattern)


def scaled_threshold(fraction: float, tokens_per_call: int) -> float:
  return fraction * min(1.0, math.sqrt(tokens_per_call / MIN_FULL_TOKENS))


def decide_modes(modes: tuple[str, ...], active_fraction_L, *, sparse_below: float,
                 dense_above: float, fallback_L=None, hold_L=None) -> tuple[str, ...]:
  """The hysteresis rule, per layer: sparse -> dense above ``dense_above`` or when the layer's
  step fell back to dense (``fallback_L`` above ``FALLBACK_DENSE_SHARE``), dense -> sparse below
  ``sparse_below`` unless the layer is held dense (``hold_L > 0``), otherwise unchanged. A
  non-finite fraction (a diverged run) goes dense: the exact path that needs no capacity."""
  if not sparse_below < dense_above:
    raise ValueError(f"sparse_below ({sparse_below}) must be below dense_above ({dense_above})")
  n = len(modes)
  frac = np.asarray(active_fraction_L, np.float64)
  fallback = np.zeros(n) if fallback_L is None else np.asarray(fallback_L, np.float64)
  hold = np.zeros(n, np.int64) if hold_L is None else np.asarray(hold_L, np.int64)
  for name, a in (("active_fraction_L", frac), ("fallback_L", fallback), ("hold_L", hold)):
    if a.shape != (n,):
      raise ValueError(f"{name} has shape {a.shape}, expected ({n},)")
  out = []
  for mode, f, fb, h in zip(modes, frac, fallback, hold):
    if not np.isfinite(f):
      out.append("dense")
    elif mode == "sparse" and (f > dense_above or fb > FALLBACK_DENSE_SHARE):
      out.append("dense")
    elif mode == "dense" and f < sparse_below and h <= 0:
      out.append("sparse")
    else:
      out.append(mode)
  return tuple(out)


def next_hold(modes_before, modes_after, fallback_L, hold_L, backoff_L
              ) -> tuple[np.ndarray, np.ndarray]:
  """(hold, backoff) after one decision (``decide_modes``): a sparse layer sent dense by a
  fallback is held dense for a back-off that doubles (up to ``MAX_HOLD``); a held dense layer
  counts its hold down; a layer that stays sparse with no fallback halves its back-off."""
  hold = np.array(hold_L, np.int64)
  backoff = np.array(backoff_L, np.int64)
  fallback = np.asarray(fallback_L, np.float64)
  for i, (before, after) in enumerate(zip(modes_before, modes_after)):
    if before == "sparse" and after == "dense" and fallback[i] > FALLBACK_DENSE_SHARE:
      backoff[i] = min(MAX_HOLD, max(1, 2 * backoff[i]))
      hold[i] = backoff[i]
    elif before == "dense" and after == "dense" and hold[i] > 0:
      hold[i] -= 1
    elif before == "sparse" and after == "sparse":
      backoff[i] //= 2
  return hold, backoff


def settled_mode(active_fraction: float, fallback: float, *, sparse_below: float,
                 dense_above: float) -> str:
  """The mode ``auto_host`` settles on for one layer whose statistics stay at
  ``active_fraction`` and ``fallback`` (its sparse steps' ``dense_fallback``): it starts dense and
  goes sparse below ``sparse_below``; a sparse layer that falls back goes dense again and is held
  there (retried after each back-off). Used by the benchmarks to time what the loop would run."""
  modes = decide_modes(("dense",), [active_fraction], sparse_below=sparse_below,
                       dense_above=dense_above)
  if modes == ("sparse",):
    modes = decide_modes(modes, [active_fraction], sparse_below=sparse_below,
                         dense_above=dense_above, fallback_L=[fallback])
  return modes[0]


def apply_op(ffn: nnx.Module, op: LayerOp, overflow_fallback: str | None = None) -> None:
  """Sets ``op`` in one FFN module's static op config (in place, before ``nnx.split``): the mode,
  ``SparseFFNConfig.overflow_fallback`` if given, and, for ``n_hot > 0``, the hot/cold split
  (``FFN.hot_neurons``)."""
  from sparse_jax.nn.ffn import SPARSE_KINDS
  if op.n_hot and op.mode == "dense":
    raise ValueError(f"{op}: a dense layer has no hot/cold split")
  if op.n_hot and ffn.kind not in SPARSE_KINDS:
    raise ValueError(f"{op}: the hot/cold split needs a sparse FFN kind {SPARSE_KINDS}, got "
                     f"{ffn.kind!r}")
  # Under a mesh the same module runs its computation per device (FFN.compute inside shard_map),
  # so the one config reaches every device.
  fallback = overflow_fallback or ffn.sparse_config.overflow_fallback
  ffn.sparse_config = dataclasses.replace(ffn.sparse_config, mode=op.mode,
                                          overflow_fallback=fallback)
  ffn.hot_neurons = op.n_hot or None


def graphdef_for(graphdef: nnx.GraphDef, params: nnx.State, pattern: Pattern,
                 overflow_fallback: str | None = None) -> nnx.GraphDef:
  """``graphdef`` with layer i's FFN running ``pattern[i]`` (params: the model's, values unused)
  and, if given, every FFN's ``SparseFFNConfig.overflow_fallback``."""
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  model = nnx.merge(graphdef, abstract)
  if len(pattern) != len(model.blocks):
    raise ValueError(f"pattern has {len(pattern)} layers, the model {len(model.blocks)}")
  for block, op in zip(model.blocks, pattern):
    apply_op(block.ffn, op, overflow_fallback)
  new, _ = nnx.split(model, nnx.Param)
  return new


def step_lowering(compiled_cfg, mesh) -> Callable:
  """``lower(graphdef, state_spec, batch_spec)`` of the loop's train step (``train/step.py``)
  for ``Dispatcher``'s compile-ahead: the same jit objects the loop calls, with a ``hold`` placed
  as ``step.no_hold`` places it, so the compiled executable lands in their cache."""
  from sparse_jax.train import step as train_step_module
  hold = train_step_module.no_hold(mesh)
  hold_spec = jax.ShapeDtypeStruct(hold.shape, hold.dtype, sharding=hold.sharding)
  if mesh is None:
    return lambda gd, s, b: train_step_module.train_step.lower(s, b, hold_spec, graphdef=gd,
                                                               cfg=compiled_cfg)
  return lambda gd, s, b: train_step_module.sharded_steps(gd, compiled_cfg, mesh)[0].lower(
      s, b, hold_spec)


def resolve_kind(cfg, *, single_step: bool = False) -> str:
  """The ``train.dispatch`` kind that runs. "auto" is "auto_host" where the sparse kernels run (a
  sparse ``model.ffn`` whose ``model.ffn_impl`` is not "xla", on a Hopper GPU, at a width where
  the op's "auto" mode does not run dense from the shape alone, ``pallas_backend.auto_runs_dense``)
  and "device" elsewhere: a dense FFN has nothing to decide, and the XLA reference op computes the
  dense product either way, so per-layer patterns would only add compiles. ``single_step``
  (scripts that compile one step without the loop, which cannot change its pattern): "device"
  there."""
  from pallas_kernels import common
  from sparse_jax.nn.ffn import SPARSE_KINDS
  from sparse_jax.ops.pallas_backend import auto_runs_dense
  kind = cfg.train.dispatch
  if kind != "auto":
    return kind
  kernels = (cfg.model.ffn_impl != "xla" and common.hopper_available()
             and not auto_runs_dense(cfg.model.d_model, cfg.model.sparse))
  return ("auto_host" if cfg.model.ffn in SPARSE_KINDS and kernels and not single_step
          else "device")


def static_graphdef(cfg, graphdef: nnx.GraphDef, params: nnx.State) -> nnx.GraphDef:
  """The graphdef of a fixed ``train.dispatch`` (``device`` or ``auto``: unchanged;
  ``sparse``/``dense``: every layer in that mode), for scripts that compile one step without the
  loop (benchmarks)."""
  kind = resolve_kind(cfg, single_step=True)
  if kind == "device":
    return graphdef
  if kind == "auto_host":
    raise ValueError("train.dispatch=auto_host decides during a run (sparse_jax.train.train); "
                     "a single compiled step takes train.dispatch=device, sparse or dense")
  return graphdef_for(graphdef, params, tuple(LayerOp(kind) for _ in range(cfg.model.n_layers)))


class Dispatcher:
  """The run's current pattern, its hysteresis decisions and the compiled step of each pattern.

  ``make_step(graphdef)`` returns the step function ``(state, batch, hold=None) -> (state,
  metrics)`` for a graphdef (the loop's ``step_functions(...)[0]``); it is called once per
  pattern.
  ``lower(graphdef, state_spec, batch_spec)``, if given, lowers that step for abstract arguments
  (``jit(...).lower``): the likely next pattern is then compiled ahead in a background thread.
  """

  def __init__(self, cfg, graphdef: nnx.GraphDef, params: nnx.State,
               make_step: Callable[[nnx.GraphDef], Callable], *, tokens_per_call: int,
               lower: Callable | None = None, tokens_per_step: int | None = None):
    from sparse_jax.nn.ffn import SPARSE_KINDS
    tcfg = cfg.train
    if tcfg.dispatch not in KINDS:
      raise ValueError(f"train.dispatch must be one of {KINDS}, got {tcfg.dispatch!r}")
    self.kind = resolve_kind(cfg)
    if self.kind != "device" and cfg.model.ffn not in SPARSE_KINDS:
      raise ValueError(f"train.dispatch={self.kind!r} needs a sparse model.ffn "
                       f"{SPARSE_KINDS}, got {cfg.model.ffn!r} (use train.dispatch=device)")
    self.every = tcfg.dispatch_every
    self.sparse_below = scaled_threshold(tcfg.dispatch_sparse_below, tokens_per_call)
    self.dense_above = scaled_threshold(tcfg.dispatch_dense_above, tokens_per_call)
    self.d_ff = cfg.model.d_ff
    self.n_layers = cfg.model.n_layers
    self.hot_cold = tcfg.hot_cold
    self._round_to = tcfg.hot_cold_round_to
    if self.hot_cold and not tokens_per_step:
      raise ValueError("train.hot_cold: the dispatcher needs tokens_per_step (the step's tokens, "
                       "which its per-neuron counts count)")
    self.tokens_per_call, self.tokens_per_step = tokens_per_call, tokens_per_step
    self.d_model = cfg.model.d_model
    self._pending: dict[int, np.ndarray] = {}   # layer -> neuron order to apply (refresh)
    self._graphdef = graphdef
    # Shapes only: the state's arrays are donated to the steps.
    self._params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    self._make_step = make_step
    self._steps: dict[Pattern, Callable] = {}
    # train.overflow_fallback for the layers this dispatcher runs in mode "sparse"; a step that
    # a deferring layer flagged is redone by ``exact_step`` (the same pattern with "cond").
    self.overflow_fallback = tcfg.overflow_fallback
    self.defers = self.kind in ("auto_host", "sparse") and self.overflow_fallback == "defer"
    self._exact_steps: dict[Pattern, Callable] = {}
    self.redone_steps = 0
    self._lower = lower
    self._graphdefs: dict[tuple[Pattern, bool], nnx.GraphDef] = {}   # (pattern, exact)
    self._specs = None            # (state, batch) ShapeDtypeStructs, from the first call
    self.ahead: dict[Pattern, threading.Thread] = {}
    self.ahead_errors: dict[Pattern, BaseException] = {}
    # "auto_host" starts dense (exact, and as fast as a dense model on a fresh one) and decides
    # after the first step.
    first = {"device": "auto", "auto_host": "dense", "sparse": "sparse", "dense": "dense"}
    self.pattern: Pattern = tuple(LayerOp(first[self.kind]) for _ in range(self.n_layers))
    # The fallback back-off (decide_modes / next_hold): decisions a layer stays dense, and the
    # length of its next hold.
    self.hold_L = np.zeros(self.n_layers, np.int64)
    self.backoff_L = np.zeros(self.n_layers, np.int64)

  def step_fn(self, pattern: Pattern | None = None) -> Callable:
    """The compiled step of ``pattern`` (default: the current one), built on first use."""
    pattern = self.pattern if pattern is None else pattern
    if pattern not in self._steps:
      if pattern in self.ahead:
        self.ahead[pattern].join()  # wait for it rather than compile the same step twice
      if pattern in self.ahead_errors:
        warnings.warn(f"compiling the step of pattern {pattern_code(pattern)} ahead failed "
                      f"({self.ahead_errors[pattern]!r}); it compiles now")
      self._steps[pattern] = self._make_step(self._graphdef_of(pattern))
    return self._steps[pattern]

  def graphdef(self, pattern: Pattern | None = None) -> nnx.GraphDef:
    """The graphdef that runs ``pattern`` (default: the current one)."""
    return self._graphdef_of(self.pattern if pattern is None else pattern)

  def _graphdef_of(self, pattern: Pattern, exact: bool = False) -> nnx.GraphDef:
    if self.kind == "device":
      return self._graphdef
    key = (pattern, exact)
    if key not in self._graphdefs:
      self._graphdefs[key] = graphdef_for(self._graphdef, self._params, pattern,
                                          "cond" if exact else self.overflow_fallback)
    return self._graphdefs[key]

  def exact_step(self, state, batch):
    """The current pattern's step with ``overflow_fallback="cond"`` (compiled on first use): the
    loop's redo of a step that a deferring layer flagged (``metrics["redone"]``)."""
    if self.pattern not in self._exact_steps:
      self._exact_steps[self.pattern] = self._make_step(self._graphdef_of(self.pattern, True))
    self.redone_steps += 1
    return self._exact_steps[self.pattern](state, batch)

  def __call__(self, state, batch, hold=None):
    """The current pattern's step; ``hold`` (the previous step's unread ``metrics["redone"]``,
    None: none) keeps the state if non-zero (``train/step.py``)."""
    if self._specs is None and self._lower is not None:
      # Only committed arrays carry their sharding into jit's cache key.
      spec = lambda a: jax.ShapeDtypeStruct(
          np.shape(a), jax.dtypes.canonicalize_dtype(a.dtype),
          sharding=a.sharding if getattr(a, "committed", False) else None)
      self._specs = (jax.tree.map(spec, state), spec(batch))
    return self.step_fn()(state, batch, hold)

  def compile_ahead(self, pattern: Pattern) -> threading.Thread | None:
    """Starts compiling ``pattern``'s step in a background thread (None: nothing to do). The
    graphdef is built here, on the caller's thread; a failure is kept in ``ahead_errors`` and the
    step then compiles on first use as usual."""
    if (self._lower is None or self._specs is None or pattern in self._steps
        or pattern in self.ahead):
      return None
    gd = self._graphdef_of(pattern)
    state_spec, batch_spec = self._specs

    def work():
      try:
        self._lower(gd, state_spec, batch_spec).compile()
      except BaseException as e:  # noqa: BLE001 (reported, never fatal: the step compiles later)
        self.ahead_errors[pattern] = e

    thread = threading.Thread(target=work, name=f"compile {pattern_code(pattern)}", daemon=True)
    self.ahead[pattern] = thread
    thread.start()
    return thread

  def due(self, step: int) -> bool:
    """Whether the decision runs after optimiser step ``step`` (1-based count of steps done)."""
    return self.kind == "auto_host" and (step == 1 or step % self.every == 0)

  def after_step(self, step: int, metrics: dict) -> bool:
    """Decides the next steps' pattern on decision steps from ``metrics["l0_ema_L"]`` and that
    step's ``metrics["dense_fallback_L"]`` (a host fetch only then). Returns whether the pattern
    changed."""
    if not self.due(step):
      return False
    ema_L = np.asarray(jax.device_get(metrics["l0_ema_L"]), np.float64)
    frac_L = ema_L / self.d_ff
    fallback_L = (np.zeros(self.n_layers) if "dense_fallback_L" not in metrics else
                  np.asarray(jax.device_get(metrics["dense_fallback_L"]), np.float64))
    before = tuple(op.mode for op in self.pattern)
    modes = decide_modes(before, frac_L, sparse_below=self.sparse_below,
                         dense_above=self.dense_above, fallback_L=fallback_L, hold_L=self.hold_L)
    self.hold_L, self.backoff_L = next_hold(before, modes, fallback_L, self.hold_L,
                                            self.backoff_L)
    if self.hot_cold:
      from sparse_jax.train.step import HOT_COLD_COUNTS
      counts_LxF = np.asarray(jax.device_get(metrics[HOT_COLD_COUNTS]), np.float64)
      new, self._pending = self.plan_hot_cold(modes, counts_LxF)
    else:
      new = tuple(dataclasses.replace(op, mode=m) for op, m in zip(self.pattern, modes))
    changed = new != self.pattern
    self.pattern = new
    self.compile_ahead(self.likely_next(frac_L))
    return changed

  def plan_hot_cold(self, modes: tuple[str, ...], counts_LxF: np.ndarray
                    ) -> tuple[Pattern, dict[int, np.ndarray]]:
    """(the next pattern, the neuron order of each layer to reorder) for ``modes`` and one step's
    per-neuron counts (in the current neuron order). A sparse layer keeps its hot block while
    the plan's size is the same and the block holds ``HOT_KEEP`` of the plan's hot activity."""
    from sparse_jax.ops import hotcold
    if counts_LxF.shape != (self.n_layers, self.d_ff):
      raise ValueError(f"per-neuron counts of shape {counts_LxF.shape}, expected "
                       f"({self.n_layers}, {self.d_ff})")
    cost = hotcold.CostModel(round_to=self._round_to)
    ops, perms = [], {}
    for layer, (op, mode) in enumerate(zip(self.pattern, modes)):
      if mode != "sparse":
        ops.append(LayerOp(mode))
        continue
      freq_F = np.clip(counts_LxF[layer] / self.tokens_per_step, 0.0, 1.0)
      plan = hotcold.plan_layer(freq_F, d_model=self.d_model, m=self.tokens_per_call, cost=cost)
      # The size: the plan's, unless the current one costs at most N_HOT_SLACK more (each new
      # size is one more compiled step).
      n_hot = plan.n_hot
      sorted_f = np.sort(freq_F)[::-1]
      if op.mode == "sparse" and op.n_hot != n_hot:
        now, _ = hotcold.split_cost(sorted_f, op.n_hot, m=self.tokens_per_call,
                                    d_model=self.d_model, cost=cost)
        if now <= (1 + N_HOT_SLACK) * plan.predicted["total_s"]:
          n_hot = op.n_hot
      ops.append(LayerOp(mode, n_hot))
      if n_hot == 0 and op.n_hot == 0:
        continue  # no split before or after: nothing to reorder
      # The block: kept while it holds HOT_KEEP of the activity the hottest n_hot neurons hold.
      total = max(freq_F.sum(), 1e-30)
      held, best = freq_F[:n_hot].sum() / total, sorted_f[:n_hot].sum() / total
      if n_hot != op.n_hot or held < HOT_KEEP * best:
        perms[layer] = (plan.perm if n_hot == plan.n_hot
                        else hotcold.split_order(freq_F, n_hot, cost))
    return tuple(ops), perms

  def refresh(self, state):
    """``state`` with the last decision's neuron reorderings applied (``plan_hot_cold``); call it
    after ``after_step``, before the next step and before saving."""
    if not self._pending:
      return state
    from sparse_jax.train.neuron_order import permute_neurons
    for layer, perm in sorted(self._pending.items()):
      state = permute_neurons(state, layer, perm)
    self._pending = {}
    return state

  def likely_next(self, active_fraction_L) -> Pattern:
    """The pattern the next decisions approach: the decision with each layer's band shrunk to
    its midpoint (a layer's split kept while it stays sparse; a dense layer has none)."""
    mid = 0.5 * (self.sparse_below + self.dense_above)
    modes = decide_modes(tuple(op.mode for op in self.pattern), active_fraction_L,
                         sparse_below=mid * (1 - 1e-9), dense_above=mid, hold_L=self.hold_L)
    return tuple(LayerOp(m, op.n_hot if m == "sparse" else 0)
                 for op, m in zip(self.pattern, modes))

  def code(self) -> str:
    return pattern_code(self.pattern)

  def state_dict(self) -> dict:
    """The checkpointed state: JSON-serialisable."""
    return {"kind": self.kind, "modes": [op.mode for op in self.pattern],
            "n_hot": [op.n_hot for op in self.pattern], "hold": self.hold_L.tolist(),
            "backoff": self.backoff_L.tolist()}

  def load_state_dict(self, saved: dict | None) -> None:
    """Continues a saved run's pattern. A checkpoint without one (saved before host dispatch, or
    by another ``train.dispatch``) keeps this run's start pattern: the run already warns that
    changed train settings do not resume exactly."""
    if not saved or saved.get("kind") != self.kind:
      return
    modes, n_hot = saved["modes"], saved.get("n_hot", [0] * len(saved["modes"]))
    if len(modes) != self.n_layers:
      raise ValueError(f"the checkpoint's dispatch state has {len(modes)} layers, the model "
                       f"{self.n_layers}")
    self.pattern = tuple(LayerOp(m, int(h)) for m, h in zip(modes, n_hot))
    zeros = [0] * self.n_layers
    self.hold_L = np.asarray(saved.get("hold", zeros), np.int64)
    self.backoff_L = np.asarray(saved.get("backoff", zeros), np.int64)
