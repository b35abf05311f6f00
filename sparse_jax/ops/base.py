"""What every implementation of the sparse FFN op shares: its configuration, its statistics (and
the one constructor of them) and the checks of its arguments.

Weight layout (explicit, one row per hidden neuron, the paper's G, K, V)::

    w_gate  [d_ff, d_model]     h = relu(x @ w_gate.T) * (x @ w_up.T)
    w_up    [d_ff, d_model]     y = h @ w_down
    w_down  [d_ff, d_model]

A Flax ``nnx.Linear(d_model, d_ff)`` kernel is ``[d_model, d_ff]``: pass its transpose.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sparse_jax.formats import hybrid, twell

F32 = jnp.float32
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MODES = ("auto", "sparse", "dense")   # SparseFFNConfig.mode
OVERFLOW_FALLBACKS = ("cond", "defer")   # SparseFFNConfig.overflow_fallback
DECODE_PATHS = ("dense", "kernel", "union")  # SparseFFNConfig.decode_path
# SparseFFNConfig.train_backward
TRAIN_BACKWARDS = ("auto", "neuron_major", "neuron_major_fused", "token_major")
# "auto" runs neuron_major_fused up to this d_model (where it was measured on an H200; its pass
# holds a whole d_model row of Wd and of the accumulators per warp), neuron_major above.
FUSED_BACKWARD_MAX_D_MODEL = 2048
# The checkpoint name of the sparse residuals of the op's training forward (the packed gate, R,
# the weight gradients' entry lists): ``ModelConfig.remat_policy="keep_sparse_ffn"`` saves them,
# so a rematerialised block's backward pass does not run the op's forward kernels again.
SPARSE_RESIDUALS = "sparse_ffn_residuals"


def named_sparse_residuals(tree):
  """``tree`` with every array tagged ``SPARSE_RESIDUALS`` (``jax.ad_checkpoint.checkpoint_name``:
  an identity outside a ``jax.checkpoint`` whose policy names it)."""
  return jax.tree.map(lambda a: checkpoint_name(a, SPARSE_RESIDUALS), tree)


def resolve_train_backward(order: str, d_model: int) -> str:
  """The order ``SparseFFNConfig.train_backward`` runs at ``d_model`` ("auto" resolved)."""
  if order not in TRAIN_BACKWARDS:
    raise ValueError(f"unknown train_backward {order!r}: one of {TRAIN_BACKWARDS}")
  if order != "auto":
    return order
  return "neuron_major_fused" if d_model <= FUSED_BACKWARD_MAX_D_MODEL else "neuron_major"


@dataclasses.dataclass(frozen=True)
class SparseFFNConfig:
  """Static capacities of the sparse formats and the Pallas backend's dispatch lines. ``None``
  fields are derived from the token count M. A run sets every field as ``model.sparse.<field>``
  (``sparse_jax.config``); docs/method.md explains the formats and the dispatch.

  tile, twell_capacity: TwELL (inference) tile width and slots per (row, tile).
  overflow_capacity: (XLA reference) rows whose TwELL tile overflowed that one call recomputes
    exactly on a dense row path; more than this and the whole call runs dense (default: M / 256,
    at least 16). The Pallas kernels need no such budget: they recompute overflowed tiles in place.
  ell_width, tail_capacity: Hybrid (training) ELL width per row and dense-tail rows (default M / 8).
  max_active_fraction: the Pallas backend's dispatcher runs the dense FFN when the estimated
    fraction of active gate neurons exceeds this (None: always sparse). Set from the FFN benchmark
    (H200, paper shape: ~56 of 5632 active per token, 0.0100-0.0104, ran 0.93-1.03x of dense
    sparse, so the line is at ~51), for d_model <= 2048; wider models run dense in mode "auto"
    (``pallas_backend.auto_runs_dense``).
  max_active_fraction_train: the same line for a training call (forward + backward under
    ``jax.grad``), where the sparse path stops paying earlier; None uses ``max_active_fraction``.
    With ``max_active_fraction=None`` both are off (always sparse).
  entry_capacity: (Pallas training) active entries of one call that the sparse weight gradients
    can hold (default: 1.25x the dispatcher's threshold density, M x d_ff x fraction). A call
    with more entries than this runs its backward on the exact dense path and says so in
    ``FFNStats.dense_fallback``.
  mode: how a call picks its path, a static choice (``sparse_jax.ops.modes``):
    "auto": the backend decides per call on device (the Pallas dispatcher's gate probe and
      ``lax.cond``, forward and backward);
    "sparse": the sparse kernels with no conditional around them; rare overflows are corrected
      exactly by a conditional that holds only XLA ops;
    "dense": the plain XLA dense FFN and its ``jax.grad`` (what a dense model runs), with the
      L1 term and the statistics; any backend, no custom VJP.
    A training loop sets it per layer from its own measurements (``sparse_jax.train.dispatch``).
  overflow_fallback: what a training call in mode "sparse" does on the rare overflow that needs
    the dense backward (more overflowed rows than the row budget, or more entries than the
    weight gradients' lists hold):
    "cond" (default): takes it, under a ``lax.cond``; exact on every call. A conditional makes
      the host wait for the device (XLA copies its predicate to the host), so the host cannot
      queue work ahead: measured ~0.3 ms per training call on an H200
      (experiments/trace_train_step.py).
    "defer": no conditional anywhere in the call (overflowed rows within the budget are always
      corrected on a fixed-size dense row path); a call that needed the dense backward returns
      inexact gradients and says so in ``FFNStats.dense_fallback``. The caller redoes such a
      step with "cond": the training loop does (``sparse_jax.train.loop``, one host read of
      the flag per step). Other modes ignore it.
  train_backward: how the Pallas training path's sparse backward walks the entries (same
    gradients, different kernels; ``pallas_kernels/NOTES_train.md``):
    "auto" (default): "neuron_major_fused" up to d_model 2048 (``FUSED_BACKWARD_MAX_D_MODEL``,
      where it was measured), "neuron_major" above (``resolve_train_backward``).
    "neuron_major": a pass by neuron (``twell_wgrad.neuron_major_pass``) forms
      a = dOut_i . Wd[j] and dWd from one dOut row per entry, the neuron's Wd row held in
      registers; dU and dR per entry are scattered to the slots; the per-token kernel then
      gathers only the Wu and Wg rows (``twell_backward.dx_kernel``) and the dWg / dWu pass
      reads only x rows: 4 KB less per entry. H200, paper FFN at M = 16384, side by side:
      1.05-1.06x of token_major at ~28 active/token (uniform, heavy tail), 0.99-1.02x at ~11
      and on skewed ~28 (noise), peak 0.94x, gradient errors equal or lower
      (``experiments/results/bench_ffn_train_neuron_major*_h200.json``).
    "neuron_major_fused": the same with the pass over whole d_model rows (no slices), so it
      finishes each entry's dU and dR itself, reading P and R at the slot: no XLA glue (gathers,
      per-entry math, the slot scatter and its zero fill) between the pass and the dx kernel,
      but dOut is read whole-row (64 MB at M = 16384, d_model 2048: more than the L2).
      H200, paper FFN at M = 16384, side by side with neuron_major: 1.09x (uniform ~28),
      1.00x (skewed), 1.02x (heavy tail); the 2b training step the same speed (+37.2% vs
      +36.6% over dense) at 40.1 instead of 46.6 GB of peak (``experiments/results/
      bench_ffn_train_fused_h200.json``, ``bench_model_2b_train_*loss_chunk_h200.json``).
    "token_major": one kernel per token forms a, dU and dR for each entry and accumulates dx
      (three weight rows gathered per entry); then the weight gradients (x and dOut rows
      gathered per entry, by neuron). The previous default.
  decode_max_tokens: calls of at most this many tokens (generation: batch x new tokens) are in
    the decode regime, where the batched kernels (128-row tiles, a warp per token) do not pay;
    there ``decode_path`` decides. 0 turns the regime off (every call goes to the backend).
  decode_path: what an inference call in the decode regime runs. "dense" (default): the plain
    dense FFN, no probe, no conditional (the Pallas backend's inference primal in mode "auto";
    training calls and mode "sparse" keep the kernels). "kernel": the decode kernels
    (``pallas_kernels/twell_decode.py`` through ``sparse_jax.ops.decode.kernel_forward``; Pallas
    backend, inference primal, mode "auto", up to 256 tokens): the gate streamed by every SM and
    the up/down projections only for 64-neuron tiles where a token fires; exact, no capacity, no
    conditional. "union" (with ``implementation=None``): ``sparse_jax.ops.decode``, one
    gate GEMM and the union of the batch's active neurons gathered once from Wu and Wd, where the
    union capacity pays (``decode_max_union_fraction``). "dense" is the default because the union
    path measured slower than dense generation on an H200 (0.5b, batch 1 / 8: 0.85x / 0.77x of
    dense tokens/s, experiments/results/bench_decode_quick_h200.json): at a few tokens per call
    its extra launches cost more than the weight bytes it saves.
  decode_density: the per-token active fraction that sizes the decode path's union capacity U
    (measure it: ``sparse_jax.calibrate.measure_activity`` or the FFN statistics).
  decode_union_capacity: U itself (neurons; None: derived from M and ``decode_density``). A call
    whose union exceeds U runs dense (exact) and says so in ``FFNStats.dense_fallback``.
  decode_max_union_fraction: the union path is taken only if U <= this x d_ff: each union row of
    Wu and Wd is read three times (gather read and write, GEMM read), so the union pays below
    ~d_ff / 3 and clearly below d_ff / 4.
  decode_gate_split: the decode kernels' ``DecodeConfig.gate_split`` (CTAs streaming each
    64-neuron tile's gate, each over a slice of d_model; it must divide d_model / tile_k), for
    measuring it end to end; None: the kernels' default for the shape.
  gate_threshold: FATReLU gate (``sparse_jax.ops.dense.gate_activation``): a neuron is active iff
    its gate pre-activation exceeds this, with the pre-activation as its value (0: ReLU). The XLA
    reference, the dense path and the decode path compute it exactly; the Pallas kernels and the
    hot/cold split take only 0.
  """

  tile: int = twell.DEFAULT_TILE
  twell_capacity: int = twell.DEFAULT_CAPACITY
  overflow_capacity: int | None = None
  ell_width: int = hybrid.DEFAULT_WIDTH
  tail_capacity: int | None = None
  max_active_fraction: float | None = 0.009
  max_active_fraction_train: float | None = 0.0085
  entry_capacity: int | None = None
  mode: str = "auto"
  overflow_fallback: str = "cond"
  decode_max_tokens: int = 256
  decode_path: str = "dense"
  decode_density: float = 0.01
  decode_union_capacity: int | None = None
  decode_max_union_fraction: float = 0.25
  decode_gate_split: int | None = None
  gate_threshold: float = 0.0
  train_backward: str = "auto"

  def __post_init__(self):
    for name in ("tile", "twell_capacity", "ell_width"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"SparseFFNConfig.{name} must be a positive int, got {v!r}")
    if not isinstance(self.decode_max_tokens, int) or self.decode_max_tokens < 0:
      raise ValueError(f"SparseFFNConfig.decode_max_tokens must be an int >= 0, got "
                       f"{self.decode_max_tokens!r}")
    if self.decode_path not in DECODE_PATHS:
      raise ValueError(f"SparseFFNConfig.decode_path must be one of {DECODE_PATHS}, got "
                       f"{self.decode_path!r}")
    for name in ("decode_density", "decode_max_union_fraction"):
      v = getattr(self, name)
      if not 0.0 < v <= 1.0:
        raise ValueError(f"SparseFFNConfig.{name} must be in (0, 1], got {v!r}")
    for name in ("overflow_capacity", "tail_capacity", "entry_capacity", "decode_union_capacity",
                 "decode_gate_split"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"SparseFFNConfig.{name} must be None or a positive int, got {v!r}")
    for name in ("max_active_fraction", "max_active_fraction_train"):
      v = getattr(self, name)
      if v is not None and not 0.0 < v <= 1.0:
        raise ValueError(f"SparseFFNConfig.{name} must be None or in (0, 1], got {v!r}")
    if not (isinstance(self.gate_threshold, (int, float)) and self.gate_threshold >= 0):
      raise ValueError(f"SparseFFNConfig.gate_threshold must be a number >= 0, got "
                       f"{self.gate_threshold!r}")
    if self.mode not in MODES:
      raise ValueError(f"SparseFFNConfig.mode must be one of {MODES}, got {self.mode!r}")
    if self.overflow_fallback not in OVERFLOW_FALLBACKS:
      raise ValueError(f"SparseFFNConfig.overflow_fallback must be one of {OVERFLOW_FALLBACKS}, "
                       f"got {self.overflow_fallback!r}")
    if self.train_backward not in TRAIN_BACKWARDS:
      raise ValueError(f"SparseFFNConfig.train_backward must be one of {TRAIN_BACKWARDS}, got "
                       f"{self.train_backward!r}")
    if self.twell_capacity > self.tile:
      raise ValueError(f"twell_capacity ({self.twell_capacity}) cannot exceed tile ({self.tile})")

  @property
  def defers_overflow(self) -> bool:
    """A training call holds no conditional and flags the rare overflow instead of taking the
    dense backward (``overflow_fallback="defer"`` in mode "sparse")."""
    return self.mode == "sparse" and self.overflow_fallback == "defer"

  def overflow_rows_for(self, m: int) -> int:
    return min(m, self.overflow_capacity or max(16, -(-m // 256)))

  def tail_rows_for(self, m: int) -> int:
    return min(m, self.tail_capacity or hybrid.default_tail_capacity(m))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FFNStats:
  """Statistics of one sparse FFN call.

  l0: mean number of active hidden neurons per token (no gradient).
  l1: mean |h| over tokens and hidden neurons (the paper's normalisation); carries a gradient, so
    ``loss + coeff * l1`` trains the sparsity. The release's normalisation (sum over neurons, mean
    over tokens) is ``l1 * d_ff``.
  overflow_rows: rows (tokens) whose sparse encoding overflowed its capacity in this call; they
    were computed on an exact fallback path, never dropped.
  dense_fallback: the whole call ran on the dense path (too many overflowed rows for the row
    fallback, or the dispatcher judged the activations too dense for the sparse kernels). With
    ``SparseFFNConfig.defers_overflow`` it means the call needed the dense backward and did not
    take it: its gradients are inexact and the step must be redone with "cond". Under a
    device mesh (``sparse_jax.parallel``) each device decides for itself and the model reports
    the float share of devices that ran dense.
  active_per_neuron: [d_ff] int32, tokens of this call on which each hidden neuron was active
    (dead-neuron tracking, per-neuron firing frequencies).
  """

  l0: jax.Array
  l1: jax.Array
  overflow_rows: jax.Array
  dense_fallback: jax.Array
  active_per_neuron: jax.Array


def make_stats(*, l0, l1, active_per_neuron, overflow_rows=0, dense_fallback=False) -> FFNStats:
  """The one constructor of ``FFNStats``: every implementation builds its statistics here, so the
  dtypes agree (l0, l1 f32; counts int32). ``dense_fallback`` keeps a float dtype (the share of
  devices that ran dense, ``sparse_jax.parallel``) and is a bool otherwise."""
  fallback = jnp.asarray(dense_fallback)
  if not jnp.issubdtype(fallback.dtype, jnp.floating):
    fallback = fallback.astype(bool)
  return FFNStats(l0=jnp.asarray(l0, F32), l1=jnp.asarray(l1, F32),
                  overflow_rows=jnp.asarray(overflow_rows, jnp.int32), dense_fallback=fallback,
                  active_per_neuron=jnp.asarray(active_per_neuron, jnp.int32))


def stats_from_active(active_MxN: jax.Array, l1, *, overflow_rows=0,
                      dense_fallback=False) -> FFNStats:
  """FFNStats from a dense [M, d_ff] mask of active neurons and the call's L1 (mean |h|)."""
  m = active_MxN.shape[0]
  return make_stats(l0=jnp.sum(active_MxN, dtype=jnp.int32) / m, l1=l1,
                    overflow_rows=overflow_rows, dense_fallback=dense_fallback,
                    active_per_neuron=jnp.sum(active_MxN, axis=0, dtype=jnp.int32))


