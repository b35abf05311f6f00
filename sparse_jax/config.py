"""One config object for a training run: model, data and training settings, presets, overrides.

Presets (``get_config(name)``):

* ``tiny``: CPU tests and the README's main job (d_model 128, 2 layers, ~0.5M params).
* ``small``: ~25M parameters (d_model 512, 8 layers, 8 heads, d_ff 1408), a short GPU run.
* ``base``: ~125M parameters (d_model 768, 12 layers, 12 heads, d_ff 2112, vocab 49152).
* ``0.5b``, ``1b``, ``1.5b``, ``2b``: the paper's models (d_model 2048, d_ff 5632, 32 heads of 64,
  8/18/28/38 layers, vocab 49152, tied embeddings) with its optimiser settings.

Every preset trains on all local devices (``parallel.mesh=auto``: data parallel); see
``ParallelConfig`` for FSDP meshes and several hosts.

Every field can be overridden with ``section.field=value`` strings (``apply_overrides``), e.g.
``model.n_layers=4 train.lr=3e-4 data.source=/data/fineweb/*.parquet``; values are parsed by the
field's type and checked by the dataclasses, so a bad value names the field it belongs to. Nested
sections take one more dot: ``model.sparse.twell_capacity=64`` sets a field of the sparse op's
``SparseFFNConfig``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from sparse_jax.ops.base import OVERFLOW_FALLBACKS, SparseFFNConfig

FFN_KINDS = ("relu_sparse", "relu_nongated_sparse", "relu_dense", "silu_dense", "relu_dense_bf16")
FFN_IMPLS = ("auto", "xla", "pallas")
REMAT_POLICIES = ("keep_sparse_ffn", "recompute_all")   # ModelConfig.remat_policy
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
L1_NORMS = ("mean", "sum_neurons")


def _require(ok: bool, field: str, value: Any, why: str) -> None:
  if not ok:
    raise ValueError(f"{field}={value!r}: {why}")


def _positive_ints(obj, section: str, names: tuple[str, ...]) -> None:
  for name in names:
    v = getattr(obj, name)
    _require(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{section}.{name}", v,
             "must be a positive integer")


def _choice(obj, section: str, name: str, choices: tuple[str, ...]) -> None:
  v = getattr(obj, name)
  _require(v in choices, f"{section}.{name}", v, f"must be one of {', '.join(choices)}")


def _check_hot_neurons(cfg) -> None:
  hot = cfg.sparse_hot_neurons
  if hot is None:
    return
  ok = isinstance(hot, (list, tuple)) and len(hot) == cfg.n_layers and all(
      isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= cfg.d_ff for n in hot)
  _require(ok, "model.sparse_hot_neurons", hot,
           f"must be none or one integer in [0, d_ff={cfg.d_ff}] per layer ({cfg.n_layers})")
  object.__setattr__(cfg, "sparse_hot_neurons", tuple(hot))  # JSON gives a list


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-style decoder: tied embeddings, RMSNorm, RoPE, causal MHA/GQA, a chosen FFN.

  d_model: width of the residual stream.
  n_layers: transformer blocks.
  n_heads: attention (query) heads.
  d_ff: FFN hidden width (neurons per layer).
  rope_theta: RoPE base frequency.
  norm_eps: RMSNorm epsilon.
  compute_dtype: dtype of activations and matmuls (parameters are cast to it at use).
  param_dtype: dtype of the stored (master) parameters.
  remat: recompute each block's activations in the backward pass (less memory, more compute).
  remat_policy: what a rematerialised block keeps. "keep_sparse_ffn" (default): the sparse
    FFN op's residuals (the packed gate, R and the weight gradients' entry lists, a few percent
    of a dense FFN's activations), so the backward pass does not run the op's forward kernels a
    second time; everything else is recomputed. "recompute_all": nothing is kept (the FFN's
    forward runs twice, as a dense FFN's does under remat).
  vocab_size: None takes the tokenizer's vocabulary rounded up to a multiple of 128; an explicit
    value must be at least the tokenizer's.
  n_kv_heads: None means full multi-head attention; fewer (dividing n_heads) is grouped-query.
  head_dim: None means d_model // n_heads.
  ffn: relu_sparse (the paper's ReLU-gated FFN through sparse_jax.ops), relu_nongated_sparse
    (relu(x Wu) Wd through sparse_jax.ops), relu_dense and silu_dense (dense gated baselines),
    relu_dense_bf16 (relu_dense with every matmul output in the compute dtype, as a bf16 model
    computes it: the benchmarks' dense baseline; same parameters as relu_dense).
  ffn_impl: sparse op backend; auto picks the fastest that can run (Pallas on Hopper, else XLA).
  attention_impl: auto uses cuDNN flash attention on a GPU with 16-bit compute, else XLA.
  sparse: the sparse op's capacities and dispatch lines (``sparse_jax.ops.SparseFFNConfig``), set
    as ``model.sparse.<field>``. ``sparse.ell_width`` is the Hybrid-format ELL width in training:
    rows with more active neurons go to the dense tail. Early in training (before L1 bites) most
    rows are long; the op stays exact. (Run directories before this section had
    ``model.sparse_ell_width``; ``Config.from_dict`` maps it.)
  tie_embeddings: False gives the model its own output head (``lm_head_VxD``), as imported
    Llama 2/3 checkpoints have.
  rope_scaling: none, linear, llama3 or yarn, computed as transformers does (``sparse_jax.nn.rope``)
    from the rope_* fields below.
  rope_factor: the scaling factor (linear, llama3, yarn); at least 1 when scaling.
  rope_original_max_len: llama3 and yarn: the context before scaling.
  rope_low_freq_factor: llama3: wavelengths longer than original_max_len / this are scaled fully.
  rope_high_freq_factor: llama3: wavelengths shorter than original_max_len / this are kept.
  rope_beta_fast: yarn: the fast boundary of the frequency ramp (rotations).
  rope_beta_slow: yarn: the slow boundary of the frequency ramp (rotations).
  rope_truncate: yarn: round the ramp's boundaries to whole dimensions, as transformers does.
  rope_attention_factor: yarn: cos and sin are multiplied by it (attention temperature).
  gate_threshold: the ReLU FFNs' gate is FATReLU: a neuron is active iff its pre-activation is
    above the threshold, and then its value is the pre-activation itself (0: plain ReLU). It is
    the op's ``sparse.gate_threshold``: setting either sets both (they may not differ).
  sliding_window: each position attends to at most this many positions (itself included), as
    Mistral's sliding-window attention; None: the whole causal context.
  sparse_hot_neurons: per layer, the first n neurons run dense and the rest sparse
    (``sparse_jax.ops.hotcold``; set by ``sparse-jax prepare-inference``); none: the plain op.
  """

  vocab_size: int | None = None
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int | None = None
  head_dim: int | None = None
  d_ff: int = 352
  ffn: str = "relu_sparse"
  ffn_impl: str = "auto"
  attention_impl: str = "auto"
  rope_theta: float = 1e5
  norm_eps: float = 1e-6
  compute_dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "keep_sparse_ffn"
  sparse: SparseFFNConfig = SparseFFNConfig()
  # Issue 14: per layer, the first n neurons are computed densely and the rest sparsely
  # (sparse_jax.ops.hotcold); set by `sparse-jax prepare-inference`, whose checkpoint has its
  # neurons permuted hottest first. None: the plain sparse op in every layer.
  sparse_hot_neurons: tuple[int, ...] | None = None
  tie_embeddings: bool = True
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_original_max_len: int | None = None
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_truncate: bool = True
  rope_attention_factor: float = 1.0
  gate_threshold: float = 0.0
  sliding_window: int | None = None

  def __post_init__(self):
    _positive_ints(self, "model", ("d_model", "n_layers", "n_heads", "d_ff"))
    _require(isinstance(self.sparse, SparseFFNConfig), "model.sparse", self.sparse,
             "must be a sparse_jax.ops.SparseFFNConfig")
    for name in ("vocab_size", "n_kv_heads", "head_dim", "rope_original_max_len",
                 "sliding_window"):
      v = getattr(self, name)
      _require(v is None or (isinstance(v, int) and v > 0), f"model.{name}", v,
               "must be a positive integer or none")
    _require(self.n_heads % self.kv_heads == 0, "model.n_kv_heads", self.n_kv_heads,
             f"must divide n_heads={self.n_heads} (grouped-query attention)")
    _require(self.head_dim is not None or self.d_model % self.n_heads == 0, "model.n_heads",
             self.n_heads, f"must divide d_model={self.d_model} (or set model.head_dim)")
    _require(self.attn_head_dim % 2 == 0, "model.head_dim", self.attn_head_dim,
             "must be even (RoPE rotates pairs of features)")
    _choice(self, "model", "ffn", FFN_KINDS)
    _choice(self, "model", "ffn_impl", FFN_IMPLS)
    _choice(self, "model", "remat_policy", REMAT_POLICIES)
    _choice(self, "model", "attention_impl", ATTENTION_IMPLS)
    _choice(self, "model", "compute_dtype", DTYPES)
    _choice(self, "model", "param_dtype", DTYPES)
    _require(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "must be positive")
    _check_hot_neurons(self)
    _require(0 < self.norm_eps < 1, "model.norm_eps", self.norm_eps, "must be in (0, 1)")
    _choice(self, "model", "rope_scaling", ROPE_SCALINGS)
    if self.rope_scaling != "none":
      _require(self.rope_factor >= 1, "model.rope_factor", self.rope_factor,
               f"must be at least 1 with rope_scaling={self.rope_scaling}")
    if self.rope_scaling in ("llama3", "yarn"):
      _require(self.rope_original_max_len is not None, "model.rope_original_max_len", None,
               f"rope_scaling={self.rope_scaling} needs the pre-scaling context length")
    if self.rope_scaling == "llama3":
      _require(0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
               "model.rope_high_freq_factor", self.rope_high_freq_factor,
               f"must exceed rope_low_freq_factor={self.rope_low_freq_factor} > 0")
    if self.rope_scaling == "yarn":
      _require(self.rope_beta_fast > 0 and self.rope_beta_slow > 0, "model.rope_beta_fast",
               (self.rope_beta_fast, self.rope_beta_slow), "beta_fast and beta_slow must be > 0")
    _require(self.rope_attention_factor > 0, "model.rope_attention_factor",
             self.rope_attention_factor, "must be positive")
    _require(self.rope_scaling == "yarn" or self.rope_attention_factor == 1,
             "model.rope_attention_factor", self.rope_attention_factor,
             "only yarn scales cos and sin")
    _require(self.gate_threshold >= 0, "model.gate_threshold", self.gate_threshold,
             "must be >= 0 (FATReLU: active iff the pre-activation exceeds it)")
    # One threshold: model.gate_threshold is the op's sparse.gate_threshold (either may be set).
    op_threshold = self.sparse.gate_threshold
    _require(self.gate_threshold == 0 or op_threshold in (0, self.gate_threshold),
             "model.sparse.gate_threshold", op_threshold,
             f"must equal model.gate_threshold={self.gate_threshold} (or be left at 0)")
    if op_threshold != self.gate_threshold:
      threshold = max(op_threshold, self.gate_threshold)
      object.__setattr__(self, "gate_threshold", threshold)
      object.__setattr__(self, "sparse",
                         dataclasses.replace(self.sparse, gate_threshold=threshold))
    _require(self.gate_threshold == 0 or self.ffn != "silu_dense", "model.gate_threshold",
             self.gate_threshold, "applies to the ReLU FFNs, not silu_dense")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def attn_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  def resolve_vocab(self, tokenizer_vocab: int) -> "ModelConfig":
    """This config with vocab_size fixed for a tokenizer of ``tokenizer_vocab`` ids."""
    if self.vocab_size is None:
      return dataclasses.replace(self, vocab_size=-(-tokenizer_vocab // 128) * 128)
    if self.vocab_size < tokenizer_vocab:
      raise ValueError(f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's "
                       f"vocabulary ({tokenizer_vocab} ids); raise it or set it to none")
    return self


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it becomes fixed-length training sequences.

  source: "stdlib" (the running interpreter's standard-library *.py files, no download),
    "stdlib-prose" (English prose from the standard library, no download: the docstrings of its
    non-test modules, read with ast, and the pydoc topic texts of pydoc_data/topics.py), local
    files or globs separated by commas (.txt/.md/.py/... one document per file, .jsonl one per
    line, .parquet one per row), or "hf:NAME[:CONFIG]" for a Hugging Face dataset (needs the
    ``datasets`` package and a network; the first max_docs documents are used), or a directory
    of token shards made by ``sparse-jax prepare-data`` (read from disk; its manifest then fixes
    the tokenizer, the documents and the validation split).
  tokenizer: "bytes" (256 byte ids + specials) or the path of a Hugging Face tokenizer.json.
  seq_len: tokens per training sequence (each example holds seq_len + 1 tokens: inputs, targets).
  val_fraction: share of the tokens, whole documents in shuffled order, held out for validation.
  text_field: the field (JSONL, Hugging Face) or column (Parquet) that holds the text.
  max_docs: use at most this many documents (none: all; required for hf: sources).
  hf_split: the split of an hf: dataset.
  seed: seed of the document order and of the per-epoch permutation of training examples.
  bad_files: a data file that is not UTF-8 text (binary, another encoding) is refused naming it
    ("error") or left out with a count ("skip").
  """

  source: str = "stdlib"
  tokenizer: str = "bytes"
  text_field: str = "text"
  seq_len: int = 128
  val_fraction: float = 0.02
  max_docs: int | None = None
  hf_split: str = "train"
  seed: int = 0
  bad_files: str = "error"

  def __post_init__(self):
    _positive_ints(self, "data", ("seq_len",))
    _choice(self, "data", "bad_files", ("error", "skip"))
    _require(isinstance(self.source, str) and self.source.strip() != "", "data.source",
             self.source, "must name a corpus")
    _require(0.0 < self.val_fraction < 0.5, "data.val_fraction", self.val_fraction,
             "must be in (0, 0.5)")
    _require(self.max_docs is None or self.max_docs > 0, "data.max_docs", self.max_docs,
             "must be a positive integer or none")


DISPATCH_KINDS = ("auto", "device", "auto_host", "sparse", "dense")   # sparse_jax.train.dispatch.KINDS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimiser, schedule, sparsity penalty, logging and checkpointing.

  batch_size: sequences per optimiser step (global), split into grad_accum micro-batches.
  lr: peak learning rate, reached after warmup_steps, then cosine decay to lr * min_lr_ratio at
    ``steps``.
  l1_coeff / l1_norm: the sparsity penalty ``coeff * L1``. l1_norm="mean" is the paper's formula
    (mean |h| over tokens and neurons, averaged over layers); "sum_neurons" is the released code's
    (sum over the d_ff neurons, mean over tokens, mean over layers) = d_ff x the "mean" value. The
    released checkpoints' 2e-5 is a "sum_neurons" coefficient (= 2e-5 * d_ff in "mean").
  l1_warmup_steps: the coefficient ramps linearly from 0 over these steps (0: full from step 0).
  dead_window: steps over which a neuron that never fires is counted dead; reinit_dead
    re-draws the gate rows of dead neurons at the end of every window.
  max_minutes: stop (and save) after this much wall time even if ``steps`` is not reached.
  steps: optimiser steps of the run (the end of the learning-rate schedule).
  grad_accum: micro-batches per step (gradients averaged over them; must divide batch_size).
  min_lr_ratio: the final learning rate as a share of lr.
  warmup_steps: steps of linear learning-rate warmup from 0.
  b1 / b2 / eps: AdamW's moment decays and epsilon.
  weight_decay: AdamW's decoupled weight decay.
  grad_clip: the global gradient norm is clipped to this.
  l0_ema_decay: decay of the per-layer EMA of active neurons per token (l0_ema_L).
  reinit_dead: re-draw the gate rows of the neurons dead over a whole dead_window at its end.
  seed: seed of the initial parameters and of dead-neuron re-initialisation.
  log_every: steps per train record (its metrics are averages over those steps).
  eval_every: steps between validation evaluations.
  eval_batches: validation batches per evaluation.
  ckpt_every: steps between checkpoints.
  keep_checkpoints: how many of the latest checkpoints are kept.
  tensorboard: write TensorBoard event files into the run directory (sparse_jax.train.tracking).
  wandb: also log to Weights & Biases (needs the wandb package and a login).
  wandb_project: the W&B project (none: "sparse-jax").
  dispatch: how each sparse FFN layer picks sparse or dense (``sparse_jax.train.dispatch``):
    "auto_host" (the loop decides per layer from the EMA of active neurons and the op's fallbacks,
    with hysteresis, every dispatch_every steps; one compiled step per pattern), "device" (the op
    decides per call on device: a probe and ``lax.cond``, whose dense branch measured 0.6-0.8x of
    a dense model's FFN), "sparse" / "dense" (every layer, fixed), "auto" (the default:
    "auto_host" for a sparse model.ffn on the Hopper kernels, "device" otherwise, where there is
    nothing to decide).
  dispatch_every: steps between "auto_host"'s per-layer decisions.
  dispatch_sparse_below / dispatch_dense_above: "auto_host"'s hysteresis, as active fractions of
    d_ff at >= 16384 tokens per call (scaled by sqrt(tokens / 16384) below): a dense layer goes
    sparse below the first, a sparse layer goes dense above the second.
  dispatch_compile_ahead: "auto_host" compiles the likely next pattern's step in a background
    thread, so a switch does not stall the run on compilation.
  hot_cold: with "auto_host", the hot/cold split in training: at each decision every sparse layer
    gets the split ``sparse_jax.ops.hotcold.plan_layer`` chooses from the decision step's
    per-neuron counts (its hottest neurons computed densely, forward and backward, the rest
    through the sparse op), its neurons reordered in the parameters, both AdamW moments and the
    tracker (``train/neuron_order.py``: the function and the optimisation are unchanged).
  hot_cold_round_to: the split's granularity (n_hot is a multiple of it, or all of d_ff).
  loss_chunk: the cross-entropy forms the fp32 logits this many positions of the sequence at a
    time, its gradient with them (``train.loss.head_cross_entropy``): the whole batch's logits
    and their gradient (2 x tokens x vocab x 4 bytes) never exist at once. 256 (default):
    measured on an H200 (experiments/bench_loss.py, 8 x 2048 tokens, vocab 49152) 1.74x faster
    than the whole sequence at once and 0.88 instead of 6.64 GB of temporaries; a sequence it
    does not divide gets a shorter last chunk. 0: the whole sequence at once.
  nonfinite: a step with a non-finite loss or gradient never changes the weights; "stop" ends the
    run with an error there, "skip" goes on and counts the skipped steps.
  overflow_fallback: the layers "auto_host" (or "sparse") runs sparse take
    ``SparseFFNConfig.overflow_fallback`` from here. "defer" (default): no conditional in the
    step (a conditional makes the host wait for the device; measured 0.3 ms per FFN training
    call on an H200, and a conditional reserves memory for its dense branch); a step in which a
    layer needed the dense backward leaves the state unchanged and the loop redoes it with
    "cond" (exact: the run is the same as with "cond"). The loop reads that flag one step late,
    once the next step is queued (which gets the unread flag and keeps the state too if it is
    set; the loop then redoes the flagged step and reruns the next one), so the device never
    waits for the read (a log record of such a step is written then); steps that decide,
    evaluate or checkpoint have it read at once.
    "cond": the conditionals in every step.
  """

  steps: int = 600
  batch_size: int = 16
  grad_accum: int = 1
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 50
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  l1_coeff: float = 2e-3
  l1_norm: str = "sum_neurons"
  l1_warmup_steps: int = 0
  l0_ema_decay: float = 0.9
  dead_window: int = 100
  reinit_dead: bool = False
  seed: int = 0
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 8
  ckpt_every: int = 200
  keep_checkpoints: int = 2
  max_minutes: float | None = None
  dispatch: str = "auto"
  dispatch_every: int = 100
  dispatch_sparse_below: float = 0.0072
  dispatch_dense_above: float = 0.0085
  dispatch_compile_ahead: bool = True
  hot_cold: bool = False
  hot_cold_round_to: int = 128
  nonfinite: str = "stop"
  overflow_fallback: str = "defer"
  loss_chunk: int = 256
  tensorboard: bool = True
  wandb: bool = False
  wandb_project: str | None = None

  def __post_init__(self):
    _positive_ints(self, "train", ("steps", "batch_size", "grad_accum", "dead_window",
                                   "log_every", "eval_every", "eval_batches", "ckpt_every",
                                   "keep_checkpoints"))
    _require(self.batch_size % self.grad_accum == 0, "train.grad_accum", self.grad_accum,
             f"must divide batch_size={self.batch_size}")
    _require(0 < self.lr < float("inf"), "train.lr", self.lr, "must be positive and finite")
    _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio,
             "must be in [0, 1]")
    for name in ("warmup_steps", "l1_warmup_steps"):
      v = getattr(self, name)
      _require(isinstance(v, int) and v >= 0, f"train.{name}", v, "must be a non-negative integer")
    for name in ("b1", "b2", "l0_ema_decay"):
      v = getattr(self, name)
      _require(0 <= v < 1, f"train.{name}", v, "must be in [0, 1)")
    for name in ("eps", "grad_clip"):
      _require(getattr(self, name) > 0, f"train.{name}", getattr(self, name), "must be positive")
    for name in ("weight_decay", "l1_coeff"):
      _require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name),
               "must be non-negative")
    _choice(self, "train", "l1_norm", L1_NORMS)
    _choice(self, "train", "nonfinite", ("stop", "skip"))
    _choice(self, "train", "overflow_fallback", OVERFLOW_FALLBACKS)
    _require(self.max_minutes is None or self.max_minutes > 0, "train.max_minutes",
             self.max_minutes, "must be positive or none")
    _choice(self, "train", "dispatch", DISPATCH_KINDS)
    _positive_ints(self, "train", ("dispatch_every", "hot_cold_round_to"))
    _require(isinstance(self.loss_chunk, int) and not isinstance(self.loss_chunk, bool)
             and self.loss_chunk >= 0, "train.loss_chunk",
             self.loss_chunk, "must be a non-negative integer (0: the whole sequence)")
    _require(not self.hot_cold or self.dispatch in ("auto", "auto_host"), "train.hot_cold",
             self.hot_cold,
             f"needs train.dispatch=auto (the default) or auto_host (the loop decides the "
             f"split), got train.dispatch={self.dispatch}")
    _require(0 < self.dispatch_sparse_below < self.dispatch_dense_above <= 1,
             "train.dispatch_sparse_below", self.dispatch_sparse_below,
             f"must be in (0, dispatch_dense_above={self.dispatch_dense_above}) (hysteresis), "
             "dispatch_dense_above at most 1")


