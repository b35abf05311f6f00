"""Text generation with a KV cache: ragged prompt batches, greedy / temperature / top-k / top-p
sampling, per-row end tokens, unrolled or scanned layers, prefill and decode timed apart.

**Ragged prompts: left padding.** Prompts of different lengths are padded on the left to the
longest, P. All rows then write the same cache slot at every step (slot P + i for generated token
i), so the cache update is one ``dynamic_update_slice`` and the decode loop has no per-row
indexing; each row gets its own RoPE positions (slot - pad) and a key mask that hides its pad
slots. Pad tokens enter as zero vectors and attend only to themselves: a zero residual stream
stays exactly zero through every block (RMSNorm(0) = 0, no biases), so pads never fire an FFN
neuron and never reach a real token. A row therefore gets the tokens it would get alone, up to
summation order (the test checks greedy float32 tokens are equal).

**Layers: unrolled by default.** Each block runs over its own parameters (cast once per
``Generator`` to the compute dtype, which the blocks cast to at use anyway, so the numbers are
the same) with a ``[n_layers, B, S, K, H]`` KV cache. ``scan_layers=True`` stacks the blocks'
parameters (``[n_layers, ...]`` leaves) and runs one block's program under ``lax.scan``: the
program does not grow with depth (2b: compile 7-13 s), but XLA copies each layer's weight slices
before its Triton GEMM fusions read them (``loop_dynamic_slice_fusion`` in the optimized HLO,
``hlo/decode_ffn_scan_dense_b1_after_optimizations.txt``; cuBLAS GEMMs with
``xla_gpu_enable_dynamic_slice_fusion`` were no better: ``bench_decode_2b_cublas_dsf_h200.json``),
while the Pallas decode kernels read them in place. ``unroll_decode=True`` keeps the scanned
prefill and runs the decode step as a Python loop over static slices of the stacked leaves (the
slices are copied too). Blocks of different structure are always unrolled.

What the layout costs (2b, H200, prompt 128, experiments/results/): dense generation 316 / 3278 /
15509 tokens/s at batch 1 / 8 / 64 unrolled against 205 / 1394-1519 / 8656 scanned; compile 17-29 s
unrolled (dense) and 27-35 s (sparse: the Pallas kernels are lowered once per shape and
configuration, ``pallas_kernels.common.shared_lowering``; before that every layer compiled its
own and the sparse model took 207 s). ``bench_decode_2b_unrolled_shared_h200.json``,
``bench_decode_2b_unrolled_auto_b8_b64_h200.json``, ``bench_decode_2b_b1_b8_scan_h200.json``.

**Decode path.** With ``decode_path="auto"`` (default) on a Hopper GPU the sparse FFNs' decode
steps take the decode kernels at batch <= ``UNROLLED_KERNEL_MAX_BATCH`` (1) with unrolled layers
and the dense FFN above (kernels measured 1.18x / 1.00x / 0.95x of dense generation at batch
1 / 2 / 4, 0.96x at 8: with separate weights they only pay while few 64-neuron tiles are live),
and at every batch size with scanned layers; the prefill runs the dense FFN up to
``PREFILL_DENSE_MAX_TOKENS`` (8192) tokens, where the batched sparse path measured slower (11.9 vs
8.2 ms at 128 tokens, 20.8 vs 15.4 ms at 1024, 52.5 vs 46.0 ms at 2048; even at 8192). The paths
are static configuration in the blocks' graphdefs: one set per path, picked by the batch size of
each call.

**Sampling.** ``temperature=0`` is greedy (argmax). Otherwise the logits are divided by the
temperature and restricted to the ``top_k`` most likely tokens (0: no limit) and to the smallest
set of most likely tokens whose probability reaches ``top_p``; the most likely token always stays.
Step i draws with ``fold_in(key(seed), i)``. Temperature, top-k and top-p are traced, so one
compiled program serves every setting.

**End tokens.** A row that produces ``eos_id`` is finished: later positions hold ``pad_id``
(default ``eos_id``) and ``Generation.finished_B`` reports it; the decode loop (a
``lax.while_loop``) stops once every row is finished.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.nn.ffn import STATS_NAME
from sparse_jax.nn.model import Block, Transformer

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Generation:
  tokens_BxN: np.ndarray        # generated ids; after a row's end token, ``pad_id``
  lengths_B: np.ndarray         # generated tokens per row up to and including its end token
  finished_B: np.ndarray        # the row produced its end token
  prompt_lengths_B: np.ndarray
  # Mean active FFN neurons per token and layer: over the real prompt tokens (the prefill), and at
  # each decode step (step i feeds generated token i; at most N - 1 steps, fewer if all stopped).
  prompt_active_L: np.ndarray
  step_active_SxL: np.ndarray
  step_union_SxL: np.ndarray    # neurons active for at least one row at each decode step
  step_dense_fallback_SxL: np.ndarray  # the step's FFN ran its dense fallback (1.0) or not
  prefill_s: float              # wall time of the prefill (compiled), to the first tokens
  decode_s: float               # wall time of the decode loop (compiled)
  compile_s: float              # compile time of this call's programs (0 when already compiled)
  layers: str = "unrolled"      # the Generator's layer layout: "unrolled" or "scan"
  decode_path: str = "model"    # the sparse FFNs' decode steps ran: "kernel", "dense", or the
                                # model's own SparseFFNConfig.decode_path ("model")

  def row(self, b: int) -> list[int]:
    """Row b's generated ids up to and including its end token."""
    return [int(t) for t in self.tokens_BxN[b, :self.lengths_B[b]]]

  @property
  def prefill_tokens_per_s(self) -> float:
    return float(self.prompt_lengths_B.sum()) / self.prefill_s

  @property
  def decode_tokens_per_s(self) -> float:
    """Tokens out of the decode loop per second (every row of every step, finished or not)."""
    return self.tokens_BxN.shape[0] * len(self.step_active_SxL) / max(self.decode_s, 1e-12)


