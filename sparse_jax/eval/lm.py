"""Language-model evaluation of a checkpoint: perplexity and where the FFN sparsity lives.

Per token and layer it records how many FFN neurons fire, and relates that to:

* the layer (mean, percentiles and the full distribution of active neurons per token; neurons
  that never fire on the evaluation tokens, i.e. dead ones);
* the position in the sequence (the paper: early positions fire many more neurons);
* the surprisal of the token being processed, -log p(token | previous tokens) in nats, and the
  next-token loss at that position (the paper: high-surprisal tokens fire more neurons).

Per-token counts are not among the op's statistics (``FFNStats`` holds per-layer means and
per-neuron counts), so they are recomputed from each FFN's input, captured with
``nnx.capture(method_outputs=...)``, exactly as each FFN kind defines "active" (the sparse kinds:
the ReLU gate is nonzero; the dense kinds: the hidden activation is nonzero). Their per-neuron
sums equal the op's own ``active_per_neuron`` (tested), so the two views agree.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparse_jax.nn.ffn import FFN
from sparse_jax.nn.model import Transformer, sown_ffn_stats

F32 = jnp.float32
# Surprisal bins in nats: one per nat up to 16 (a 49k vocabulary's uniform guess is 10.8), then
# one open bin.
SURPRISAL_EDGES = np.concatenate([np.arange(17.0), [np.inf]])


def active_per_token(ffn: FFN, x_BxLxD: jax.Array) -> jax.Array:
  """[B, L] int32: neurons of ``ffn`` active for each token of its input, as its stats count."""
  active_MxF = ffn.active_mask(x_BxLxD)
  return jnp.sum(active_MxF, axis=1, dtype=jnp.int32).reshape(x_BxLxD.shape[:2])


def target_logprob(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """log p(target) per position, without a second [B, L, V] buffer of log-probabilities."""
  logits_BxLxV = logits_BxLxV.astype(F32)
  picked_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return picked_BxL - jax.nn.logsumexp(logits_BxLxV, axis=-1)


def token_stats(model: Transformer, tokens_BxL1: jax.Array) -> dict:
  """Per-token loss and active neurons of one batch of [B, L + 1] windows (inputs, targets)."""
  inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
  logits_BxLxV, inter = nnx.capture(model, nnx.Intermediate,
                                    method_outputs=nnx.Intermediate)(inputs_BxL)
  stats = sown_ffn_stats(model, inter)
  outputs = nnx.to_pure_dict(inter)["blocks"]
  active_LxBxL = jnp.stack([active_per_token(block.ffn, outputs[i]["ffn_norm"]["__call__"][0])
                            for i, block in enumerate(model.blocks)])
  nll_BxL = -target_logprob(logits_BxLxV, targets_BxL)
  greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  return dict(nll_BxL=nll_BxL, greedy_BxL=greedy_BxL, active_LxBxL=active_LxBxL,
              active_per_neuron_LxF=stats.active_per_neuron, overflow_rows_L=stats.overflow_rows,
              dense_fallback_L=stats.dense_fallback)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_stats(state, tokens_BxL1, graphdef):
  return token_stats(nnx.merge(graphdef, state), tokens_BxL1)


@dataclasses.dataclass
class SparsityAccumulator:
  """Sums over evaluation batches; ``result()`` turns them into the report's numbers."""
  n_layers: int
  d_ff: int
  seq_len: int

  def __post_init__(self):
    n_bins = len(SURPRISAL_EDGES) - 1
    self.nll_sum = 0.0
    self.n_tokens = 0
    self.n_batches = 0
    self.hist_LxA = np.zeros((self.n_layers, self.d_ff + 1), np.int64)
    self.pos_sum_LxP = np.zeros((self.n_layers, self.seq_len))
    self.pos_count_P = np.zeros(self.seq_len, np.int64)
    self.surprisal_sum_LxS = np.zeros((self.n_layers, n_bins))
    self.surprisal_count_S = np.zeros(n_bins, np.int64)
    self.next_loss_sum_LxS = np.zeros((self.n_layers, n_bins))
    self.next_loss_count_S = np.zeros(n_bins, np.int64)
    self.fired_LxF = np.zeros((self.n_layers, self.d_ff), np.int64)
    self.overflow_rows = 0
    self.dense_fallback_calls = 0

  def add(self, out: dict) -> None:
    nll_BxL = np.asarray(out["nll_BxL"], np.float64)
    active_LxBxL = np.asarray(out["active_LxBxL"], np.int64)
    b, length = nll_BxL.shape
    self.nll_sum += float(nll_BxL.sum())
    self.n_tokens += nll_BxL.size
    self.n_batches += 1
    for layer in range(self.n_layers):
      self.hist_LxA[layer] += np.bincount(active_LxBxL[layer].ravel(), minlength=self.d_ff + 1)
    self.pos_sum_LxP[:, :length] += active_LxBxL.sum(axis=1)
    self.pos_count_P[:length] += b
    # The token at position t was predicted at t - 1; the first position has no surprisal here.
    self._binned(nll_BxL[:, :-1], active_LxBxL[:, :, 1:], self.surprisal_sum_LxS,
                 self.surprisal_count_S)
    self._binned(nll_BxL, active_LxBxL, self.next_loss_sum_LxS, self.next_loss_count_S)
    self.fired_LxF += np.asarray(out["active_per_neuron_LxF"], np.int64)
    self.overflow_rows += int(np.sum(out["overflow_rows_L"]))
    self.dense_fallback_calls += int(np.sum(out["dense_fallback_L"]))

  def _binned(self, nats, active_LxN, sums_LxS, counts_S) -> None:
    bins = np.digitize(nats.ravel(), SURPRISAL_EDGES[1:-1])
    n_bins = len(counts_S)
    counts_S += np.bincount(bins, minlength=n_bins)
    for layer in range(self.n_layers):
      sums_LxS[layer] += np.bincount(bins, weights=active_LxN[layer].ravel(), minlength=n_bins)

  def result(self) -> dict:
    counts_A = np.arange(self.d_ff + 1)
    layers = []
    for layer in range(self.n_layers):
      hist = self.hist_LxA[layer]
      cdf = np.cumsum(hist) / hist.sum()
      pct = {f"p{q}": int(np.searchsorted(cdf, q / 100)) for q in (50, 90, 99)}
      mean = float((hist * counts_A).sum() / hist.sum())
      dead = int(np.sum(self.fired_LxF[layer] == 0))
      layers.append(dict(
          layer=layer, mean_active=mean, sparsity_pct=100 * (1 - mean / self.d_ff), **pct,
          max_active=int(np.flatnonzero(hist)[-1]), dead_neurons=dead,
          dead_pct=100 * dead / self.d_ff, zero_active_tokens_pct=100 * hist[0] / hist.sum()))
    mean_active = float(np.mean([x["mean_active"] for x in layers]))
    ce = self.nll_sum / self.n_tokens
    return dict(
        tokens=self.n_tokens, batches=self.n_batches, seq_len=self.seq_len, ce=ce,
        ppl=math.exp(ce), bits_per_token=ce / math.log(2), d_ff=self.d_ff,
        mean_active=mean_active, sparsity_pct=100 * (1 - mean_active / self.d_ff),
        dead_pct=float(np.mean([x["dead_pct"] for x in layers])), layers=layers,
        overflow_rows=self.overflow_rows, dense_fallback_calls=self.dense_fallback_calls,
        by_position=self._profile(self.pos_sum_LxP, self.pos_count_P, np.arange(self.seq_len)),
        by_surprisal=self._binned_profile(self.surprisal_sum_LxS, self.surprisal_count_S),
        by_next_token_loss=self._binned_profile(self.next_loss_sum_LxS, self.next_loss_count_S))

  @staticmethod
  def _profile(sums_LxK, counts_K, keys_K) -> dict:
    kept = counts_K > 0
    per_layer = sums_LxK[:, kept] / counts_K[kept]
    return dict(keys=keys_K[kept].tolist(), tokens=counts_K[kept].tolist(),
                mean_active=per_layer.mean(axis=0).tolist(),
                mean_active_per_layer=per_layer.tolist())

  def _binned_profile(self, sums_LxS, counts_S) -> dict:
    lo, hi = SURPRISAL_EDGES[:-1], SURPRISAL_EDGES[1:]
    labels = np.asarray([f"{a:g}-{b:g}" if np.isfinite(b) else f">={a:g}"
                         for a, b in zip(lo, hi)])
    out = self._profile(sums_LxS, counts_S, labels)
    out["bin_lo"] = lo[counts_S > 0].tolist()
    return out

  def arrays(self) -> dict[str, np.ndarray]:
    """The raw counts (for the .npz beside the report): histograms and per-neuron firing."""
    return dict(active_hist_LxA=self.hist_LxA, fired_tokens_LxF=self.fired_LxF,
                position_active_sum_LxP=self.pos_sum_LxP, position_tokens_P=self.pos_count_P,
                surprisal_edges=SURPRISAL_EDGES, surprisal_active_sum_LxS=self.surprisal_sum_LxS,
                surprisal_tokens_S=self.surprisal_count_S)


def evaluate_lm(model: Transformer, batches: list[np.ndarray], *, progress: bool = True
                ) -> SparsityAccumulator:
  """Runs every [B, L + 1] batch through the model and accumulates the statistics."""
  if not batches:
    raise ValueError("no evaluation batches")
  graphdef, state = nnx.split(model)
  acc = SparsityAccumulator(n_layers=model.cfg.n_layers, d_ff=model.cfg.d_ff,
                            seq_len=batches[0].shape[1] - 1)
  for batch in tqdm(batches, desc="eval: perplexity and sparsity", unit="batch",
                    disable=not progress, dynamic_ncols=True):
    acc.add(jax.device_get(_token_stats(state, jnp.asarray(batch), graphdef)))
  return acc
