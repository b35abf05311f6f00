"""Text generation with a KV cache: greedy, temperature and top-p (nucleus) sampling, seeded.

The prompt runs through ``Transformer.decode`` once (prefill, filling each layer's cache); then each
new token is one ``decode`` call of length 1 inside a ``lax.scan``, so the whole generation is one
compiled program. Every step goes through the model's own FFN (the sparse op for ``relu_sparse``),
and the FFN statistics each step sows are returned: active neurons per generated token per layer.

Sampling: ``temperature=0`` is greedy (argmax). Otherwise the logits are divided by the temperature
and, with ``top_p < 1``, restricted to the smallest set of most likely tokens whose probability
reaches ``top_p`` (the most likely token always stays). Step i draws with ``fold_in(key(seed), i)``,
so a seed fixes the output whatever the batch position or the number of tokens asked for.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.nn.model import Transformer, sown_ffn_stats

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Generation:
  tokens_BxN: np.ndarray        # generated ids; after an end token, rows hold ``eos_id``
  lengths_B: np.ndarray         # generated tokens per row up to and including its end token
  # Mean active FFN neurons per token and layer: over the prompt (the prefill), and at each decode
  # step (step i feeds generated token i, so there are N - 1 steps).
  prompt_active_L: np.ndarray
  step_active_SxL: np.ndarray

  def row(self, b: int) -> list[int]:
    """Row b's generated ids up to and including its end token."""
    return [int(t) for t in self.tokens_BxN[b, :self.lengths_B[b]]]


def check_sampling(temperature: float, top_p: float) -> None:
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature!r}: must be >= 0 (0 is greedy decoding)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p!r}: must be in (0, 1]")


def sample_logits(logits_BxV: jax.Array, key: jax.Array, *, temperature, top_p) -> jax.Array:
  """One token per row: argmax if ``temperature == 0``, else temperature + top-p sampling.

  ``temperature`` and ``top_p`` may be traced; the greedy branch is selected with ``jnp.where``
  so one compiled program serves every setting.
  """
  logits_BxV = logits_BxV.astype(F32)
  greedy_B = jnp.argmax(logits_BxV, axis=-1)
  scaled = logits_BxV / jnp.maximum(temperature, 1e-6)
  sorted_desc = jnp.sort(scaled, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  # A token stays if the tokens more likely than it hold less than top_p of the mass.
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = mass_before < top_p
  kept = kept.at[:, 0].set(True)
  n_kept_B = jnp.sum(kept, axis=-1)
  threshold_B = jnp.take_along_axis(sorted_desc, (n_kept_B - 1)[:, None], axis=-1)
  masked = jnp.where(scaled >= threshold_B, scaled, -jnp.inf)
  sampled_B = jax.random.categorical(key, masked, axis=-1)
  return jnp.where(temperature == 0, greedy_B, sampled_B).astype(jnp.int32)


def _decode_with_l0(model: Transformer, tokens_BxT, caches, start):
  (logits_BxTxV, caches), inter = nnx.capture(model.decode, nnx.Intermediate)(
      tokens_BxT, caches, start)
  return logits_BxTxV, caches, sown_ffn_stats(model, inter).l0


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "n_ids"))
def _generate(state, prompt_BxP, key, temperature, top_p, eos_id, *, graphdef,
              max_new_tokens: int, n_ids: int):
  model = nnx.merge(graphdef, state)
  b, p = prompt_BxP.shape
  caches = model.init_cache(b, p + max_new_tokens)

  def pick(logits_BxV, i):
    # Ids past the tokenizer's (the vocabulary is padded to a multiple of 128) are never drawn.
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < n_ids, logits_BxV, -jnp.inf)
    return sample_logits(logits_BxV, jax.random.fold_in(key, i), temperature=temperature,
                         top_p=top_p)

  logits_BxPxV, caches, prompt_l0_L = _decode_with_l0(model, prompt_BxP, caches, 0)
  first_B = pick(logits_BxPxV[:, -1], 0)

  def step(carry, i):
    caches, token_B, done_B = carry
    # Modules are merged in the trace that uses them: nnx.capture marks the modules it records
    # into, which flax allows only at the trace level where they were built.
    model = nnx.merge(graphdef, state)
    logits_Bx1xV, caches, l0_L = _decode_with_l0(model, token_B[:, None], caches, p + i)
    nxt_B = pick(logits_Bx1xV[:, 0], i + 1)
    done_B = done_B | (token_B == eos_id)
    nxt_B = jnp.where(done_B, eos_id, nxt_B)
    return (caches, nxt_B, done_B), (nxt_B, l0_L)

  done0 = jnp.zeros((b,), bool)
  # Step i feeds token i (at position p + i) and yields token i + 1; the last token is not fed.
  _, (rest_SxB, l0_SxL) = jax.lax.scan(step, (caches, first_B, done0),
                                       jnp.arange(max_new_tokens - 1))
  tokens_BxN = jnp.concatenate([first_B[:, None], rest_SxB.T], axis=1)
  return tokens_BxN, l0_SxL, prompt_l0_L


def generate(model: Transformer, prompt_BxP, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             n_ids: int | None = None) -> Generation:
  """Generates ``max_new_tokens`` tokens after each prompt row (rows of one length).

  ``eos_id``: a row that produces it stops there (``Generation.lengths_B``); None never stops.
  ``n_ids``: only ids below it are generated (the tokenizer's vocabulary size; default: all).
  The neuron counts come from the FFN statistics each decode call sows (the prompt's from the
  prefill), so they are what the op saw, averaged over the batch rows.
  """
  prompt_BxP = np.asarray(prompt_BxP)
  if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] == 0:
    raise ValueError(f"prompt must be a [batch, length] array of token ids with length >= 1, got "
                     f"shape {prompt_BxP.shape} (generation needs at least one token to condition "
                     "on: use the end-of-document id for an empty prompt)")
  if not np.issubdtype(prompt_BxP.dtype, np.integer):
    raise TypeError(f"prompt token ids must be integers, got {prompt_BxP.dtype}")
  vocab = model.cfg.vocab_size
  if prompt_BxP.min() < 0 or prompt_BxP.max() >= vocab:
    raise ValueError(f"prompt token ids must be in [0, {vocab}), got {prompt_BxP.min()}.."
                     f"{prompt_BxP.max()}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
  check_sampling(temperature, top_p)
  n_ids = vocab if n_ids is None else n_ids
  if not 0 < n_ids <= vocab:
    raise ValueError(f"n_ids={n_ids}: must be in [1, {vocab}] (the model's vocabulary)")
  graphdef, state = nnx.split(model)
  stop_id = -1 if eos_id is None else eos_id  # -1 is never produced: no row stops
  tokens, l0_SxL, prompt_l0_L = jax.device_get(_generate(
      state, jnp.asarray(prompt_BxP, jnp.int32), jax.random.key(seed),
      jnp.asarray(temperature, F32), jnp.asarray(top_p, F32), jnp.asarray(stop_id, jnp.int32),
      graphdef=graphdef, max_new_tokens=max_new_tokens, n_ids=n_ids))
  lengths = np.full((tokens.shape[0],), max_new_tokens)
  if eos_id is not None:
    for b, row in enumerate(tokens):
      hits = np.flatnonzero(row == eos_id)
      if hits.size:
        lengths[b] = hits[0] + 1
  return Generation(tokens_BxN=tokens, lengths_B=lengths, prompt_active_L=np.asarray(prompt_l0_L),
                    step_active_SxL=np.asarray(l0_SxL))