MESH_AXES = ("data", "fsdp")


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """``"data:2,fsdp:4"`` -> {"data": 2, "fsdp": 4}; ``"auto"`` -> {} (all devices on data).

  Axes are ``data`` (replicated parameters, batch split) and ``fsdp`` (parameters and optimiser
  state split too, batch split); an omitted axis has size 1. One size may be -1: the devices left.
  """
  where = f"parallel.mesh={spec!r}"
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"{where}: must be 'auto' or look like data:2,fsdp:4")
  if spec.strip().lower() == "auto":
    return {}
  sizes: dict[str, int] = {}
  for item in spec.split(","):
    name, sep, size = item.strip().partition(":")
    if name not in MESH_AXES:
      raise ValueError(f"{where}: unknown mesh axis {name!r}; the axes are "
                       f"{', '.join(MESH_AXES)} (e.g. data:2,fsdp:4)")
    if not sep or not size.strip().lstrip("-").isdigit():
      raise ValueError(f"{where}: {item.strip()!r} must be AXIS:SIZE with an integer size")
    if name in sizes:
      raise ValueError(f"{where}: axis {name!r} given twice")
    sizes[name] = int(size)
    if sizes[name] == 0 or sizes[name] < -1:
      raise ValueError(f"{where}: the size of {name!r} must be positive (or -1: the rest)")
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"{where}: only one axis can be -1")
  return sizes


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """The device mesh of a run (``sparse_jax.parallel``); it may change between a checkpoint and
  its resumption (orbax restores the state onto the new mesh).

  mesh: "auto" puts every device on the ``data`` axis (one device: plain single-device training);
    "data:2,fsdp:4" (any order, product = the number of devices of all hosts, one size may be -1)
    splits the batch over both axes and the parameters and AdamW moments over ``fsdp``.
  distributed: call ``jax.distributed.initialize`` first (several hosts, one process each). The
    coordinator and process ids come from the fields below, else from JAX's cluster detection
    (SLURM, Open MPI, ...) or the ``JAX_COORDINATOR_ADDRESS`` environment variable. The
    ``SPARSE_JAX_DISTRIBUTED=1`` environment variable has the same effect as true.
  coordinator_address: host:port of process 0 (none: detected or from the environment).
  num_processes: processes of a distributed run (none: detected).
  process_id: this process's index (none: detected).
  """

  mesh: str = "auto"
  distributed: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    parse_mesh_spec(self.mesh)
    _require(self.num_processes is None or self.num_processes > 0, "parallel.num_processes",
             self.num_processes, "must be a positive integer or none")
    _require(self.process_id is None or self.process_id >= 0, "parallel.process_id",
             self.process_id, "must be a non-negative integer or none")


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "tiny"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  parallel: ParallelConfig = ParallelConfig()

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Config":
    # Checkpoints from before the parallel section have none: they ran on the default mesh.
    # Those from before model.sparse had model.sparse_ell_width (the one field then settable).
    model = dict(d["model"])
    sparse = dict(model.pop("sparse", None) or {})
    if "sparse_ell_width" in model:
      sparse.setdefault("ell_width", model.pop("sparse_ell_width"))
    model["sparse"] = SparseFFNConfig(**sparse)
    return cls(name=d["name"], model=ModelConfig(**model), data=DataConfig(**d["data"]),
               train=TrainConfig(**d["train"]), parallel=ParallelConfig(**d.get("parallel", {})))