# --------------------------------------------------------------------------- argument checks


def _check_array(name: str, a, ndim: int | None = None) -> None:
  if not hasattr(a, "shape") or not hasattr(a, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(a).__name__}")
  if ndim is not None and a.ndim != ndim:
    raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
  if not any(jnp.dtype(a.dtype) == jnp.dtype(d) for d in FLOAT_DTYPES):
    raise TypeError(f"{name} must be float32, bfloat16 or float16, got {a.dtype}")


def check_weights(x, named_weights: list[tuple[str, jax.Array]]) -> None:
  """Raises a ValueError/TypeError naming the bad argument: x [..., d_model], weights
  [d_ff, d_model] (neuron-major, one dtype with x)."""
  _check_array("x", x)
  if x.ndim < 1:
    raise ValueError("x must have a feature axis: shape [..., d_model]")
  d_model = x.shape[-1]
  if x.size == 0:
    raise ValueError(f"x has no tokens (shape {tuple(x.shape)})")
  d_ff = None
  for name, w in named_weights:
    _check_array(name, w, ndim=2)
    if w.shape[1] != d_model:
      hint = ""
      if w.shape[0] == d_model:
        hint = (f" It looks like the [d_model, d_ff] layout; sparse_jax weights are neuron-major "
                f"[d_ff, d_model]: pass {name}.T.")
      raise ValueError(f"{name} must have shape [d_ff, d_model={d_model}] (one row per hidden "
                       f"neuron), got {tuple(w.shape)}.{hint}")
    if d_ff is None:
      d_ff = w.shape[0]
    elif w.shape[0] != d_ff:
      raise ValueError(f"{name} has d_ff={w.shape[0]} rows but {named_weights[0][0]} has {d_ff}")
    if jnp.dtype(w.dtype) != jnp.dtype(x.dtype):
      raise TypeError(f"{name} has dtype {w.dtype} but x has {x.dtype}; cast them to one compute "
                      "dtype (e.g. bf16 weights and activations, f32 master weights outside)")