def check_sampling(temperature: float, top_p: float, top_k: int = 0) -> None:
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature!r}: must be >= 0 (0 is greedy decoding)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p!r}: must be in (0, 1]")
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k={top_k!r}: must be an int >= 0 (0 keeps every token)")


def sample_logits(logits_BxV: jax.Array, key: jax.Array, *, temperature, top_p, top_k=0
                  ) -> jax.Array:
  """One token per row: argmax if ``temperature == 0``, else temperature + top-k + top-p.

  The branch is a ``lax.cond`` on the (possibly traced) temperature: greedy decoding skips the
  vocabulary sort, which costs as much as a small model's decode step at large batch.
  """
  logits_BxV = logits_BxV.astype(F32)

  def greedy():
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def sample():
    scaled = logits_BxV / jnp.maximum(temperature, 1e-6)
    sorted_desc = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # A token stays if the tokens more likely than it hold less than top_p of the mass, and it
    # is among the top_k.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    rank_V = jnp.arange(sorted_desc.shape[-1])
    kept = (mass_before < top_p) & ((top_k <= 0) | (rank_V < top_k))[None, :]
    kept = kept.at[:, 0].set(True)
    n_kept_B = jnp.sum(kept, axis=-1)
    threshold_B = jnp.take_along_axis(sorted_desc, (n_kept_B - 1)[:, None], axis=-1)
    masked = jnp.where(scaled >= threshold_B, scaled, -jnp.inf)
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)

  return jax.lax.cond(jnp.asarray(temperature) == 0, greedy, sample)


# ------------------------------------------------------------------------------ one block


def _block_step(block: Block, x_BxTxD, k_LxBxSxKxH, v_LxBxSxKxH, layer, slot, pos_BxT,
                key_ok_BxS):
  """One block on T new tokens at cache slots slot..slot+T-1 (row b at positions ``pos_BxT``).

  Writes the new keys and values into layer ``layer`` of the stacked cache (only the T new
  slots: the cache is updated in place) and attends over that layer's slots up to each query,
  restricted to ``key_ok_BxS`` (a row's pad slots are not keys) plus the query's own slot, and
  to the attention's sliding window if it has one. RoPE (scaled or not) is the attention's own
  ``project``; the head (tied or not) is ``Transformer._logits``.
  """
  t = x_BxTxD.shape[1]
  attn = block.attn
  h_BxTxD = block.attn_norm(x_BxTxD)
  # Per-row RoPE positions through the attention's own projection.
  q, k, v = jax.vmap(lambda h_TxD, p_T: attn.project(h_TxD[None], p_T))(h_BxTxD, pos_BxT)
  q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = q[:, 0], k[:, 0], v[:, 0]
  at = (layer, 0, slot, 0, 0)
  k_LxBxSxKxH = jax.lax.dynamic_update_slice(k_LxBxSxKxH, k_BxTxKxH[None].astype(
      k_LxBxSxKxH.dtype), at)
  v_LxBxSxKxH = jax.lax.dynamic_update_slice(v_LxBxSxKxH, v_BxTxKxH[None].astype(
      v_LxBxSxKxH.dtype), at)
  k_BxSxKxH, v_BxSxKxH = k_LxBxSxKxH[layer], v_LxBxSxKxH[layer]
  s = k_BxSxKxH.shape[1]
  q_slot_T = slot + jnp.arange(t)
  slots_S = jnp.arange(s)
  causal_TxS = slots_S[None, :] <= q_slot_T[:, None]
  if attn.sliding_window is not None:
    # A row's positions are its slots less its (constant) pad count, so the window over positions
    # is the same window over slots: keys within sliding_window - 1 slots before the query.
    causal_TxS &= slots_S[None, :] > q_slot_T[:, None] - attn.sliding_window
  own_TxS = slots_S[None, :] == q_slot_T[:, None]
  mask_BxTxS = (causal_TxS[None] & key_ok_BxS[:, None, :]) | own_TxS[None]
  # XLA attention: cuDNN's fused kernel wants a causal flag or no mask, not a cache-length one.
  out_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH,
                                             mask=mask_BxTxS[:, None], implementation="xla")
  x_BxTxD = x_BxTxD + attn.output(out_BxTxNxH)
  x_BxTxD = x_BxTxD + block.ffn(block.ffn_norm(x_BxTxD))
  return x_BxTxD, k_LxBxSxKxH, v_LxBxSxKxH