def _paper(n_layers: int) -> Config:
  # The paper's recipe; batch 512 x 2048 needs gradient accumulation on one GPU.
  return Config(
      model=ModelConfig(vocab_size=49152, d_model=2048, n_layers=n_layers, n_heads=32,
                        head_dim=64, d_ff=5632, remat=True),
      data=DataConfig(seq_len=2048, val_fraction=0.01),
      train=TrainConfig(steps=20000, batch_size=512, grad_accum=64, lr=1e-3, warmup_steps=600,
                        l1_coeff=2e-5, l1_norm="sum_neurons", log_every=10, eval_every=1000,
                        ckpt_every=1000, eval_batches=16))


PRESETS: dict[str, Config] = {
    "tiny": Config(),
    "small": Config(
        model=ModelConfig(d_model=512, n_layers=8, n_heads=8, d_ff=1408),
        data=DataConfig(seq_len=512),
        train=TrainConfig(steps=2000, batch_size=32, lr=1e-3, warmup_steps=200, l1_coeff=1e-4,
                          eval_every=500, ckpt_every=500)),
    "base": Config(
        model=ModelConfig(vocab_size=49152, d_model=768, n_layers=12, n_heads=12, d_ff=2112),
        data=DataConfig(seq_len=1024),
        train=TrainConfig(steps=10000, batch_size=64, lr=1e-3, warmup_steps=400, l1_coeff=2e-5,
                          eval_every=1000, ckpt_every=1000)),
    "0.5b": _paper(8),
    "1b": _paper(18),
    "1.5b": _paper(28),
    "2b": _paper(38),
}


