"""Prepare a checkpoint for fast sparse inference: measure, choose the hot/cold split, permute, save.

    sparse-jax prepare-inference --checkpoint runs/main --out prepared/main [--data FILES]

1. **Measure**: per-layer firing counts (``FFNStats.active_per_neuron`` summed over tokens) on a
   calibration text: the checkpoint's validation split or ``data`` (at most ``max_tokens``).
2. **Choose**: per layer, ``sparse_jax.ops.hotcold.plan_layer`` turns the frequencies into a
   neuron permutation (hottest first; the cold ones spread over the TwELL tiles) and a dense count
   ``n_hot`` from the cost model (``CostModel``; a layer may be all sparse or all dense).
3. **Permute**: the rows of w_gate, w_up and w_down of each layer, which leaves the model's
   function unchanged.
4. **Save**: a Hugging Face Llama-format directory whose ``config.json`` records the per-layer
   counts as ``sparse_hot_neurons``; ``load_checkpoint`` / ``eval`` / ``generate`` of that directory
   build the split FFN by themselves. ``sparse_inference.json`` beside it keeps the plan: counts,
   the measured frequencies' summary and the cost model's predictions per layer.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparse_jax.config import Config
from sparse_jax.nn import Transformer, forward_with_stats
from sparse_jax.ops.hotcold import CostModel, LayerPlan, plan_layer

PLAN_FILE = "sparse_inference.json"
# FFN kinds whose checkpoints can be prepared: ReLU-gated ones (the Llama format's FFN).
PREPARABLE = ("relu_sparse", "relu_dense")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _firing(state, inputs_BxL, graphdef):
  _, stats = forward_with_stats(nnx.merge(graphdef, state), inputs_BxL)
  return stats.active_per_neuron


def firing_counts(model: Transformer, batches: list[np.ndarray], *, progress: bool = False
                  ) -> tuple[np.ndarray, int]:
  """([n_layers, d_ff] tokens on which each neuron fired, tokens) over ``batches`` of [B, L]
  token ids (or [B, L + 1] windows: only the model's inputs count)."""
  if not batches:
    raise ValueError("no calibration batches")
  graphdef, state = nnx.split(model)
  counts = np.zeros((model.cfg.n_layers, model.cfg.d_ff), np.int64)
  tokens = 0
  for batch in tqdm(batches, desc="prepare: firing frequencies", unit="batch",
                    disable=not progress, dynamic_ncols=True):
    counts += np.asarray(jax.device_get(_firing(state, jnp.asarray(batch), graphdef)), np.int64)
    tokens += int(np.prod(batch.shape))
  return counts, tokens


def plan_model(counts_LxF: np.ndarray, n_tokens: int, *, d_model: int, m: int = 16384,
               cost: CostModel = CostModel()) -> list[LayerPlan]:
  """One ``LayerPlan`` per layer from firing counts over ``n_tokens`` tokens."""
  counts_LxF = np.asarray(counts_LxF)
  if counts_LxF.ndim != 2:
    raise ValueError(f"counts_LxF must be [n_layers, d_ff], got shape {counts_LxF.shape}")
  if n_tokens < 1 or counts_LxF.min() < 0 or counts_LxF.max() > n_tokens:
    raise ValueError(f"counts_LxF must hold token counts in [0, n_tokens={n_tokens}]")
  return [plan_layer(c / n_tokens, d_model=d_model, m=m, cost=cost) for c in counts_LxF]


def apply_plan(model: Transformer, cfg: Config, plans: list[LayerPlan]
               ) -> tuple[Transformer, Config]:
  """The model with each layer's FFN neurons permuted by its plan and the config recording the
  dense counts (``model.sparse_hot_neurons``): the same function, built with the split FFN."""
  if len(plans) != cfg.model.n_layers:
    raise ValueError(f"{len(plans)} plans for {cfg.model.n_layers} layers")
  if cfg.model.ffn not in PREPARABLE:
    raise ValueError(f"model.ffn={cfg.model.ffn!r}: only ReLU-gated FFNs ({', '.join(PREPARABLE)})"
                     " have a sparse split to prepare")
  new_cfg = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, sparse_hot_neurons=tuple(p.n_hot for p in plans)))
  pure = nnx.to_pure_dict(nnx.state(model))
  for i, plan in enumerate(plans):
    ffn = pure["blocks"][i]["ffn"]
    if sorted(plan.perm.tolist()) != list(range(cfg.model.d_ff)):
      raise ValueError(f"plan of layer {i} is not a permutation of its {cfg.model.d_ff} neurons")
    idx = jnp.asarray(plan.perm)
    for name in ("w_gate_FxD", "w_up_FxD", "w_down_FxD"):
      ffn[name] = jnp.take(ffn[name], idx, axis=0)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(new_cfg.model,
                                                                 rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state), new_cfg