def _captured_step(block, *args):
  """``_block_step`` and what its FFN sowed: [mean active neurons per token, neurons active for
  at least one token of the call (the batch's union), dense fallback (0/1)]."""
  out, inter = nnx.capture(_block_step, nnx.Intermediate)(block, *args)
  stats = nnx.to_pure_dict(inter)["ffn"][STATS_NAME][-1]
  union = jnp.sum(stats.active_per_neuron > 0, dtype=F32)
  return out, jnp.stack([stats.l0.astype(F32), union, jnp.asarray(stats.dense_fallback, F32)])


def _cast_weights(state, dtype):
  """Float leaves of >= 2 dimensions (the weight matrices) in the compute dtype: the modules
  cast them to it at use, so this changes no number, and each step reads them once, in 16 bits
  in a bf16 model. 1-D leaves (norm scales, used in f32) keep their dtype."""
  def cast(a):
    return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) and a.ndim >= 2 else a
  return jax.tree.map(cast, state)


# ------------------------------------------------------------------------------ programs


@dataclasses.dataclass(frozen=True)
class _Static:
  # The Transformer (for its embedding and head; its blocks' own state is passed along unused,
  # and jit drops unused arguments from the program).
  graphdef: object
  scan: bool                 # one block scanned over stacked parameters (all blocks share
                             # their graphdefs), else the blocks' own states unrolled
  block_graphdefs: tuple     # every block's graphdef at the decode steps
  prefill_graphdefs: tuple   # every block's graphdef at the prefill (their FFN configs may differ)
  n_layers: int
  unroll_decode: bool        # decode: a Python loop over the stacked layers instead of a scan
  n_ids: int
  cache_len: int
  max_new_tokens: int


def _layers(st: _Static, graphdefs, layer_states, x_BxTxD, k_cache, v_cache, slot, pos_BxT,
            key_ok_BxS, *, unroll: bool = False):
  """All blocks (``graphdefs``: each block's): a ``lax.scan`` of one block over stacked
  parameters, the same block step over static slices of them (``unroll``), or the blocks' own
  states unrolled. Returns (x, k_cache, v_cache, FFN statistics [n_layers, 3] (see
  ``_captured_step``))."""
  if st.scan and unroll:
    stats = []
    for layer in range(st.n_layers):
      block = nnx.merge(graphdefs[0], jax.tree.map(lambda a: a[layer], layer_states))
      (x_BxTxD, k_cache, v_cache), layer_stats = _captured_step(
          block, x_BxTxD, k_cache, v_cache, layer, slot, pos_BxT, key_ok_BxS)
      stats.append(layer_stats)
    return x_BxTxD, k_cache, v_cache, jnp.stack(stats)
  if st.scan:
    def body(carry, xs):
      x, k, v = carry
      state, layer = xs
      block = nnx.merge(graphdefs[0], state)
      (x, k, v), layer_stats = _captured_step(block, x, k, v, layer, slot, pos_BxT, key_ok_BxS)
      return (x, k, v), layer_stats

    (x_BxTxD, k_cache, v_cache), stats_Lx3 = jax.lax.scan(
        body, (x_BxTxD, k_cache, v_cache), (layer_states, jnp.arange(st.n_layers)))
    return x_BxTxD, k_cache, v_cache, stats_Lx3
  stats = []
  for layer, (gd, state) in enumerate(zip(graphdefs, layer_states, strict=True)):
    block = nnx.merge(gd, state)
    (x_BxTxD, k_cache, v_cache), layer_stats = _captured_step(
        block, x_BxTxD, k_cache, v_cache, layer, slot, pos_BxT, key_ok_BxS)
    stats.append(layer_stats)
  return x_BxTxD, k_cache, v_cache, jnp.stack(stats)


def _pick(st: _Static, logits_BxV, key, i, temperature, top_p, top_k):
  # Ids past the tokenizer's (the vocabulary is padded to a multiple of 128) are never drawn.
  logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < st.n_ids, logits_BxV, -jnp.inf)
  return sample_logits(logits_BxV, jax.random.fold_in(key, i), temperature=temperature,
                       top_p=top_p, top_k=top_k)