def get_config(name: str) -> Config:
  if name not in PRESETS:
    raise ValueError(f"unknown config {name!r}; choose one of {', '.join(PRESETS)}")
  return dataclasses.replace(PRESETS[name], name=name)


def _field_types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _parse_value(text: str, typ: Any, where: str) -> Any:
  """Parses ``text`` as a value of the annotated type (int, float, bool, str, tuple[X, ...] as
  comma-separated values, or X | None)."""
  args = typing.get_args(typ)
  if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
    if type(None) in args and text.strip().lower() in ("none", "null"):
      return None
    (typ,) = [a for a in args if a is not type(None)]
  if typing.get_origin(typ) is tuple:  # tuple[int, ...]: comma-separated, e.g. 128,0,256
    elem = typing.get_args(typ)[0]
    return tuple(_parse_value(t, elem, where) for t in text.split(",") if t.strip())
  try:
    if typ is bool:
      low = text.strip().lower()
      if low in ("1", "true", "yes", "on"):
        return True
      if low in ("0", "false", "no", "off"):
        return False
      raise ValueError
    if typ is int:
      f = float(text)
      if not f.is_integer():
        raise ValueError
      return int(f)  # accepts 1e4 as well as 10000
    if typ is float:
      return float(text)
    if typ is str:
      return text
  except ValueError:
    raise ValueError(f"{where}={text!r}: expected {typ.__name__}") from None
  raise TypeError(f"{where}: cannot override a field of type {typ}")