def prepare(checkpoint: str, *, out: str, data: str | None = None, max_tokens: int = 65536,
            seq_len: int | None = None, batch_size: int = 8, step: int | None = None,
            tokenizer: str | None = None, m: int = 16384, cost: CostModel = CostModel(),
            dtype: str = "float32", allow_unknown_config: bool = False,
            progress: bool = True) -> dict:
  """Measures, plans, permutes and writes ``checkpoint`` (a run or Hugging Face directory) as a
  prepared Hugging Face directory ``out``. Returns the plan's summary (also in ``PLAN_FILE``).

  m: the token count per FFN call that the cost model plans for (the split's choice depends on it
  only through tile overflow). dtype: storage dtype of the written weights.
  """
  from sparse_jax import hf
  from sparse_jax.data import validation_batches
  from sparse_jax.eval.evaluate import evaluation_tokens
  from sparse_jax.eval.loading import load_checkpoint
  if os.path.exists(out):
    raise FileExistsError(f"--out {out} already exists; prepare into a new directory")
  if max_tokens < 1 or batch_size < 1:
    raise ValueError(f"max_tokens ({max_tokens}) and batch_size ({batch_size}) must be positive")
  loaded = load_checkpoint(checkpoint, step=step, tokenizer=tokenizer,
                           allow_unknown_config=allow_unknown_config)
  cfg = loaded.cfg
  if cfg.model.ffn not in PREPARABLE:
    raise ValueError(f"{checkpoint}: model.ffn={cfg.model.ffn!r}; only ReLU-gated FFNs "
                     f"({', '.join(PREPARABLE)}) can be prepared for sparse inference")
  seq_len = seq_len or cfg.data.seq_len
  tokens, described = evaluation_tokens(loaded, data, progress=progress)
  max_batches = max(1, -(-max_tokens // (batch_size * seq_len)))
  batches = [b[:, :-1] for b in validation_batches(tokens, seq_len, batch_size, max_batches)]
  counts, n_tokens = firing_counts(loaded.model, batches, progress=progress)
  plans = plan_model(counts, n_tokens, d_model=cfg.model.d_model, m=m, cost=cost)
  model, cfg = apply_plan(loaded.model, cfg, plans)
  check = _check_batch(loaded.model, model, batches[0])
  files = hf.export_hf(model, out, tokenizer=cfg.data.tokenizer, dtype=dtype,
                       max_position_embeddings=cfg.data.seq_len)
  summary = dict(
      checkpoint=os.path.abspath(checkpoint), label=loaded.label, out=os.path.abspath(out),
      data=described, tokens=n_tokens, m=m, cost_model=dataclasses.asdict(cost),
      sparse_hot_neurons=list(cfg.model.sparse_hot_neurons), d_ff=cfg.model.d_ff, files=files,
      first_batch=check,
      layers=[_layer_summary(i, plan, c / n_tokens) for i, (plan, c) in
              enumerate(zip(plans, counts))])
  with open(os.path.join(out, PLAN_FILE), "w") as fh:
    json.dump(summary, fh, indent=2)
  return summary


def _check_batch(original: Transformer, prepared: Transformer, batch: np.ndarray) -> dict:
  """Both models on the first calibration batch: the prepared one must compute the same function
  (max |logit difference|, per-layer active neurons/token) and shows what the layout did to the
  TwELL overflow (rows over capacity per layer, before and after; the sparse op's own counts)."""
  tokens = jnp.asarray(batch)
  logits, st = forward_with_stats(original, tokens)
  logits_p, st_p = forward_with_stats(prepared, tokens)
  return dict(tokens=int(np.prod(batch.shape)),
              max_abs_logit_diff=float(jnp.max(jnp.abs(logits_p - logits))),
              max_abs_logit=float(jnp.max(jnp.abs(logits))),
              active_per_token=[float(v) for v in st.l0],
              active_per_token_prepared=[float(v) for v in st_p.l0],
              overflow_rows=[int(v) for v in st.overflow_rows],
              overflow_rows_prepared=[int(v) for v in st_p.overflow_rows])


def _layer_summary(layer: int, plan: LayerPlan, freq_F: np.ndarray) -> dict:
  return dict(layer=layer, n_hot=plan.n_hot, mean_active=float(freq_F.sum()),
              dead=int(np.sum(freq_F == 0)), max_frequency=float(freq_F.max()),
              predicted={k: float(v) for k, v in plan.predicted.items()},
              perm=plan.perm.tolist())


def format_summary(s: dict) -> str:
  """One line per layer: dense neurons, activity share computed densely, predicted speed-up of
  the sparse part at M tokens (cost model, FFN up + down only)."""
  lines = [f"prepared {s['label']} -> {s['out']} ({s['tokens']:,} calibration tokens: "
           f"{s['data']})", "layer  active/token  dense neurons  dense share  predicted "
           f"sparse part vs unsplit (M={s['m']})"]
  check = s["first_batch"]
  for ly in s["layers"]:
    p = ly["predicted"]
    ratio = p["unsplit_s"] / p["total_s"] if p["total_s"] > 0 else float("inf")
    lines.append(f"{ly['layer']:5d}  {ly['mean_active']:12.2f}  {ly['n_hot']:6d} of {s['d_ff']:<5d}"
                 f"  {100 * p['hot_share_of_activity']:9.1f}%  {ratio:.2f}x")
  lines.append(f"first batch ({check['tokens']} tokens): max |logit difference| "
               f"{check['max_abs_logit_diff']:.2e} of {check['max_abs_logit']:.2f}; TwELL overflow "
               f"rows per layer {check['overflow_rows']} -> {check['overflow_rows_prepared']}")
  return "\n".join(lines)