def _prefill(model_state, layer_states, prompt_BxP, pad_B, key, temperature, top_p, top_k, *,
             st: _Static):
  model = nnx.merge(st.graphdef, *model_state)
  b, p = prompt_BxP.shape
  real_BxP = jnp.arange(p)[None, :] >= pad_B[:, None]
  x_BxPxD = jnp.where(real_BxP[..., None], model._embed(prompt_BxP), 0)
  pos_BxP = jnp.maximum(jnp.arange(p)[None, :] - pad_B[:, None], 0)
  cfg = model.cfg
  shape = (st.n_layers, b, st.cache_len, cfg.kv_heads, cfg.attn_head_dim)
  k_cache = jnp.zeros(shape, model.compute_dtype)
  v_cache = jnp.zeros(shape, model.compute_dtype)
  key_ok_BxS = jnp.arange(st.cache_len)[None, :] >= pad_B[:, None]
  x_BxPxD, k_cache, v_cache, stats_Lx3 = _layers(st, st.prefill_graphdefs, layer_states, x_BxPxD,
                                            k_cache, v_cache, 0, pos_BxP, key_ok_BxS)
  logits_BxV = model._logits(x_BxPxD[:, -1:])[:, 0]
  first_B = _pick(st, logits_BxV, key, 0, temperature, top_p, top_k)
  # Pads fire no neuron: the op's mean over B x P tokens, rescaled to the real ones.
  prompt_l0_L = stats_Lx3[:, 0] * (b * p) / jnp.sum(real_BxP)
  return k_cache, v_cache, first_B, prompt_l0_L


def _decode_step(model_state, layer_states, k, v, token_B, i, pad_B, key_ok_BxS, key,
                 temperature, top_p, top_k, *, st: _Static):
  """Decode step i: feeds token i (at cache slot P + i), returns (the next token per row, the
  caches, FFN statistics [n_layers, 3])."""
  # Modules are merged in the trace that uses them: nnx.capture marks the modules it records
  # into, which flax allows only at the trace level where they were built.
  model = nnx.merge(st.graphdef, *model_state)
  slot = st.cache_len - st.max_new_tokens + i
  x_Bx1xD = model._embed(token_B[:, None])
  pos_Bx1 = (slot - pad_B)[:, None]
  x_Bx1xD, k, v, stats_Lx3 = _layers(st, st.block_graphdefs, layer_states, x_Bx1xD, k, v, slot,
                                     pos_Bx1, key_ok_BxS, unroll=st.unroll_decode)
  nxt_B = _pick(st, model._logits(x_Bx1xD)[:, 0], key, i + 1, temperature, top_p, top_k)
  return nxt_B, k, v, stats_Lx3