# Override keys that were renamed: old scripts keep working.
RENAMED_KEYS = {"model.sparse_ell_width": "model.sparse.ell_width"}


def _replace_nested(obj, changes: dict[tuple[str, ...], Any]):
  """``obj`` with ``changes`` ({field path: value}) applied, innermost dataclasses first."""
  direct = {path[0]: v for path, v in changes.items() if len(path) == 1}
  nested: dict[str, dict[tuple[str, ...], Any]] = {}
  for path, v in changes.items():
    if len(path) > 1:
      nested.setdefault(path[0], {})[path[1:]] = v
  for name, sub in nested.items():
    direct[name] = _replace_nested(getattr(obj, name), sub)
  return dataclasses.replace(obj, **direct)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
  """``["model.n_layers=4", "train.lr=3e-4", "model.sparse.twell_capacity=64"]`` applied to
  ``cfg`` (a new, validated Config)."""
  sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "name"}
  changes: dict[tuple[str, ...], Any] = {}
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"override {item!r} must look like section.field=value")
    path, text = item.split("=", 1)
    path = RENAMED_KEYS.get(path.strip(), path.strip())
    section, *fields = path.split(".")
    if section not in sections or not fields:
      raise ValueError(f"override {item!r}: the key must be one of "
                       f"{', '.join(s + '.<field>' for s in sections)}")
    obj, where = getattr(cfg, section), section
    for i, field in enumerate(fields):
      types_ = _field_types(type(obj))
      if field not in types_:
        raise ValueError(f"override {item!r}: {where} has no field {field!r}; fields: "
                         f"{', '.join(types_)}")
      obj, where = getattr(obj, field), f"{where}.{field}"
      if i < len(fields) - 1 and not dataclasses.is_dataclass(obj):
        raise ValueError(f"override {item!r}: {where} is a value, not a section")
    changes[(section, *fields)] = _parse_value(text, types_[field], path)
  return _replace_nested(cfg, changes)