def _decode(model_state, layer_states, k_cache, v_cache, first_B, pad_B, key, temperature, top_p,
            top_k, eos_id, pad_id, *, st: _Static):
  b = first_B.shape[0]
  n_steps = st.max_new_tokens - 1  # the last generated token is not fed
  key_ok_BxS = jnp.arange(st.cache_len)[None, :] >= pad_B[:, None]
  done0_B = first_B == eos_id
  tokens0_BxN = jnp.full((b, st.max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)
  stats_0 = jnp.zeros((max(n_steps, 1), st.n_layers, 3), F32)

  def cond(carry):
    i, _, _, _, done_B, _, _ = carry
    return (i < n_steps) & ~jnp.all(done_B)

  def body(carry):
    i, k, v, token_B, done_B, tokens_BxN, stats_SxLx3 = carry
    nxt_B, k, v, stats_Lx3 = _decode_step(model_state, layer_states, k, v, token_B, i, pad_B,
                                          key_ok_BxS, key, temperature, top_p, top_k, st=st)
    nxt_B = jnp.where(done_B, pad_id, nxt_B)
    done_B = done_B | (nxt_B == eos_id)
    tokens_BxN = jax.lax.dynamic_update_slice(tokens_BxN, nxt_B[:, None], (0, i + 1))
    stats_SxLx3 = jax.lax.dynamic_update_slice(stats_SxLx3, stats_Lx3[None], (i, 0, 0))
    return i + 1, k, v, nxt_B, done_B, tokens_BxN, stats_SxLx3

  i, k_cache, v_cache, _, _, tokens_BxN, stats_SxLx3 = jax.lax.while_loop(
      cond, body, (jnp.int32(0), k_cache, v_cache, first_B, done0_B, tokens0_BxN, stats_0))
  # The caches are returned so that the donated input buffers can be the loop's own.
  return tokens_BxN, stats_SxLx3, i, k_cache, v_cache


_prefill_jit = jax.jit(_prefill, static_argnames=("st",))
# The caches are donated: the loop updates the prefill's buffers in place, no second copy of
# [L, B, S, K, H] (tens of GB for long contexts of the 2b model).
_decode_jit = jax.jit(_decode, static_argnames=("st",), donate_argnames=("k_cache", "v_cache"))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _stack(states, dtype):
  return _cast_weights(jax.tree.map(lambda *a: jnp.stack(a), *states), dtype)


DECODE_PATHS = ("auto", "model", "kernel", "dense")
_ANY_BATCH = 1 << 62  # the key of ``_decode_paths`` that covers every larger batch
# "auto" with unrolled layers: the decode kernels up to this many rows per decode step, the dense
# FFN above. 2b on an H200, unrolled, wall-clock generation: kernels 1.18x of dense at batch 1,
# 0.96x at batch 8 (experiments/results/bench_decode_2b_unrolled_shared_h200.json); per FFN
# 20.7 vs 24.9 us at 1 token, 28.9 vs 25.1 at 8 (tune_decode_b1_8_64_h200.json).
UNROLLED_KERNEL_MAX_BATCH = 1


def _decode_paths(model, scan_layers: bool, decode_path: str) -> dict[int, str | None]:
  """The sparse FFNs' ``SparseFFNConfig.decode_path`` at the decode steps, by batch size:
  ``{max batch: path}`` (the smallest key >= the batch applies; None: keep the model's own).
  "auto" on a Hopper GPU: scanned layers take the decode kernels at every batch size -- under the
  scan XLA copies each layer's weight slices before its matmuls read them, the decode kernels
  read them in place (per FFN 2.0-2.9x faster than the scanned dense FFN at 1-64 tokens per step,
  2b shape, experiments/results/bench_decode_ffn_scan_h200.json); unrolled layers (separate
  weights, no copies) take them up to ``UNROLLED_KERNEL_MAX_BATCH`` rows and the dense FFN above.
  Elsewhere "auto" keeps the model's own setting."""
  if decode_path not in DECODE_PATHS:
    raise ValueError(f"decode_path must be one of {DECODE_PATHS}, got {decode_path!r}")
  if decode_path == "model":
    return {_ANY_BATCH: None}
  if decode_path == "auto":
    from pallas_kernels import common
    if not common.hopper_available():
      return {_ANY_BATCH: None}
    if scan_layers:
      return {_ANY_BATCH: "kernel"}
    return {UNROLLED_KERNEL_MAX_BATCH: "kernel", _ANY_BATCH: "dense"}
  return {_ANY_BATCH: decode_path}


# "auto" on a Hopper GPU: prefill calls of up to this many tokens (batch x prompt length) run the
# dense FFN. 2b, H200, unrolled: the batched sparse path's prefill took 11.9 vs 8.2 ms at 128
# tokens, 20.8 vs 15.4 ms at 1024, 52.5 vs 46.0 ms at 2048 (one 2048-token prompt) and was even
# at 8192 (86.2 vs 86.5 ms) and 16384 (383.1 vs 384.5 ms; experiments/results/
# bench_decode_2b_unrolled_*_h200.json, bench_decode_2b_long_defaults_h200.json); the decode
# kernels lose from a few tokens on with separate weights (per FFN 0.67x of dense at 256 tokens).
PREFILL_DENSE_MAX_TOKENS = 8192


def _sparse_ffns(model) -> list:
  return [b.ffn for b in model.blocks if hasattr(b.ffn, "sparse_config")]


@contextlib.contextmanager
def _sparse_decode_path(model, decode_path: str | None, **overrides):
  """Within: every sparse FFN's config has ``decode_path`` (and the other ``SparseFFNConfig``
  fields in ``overrides``; the block graphdefs split here carry them as static configuration);
  the model itself is restored afterwards."""
  ffns = _sparse_ffns(model)
  saved = [f.sparse_config for f in ffns]
  try:
    for f in ffns:
      if decode_path is not None:
        f.sparse_config = dataclasses.replace(f.sparse_config, decode_path=decode_path)
      if overrides:
        f.sparse_config = dataclasses.replace(f.sparse_config, **overrides)
    yield
  finally:
    for f, c in zip(ffns, saved):
      f.sparse_config = c


class Generator:
  """Compiled generation for one model: casts (and with ``scan_layers`` stacks) the blocks'
  parameters once, compiles each (batch, prompt length, new tokens) shape once, and times prefill
  and decode apart.

  Build it after the weights are final: it keeps its own copy (in the compute dtype).
  ``scan_layers``: one scanned block over stacked weights instead of the unrolled blocks (the
  module docstring says what each costs). ``decode_path``: what the sparse FFNs run at the decode
  steps (``_decode_paths``): "auto" (default: on a Hopper GPU the decode kernels at batch 1 with
  unrolled layers, at every batch with scanned ones; ``decode_path_for(batch)``), "model" (the
  model's own ``SparseFFNConfig.decode_path``), "kernel" or "dense". ``compiler_options``: XLA
  options for the prefill and decode programs (``jax.stages.Lowered.compile``). Measured and not
  made a default: ``{"xla_gpu_enable_triton_gemm": False}`` (cuBLAS GEMMs) made 2b generation
  slower, scanned dense 205 -> 171 and sparse 343 -> 331 tokens/s at batch 1, unrolled dense
  316 -> 177 with dynamic-slice fusion on (H200,
  experiments/results/bench_decode_2b_cublas_scan_h200.json, bench_decode_2b_cublas_dsf_h200.json).
  """

  def __init__(self, model: Transformer, *, scan_layers: bool = False, unroll_decode: bool = False,
               decode_path: str = "auto", compiler_options: dict | None = None):
    self.model = model
    self.unroll_decode = bool(unroll_decode)
    self.compiler_options = dict(compiler_options or {})
    self.cfg = model.cfg
    dtype = model.compute_dtype
    self.graphdef, blocks_state, rest_state = nnx.split(model, nnx.PathContains("blocks"), ...)
    # The Transformer is merged from its own blocks' state (unused by the programs, which run the
    # blocks from layer_states) and its other parameters cast once (embedding/head).
    self.model_state = (blocks_state, _cast_weights(rest_state, dtype))
    splits = [nnx.split(block) for block in model.blocks]
    # Blocks of different structure cannot share one scanned program: unroll them.
    self.scan_layers = scan_layers and all(gd == splits[0][0] for gd, _ in splits)
    if self.scan_layers:
      self.layer_states = _stack([s for _, s in splits], dtype)
    else:
      self.layer_states = [_cast_weights(s, dtype) for _, s in splits]
    # The decode path is static configuration in the blocks' graphdefs: one set per path used.
    self._decode_paths = _decode_paths(model, self.scan_layers, decode_path)
    self._graphdefs = {}
    for path in set(self._decode_paths.values()):
      with _sparse_decode_path(model, path):
        self._graphdefs[path] = tuple(nnx.graphdef(block) for block in model.blocks)
    # "auto" on Hopper: the prefill runs the dense FFN up to PREFILL_DENSE_MAX_TOKENS tokens (the
    # decode regime widened to them, on its dense path); otherwise the decode steps' graphdefs.
    self._prefill_graphdefs = None
    ffns = _sparse_ffns(model)
    if decode_path == "auto" and self._decode_paths[_ANY_BATCH] is not None and ffns:
      widest = max(PREFILL_DENSE_MAX_TOKENS, *(f.sparse_config.decode_max_tokens for f in ffns))
      with _sparse_decode_path(model, "dense", decode_max_tokens=widest):
        self._prefill_graphdefs = tuple(nnx.graphdef(block) for block in model.blocks)
    self._compiled: dict = {}

  def block_graphdefs_for(self, batch: int) -> tuple:
    """The blocks' graphdefs the programs of ``batch`` rows compile (their FFN configs carry the
    decode path)."""
    return self._graphdefs[self.decode_path_for(batch)]

  def prefill_graphdefs_for(self, batch: int) -> tuple:
    """The blocks' graphdefs the prefill of ``batch`` rows compiles."""
    if self._prefill_graphdefs is not None:
      return self._prefill_graphdefs
    return self.block_graphdefs_for(batch)

  def decode_path_for(self, batch: int) -> str | None:
    """The sparse FFNs' decode path at ``batch`` rows per step (None: the model's own)."""
    return self._decode_paths[min(k for k in self._decode_paths if k >= batch)]

  @property
  def decode_path(self) -> str | None:
    """The decode path at batch 1 (``decode_path_for`` gives it per batch size)."""
    return self.decode_path_for(1)

  def _programs(self, st: _Static, args_prefill, args_decode):
    """(prefill, decode, compile seconds) for this shape, compiled ahead of time on first use."""
    shapes = tuple((a.shape, str(a.dtype)) for a in args_prefill[2:4])
    cache_key = (st, shapes)
    if cache_key in self._compiled:
      return (*self._compiled[cache_key], 0.0)
    t0 = time.perf_counter()
    opts = self.compiler_options
    prefill = _prefill_jit.lower(*args_prefill, st=st).compile(opts)
    k_cache, v_cache, first_B, _ = prefill.out_info
    decode = _decode_jit.lower(args_decode[0], args_decode[1], k_cache, v_cache, first_B,
                               *args_decode[2:], st=st).compile(opts)
    seconds = time.perf_counter() - t0
    self._compiled[cache_key] = (prefill, decode)
    return prefill, decode, seconds

  def _prepare(self, prompts, *, max_new_tokens, temperature, top_p, top_k, seed, eos_id, pad_id,
               n_ids):
    """(static, prefill arguments, decode arguments less the prefill's outputs, prompt lengths)."""
    prompt_BxP, pad_B, lengths_B = _left_pad(prompts, self.cfg.vocab_size)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    check_sampling(temperature, top_p, top_k)
    vocab = self.cfg.vocab_size
    n_ids = vocab if n_ids is None else n_ids
    if not 0 < n_ids <= vocab:
      raise ValueError(f"n_ids={n_ids}: must be in [1, {vocab}] (the model's vocabulary)")
    for name, v in (("eos_id", eos_id), ("pad_id", pad_id)):
      if v is not None and not 0 <= v < vocab:
        raise ValueError(f"{name}={v}: must be in [0, {vocab})")
    stop_id = -1 if eos_id is None else eos_id  # -1 is never produced: no row stops
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    st = _Static(graphdef=self.graphdef, scan=self.scan_layers,
                 block_graphdefs=self.block_graphdefs_for(prompt_BxP.shape[0]),
                 prefill_graphdefs=self.prefill_graphdefs_for(prompt_BxP.shape[0]),
                 n_layers=len(self.model.blocks),
                 unroll_decode=self.unroll_decode,
                 n_ids=int(n_ids), cache_len=prompt_BxP.shape[1] + int(max_new_tokens),
                 max_new_tokens=int(max_new_tokens))
    key = jax.random.key(seed)
    sampling = (jnp.asarray(temperature, F32), jnp.asarray(top_p, F32),
                jnp.asarray(top_k, jnp.int32))
    pad_dev = jnp.asarray(pad_B, jnp.int32)
    args_prefill = (self.model_state, self.layer_states, jnp.asarray(prompt_BxP, jnp.int32),
                    pad_dev, key, *sampling)
    ids = (jnp.asarray(stop_id, jnp.int32), jnp.asarray(pad_id, jnp.int32))
    args_decode = (self.model_state, self.layer_states, pad_dev, key, *sampling, *ids)
    return st, args_prefill, args_decode, lengths_B

  def lower(self, prompts, *, max_new_tokens: int):
    """The lowered (not compiled) prefill and decode programs of this shape, for inspection."""
    st, args_prefill, args_decode, _ = self._prepare(
        prompts, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=0,
        eos_id=None, pad_id=None, n_ids=None)
    k_cache, v_cache, first_B, _ = jax.eval_shape(lambda *a: _prefill(*a, st=st), *args_prefill)
    return (_prefill_jit.lower(*args_prefill, st=st),
            _decode_jit.lower(*args_decode[:2], k_cache, v_cache, first_B, *args_decode[2:], st=st))

  def decode_step_program(self, prompts, *, max_new_tokens: int, step: int = 0):
    """(f, args): one decode step of this shape as a jitted function of its arguments, on the
    cache the prompts' prefill leaves, for profiling (``f(*args)`` can be called repeatedly:
    nothing is donated; it returns the next tokens, the caches and the statistics). The same
    program body as the decode loop's, compiled with this Generator's compiler options."""
    st, args_prefill, args_decode, _ = self._prepare(
        prompts, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=0,
        eos_id=None, pad_id=None, n_ids=None)
    if not 0 <= step < max_new_tokens - 1:
      raise ValueError(f"step={step}: must be in [0, {max_new_tokens - 1})")
    prefill = _prefill_jit.lower(*args_prefill, st=st).compile(self.compiler_options)
    k_cache, v_cache, first_B, _ = prefill(*args_prefill)
    model_state, layer_states, pad_B, key, temperature, top_p, top_k = args_decode[:7]
    key_ok_BxS = jnp.arange(st.cache_len)[None, :] >= pad_B[:, None]
    args = (model_state, layer_states, k_cache, v_cache, first_B, jnp.int32(step), pad_B,
            key_ok_BxS, key, temperature, top_p, top_k)
    f = jax.jit(functools.partial(_decode_step, st=st)).lower(*args).compile(
        self.compiler_options)
    return f, args

  def generate(self, prompts, *, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int = 0, eos_id: int | None = None,
               pad_id: int | None = None, n_ids: int | None = None) -> Generation:
    """Generates ``max_new_tokens`` tokens after each prompt.

    ``prompts``: a [B, P] int array, or a list of B token-id sequences of any lengths >= 1
    (left-padded here). ``eos_id``: a row that produces it stops there; None never stops.
    ``pad_id``: what finished rows hold afterwards (default ``eos_id``, else 0). ``n_ids``: only
    ids below it are generated (the tokenizer's vocabulary; default all).
    """
    st, args_prefill, args_decode, lengths_B = self._prepare(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, seed=seed, eos_id=eos_id, pad_id=pad_id, n_ids=n_ids)
    prefill, decode, compile_s = self._programs(st, args_prefill, args_decode)

    t0 = time.perf_counter()
    k_cache, v_cache, first_B, prompt_l0_L = prefill(*args_prefill)
    jax.block_until_ready(first_B)
    t1 = time.perf_counter()
    tokens, stats_SxLx3, n_steps, _, _ = decode(self.model_state, self.layer_states, k_cache,
                                                v_cache, first_B, *args_decode[2:])
    tokens, stats_SxLx3, n_steps = jax.device_get((tokens, stats_SxLx3, n_steps))
    t2 = time.perf_counter()
    lengths = np.full((tokens.shape[0],), max_new_tokens)
    finished = np.zeros((tokens.shape[0],), bool)
    if eos_id is not None:
      for b, row in enumerate(tokens):
        hits = np.flatnonzero(row == eos_id)
        if hits.size:
          lengths[b], finished[b] = hits[0] + 1, True
    return Generation(tokens_BxN=tokens, lengths_B=lengths, finished_B=finished,
                      prompt_lengths_B=lengths_B, prompt_active_L=np.asarray(prompt_l0_L),
                      step_active_SxL=stats_SxLx3[:int(n_steps), :, 0],
                      step_union_SxL=stats_SxLx3[:int(n_steps), :, 1],
                      step_dense_fallback_SxL=stats_SxLx3[:int(n_steps), :, 2],
                      prefill_s=t1 - t0, decode_s=t2 - t1, compile_s=compile_s,
                      layers="scan" if self.scan_layers else "unrolled",
                      decode_path=self.decode_path_for(len(tokens)) or "model")


def generation_report(gen: Generation, d_ff: int) -> str:
  """Speed and FFN activity of a generation, as ``sparse-jax generate`` prints them."""
  steps = gen.step_active_SxL
  active = " ".join(f"{x:.1f}" for x in steps.mean(axis=0)) if len(steps) else "n/a"
  return "\n".join([
      f"--- {len(gen.tokens_BxN)} rows, {int(gen.prompt_lengths_B.sum())} prompt tokens, "
      f"{int(gen.lengths_B.sum())} generated ({int(gen.finished_B.sum())} rows ended)",
      f"layers {gen.layers}, FFN decode path {gen.decode_path}; "
      f"compile {gen.compile_s:.1f} s; prefill {gen.prefill_s * 1e3:.1f} ms "
      f"({gen.prefill_tokens_per_s:.0f} tokens/s); decode {len(steps)} steps in "
      f"{gen.decode_s * 1e3:.1f} ms ({gen.decode_tokens_per_s:.0f} tokens/s)",
      f"active FFN neurons per generated token, per layer (of {d_ff}): {active}",
      f"active FFN neurons per prompt token, per layer: "
      f"{' '.join(f'{x:.1f}' for x in gen.prompt_active_L)}"])


def _left_pad(prompts, vocab: int):
  """(prompt [B, P] int32 left-padded with 0, pads [B], lengths [B]) from an array or a list."""
  if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
    arr = np.asarray(prompts)
    if arr.ndim != 2:
      raise ValueError(f"prompt must be a [batch, length] array of token ids, got shape "
                       f"{arr.shape}")
    rows: Sequence = list(arr)
  else:
    rows = [np.asarray(r) for r in prompts]
  if not rows:
    raise ValueError("no prompts given")
  for b, r in enumerate(rows):
    if r.ndim != 1 or r.size == 0:
      raise ValueError(f"prompt {b} must be a non-empty 1-D sequence of token ids, got shape "
                       f"{r.shape} (generation needs at least one token to condition on: use "
                       "the end-of-document id for an empty prompt)")
    if not np.issubdtype(r.dtype, np.integer):
      raise TypeError(f"prompt token ids must be integers, got {r.dtype} (prompt {b})")
    if r.min() < 0 or r.max() >= vocab:
      raise ValueError(f"prompt token ids must be in [0, {vocab}), got {r.min()}..{r.max()} "
                       f"(prompt {b})")
  lengths = np.array([r.size for r in rows])
  p = int(lengths.max())
  prompt = np.zeros((len(rows), p), np.int32)
  for b, r in enumerate(rows):
    prompt[b, p - r.size:] = r
  return prompt, p - lengths, lengths


def generate(model: Transformer, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, eos_id: int | None = None,
             pad_id: int | None = None, n_ids: int | None = None,
             scan_layers: bool = False, decode_path: str = "auto") -> Generation:
  """``Generator(model).generate(...)`` (see there); build a ``Generator`` to generate repeatedly
  without re-stacking the weights or recompiling."""
  return Generator(model, scan_layers=scan_layers, decode_path=decode_path).generate(
      prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
      seed=seed, eos_id=eos_id, pad_id=pad_id, n_ids=n_ids)
