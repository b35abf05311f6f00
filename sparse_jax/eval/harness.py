"""lm-evaluation-harness adapter: any lm-eval task on a sparse_jax checkpoint, with its sparsity.

``SparseJaxLM`` implements lm-eval's model interface (``loglikelihood``,
``loglikelihood_rolling``, ``generate_until``) over a run directory or a Hugging Face checkpoint
(``sparse_jax.checkpoints.load_model``; dense or sparse FFN), batched, on one device or over a
mesh (``mesh="data:8"``: the batch is split over the devices, the sparse FFN runs per device).
It is registered as lm-eval model ``sparse_jax`` when this module is imported; three ways in:

* ``sparse-jax eval --checkpoint CKPT --harness arc_easy,hellaswag --include-path TASK_DIR``
* ``python -m sparse_jax.eval.harness --model sparse_jax --model_args checkpoint=CKPT ...``:
  lm-eval's own command line (every flag of ``lm_eval``) with the model registered first. A bare
  ``lm_eval --model sparse_jax`` does not work: lm-eval 0.4 discovers no models from other
  packages.
* ``lm_eval.simple_evaluate(model=SparseJaxLM(checkpoint=...), tasks=[...])`` from Python.

Tokenization follows lm-eval's ``TemplateLM`` and training: no BOS is added to any text (the model
never saw one); an empty context is the end-of-document token, after which every document starts.
A request longer than the model's context keeps its last ``max_length + 1`` tokens, as lm-eval's
HF model does. ``sparsity()`` reports the FFN's active neurons per token over every position the
model ran on (padding excluded; the op's overflow and dense-fallback counts cover whole batches).

Offline tasks: ``local_tasks`` writes task YAMLs that include lm-eval's own hellaswag, arc and piqa
definitions (prompts, preprocessing, metrics) with the data from local JSONL files
(``dataset_path: json``), for ``--include-path``.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  (lm-eval's own models stay registered beside ours)
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from sparse_jax import parallel
from sparse_jax.checkpoints import is_run_dir, load_model
from sparse_jax.eval.lm import _token_stats
from sparse_jax.eval.multiple_choice import bucket_length
from sparse_jax.nn.model import Transformer

# lm-eval task of each local JSONL format (sparse_jax.eval.multiple_choice's shapes).
LOCAL_TASKS = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
               "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml"}


@dataclasses.dataclass
class _Sparsity:
  """Active FFN neurons per token and layer, summed over the positions the model ran on."""
  n_layers: int
  d_ff: int
  tokens: int = 0

  def __post_init__(self):
    self.active_sum_L = np.zeros(self.n_layers)
    self.overflow_rows = 0
    self.dense_fallback_calls = 0

  def add(self, active_LxBxT: np.ndarray, real_BxT: np.ndarray, out: dict) -> None:
    self.active_sum_L += np.where(real_BxT[None], active_LxBxT, 0).sum(axis=(1, 2))
    self.tokens += int(real_BxT.sum())
    self.overflow_rows += int(np.sum(out["overflow_rows_L"]))
    self.dense_fallback_calls += int(np.sum(out["dense_fallback_L"]))

  def result(self) -> dict:
    mean_L = self.active_sum_L / max(self.tokens, 1)
    return dict(tokens=self.tokens, d_ff=self.d_ff, mean_active=float(mean_L.mean()),
                sparsity_pct=float(100 * (1 - mean_L.mean() / self.d_ff)),
                mean_active_per_layer=mean_L.tolist(), overflow_rows=self.overflow_rows,
                dense_fallback_calls=self.dense_fallback_calls)


@register_model("sparse_jax")
class SparseJaxLM(TemplateLM):
  """lm-eval model over a sparse_jax checkpoint.

  checkpoint: run directory or Hugging Face directory. step, ffn, compute_dtype, tokenizer,
    allow_unknown_config: as ``sparse-jax eval`` (compute_dtype defaults to float32 here, so
    scores do not depend on bf16 rounding). batch_size: sequences per forward pass. max_length:
    longest sequence scored (default: the run's seq_len; a Hugging Face checkpoint's
    max_position_embeddings, at most 2048). mesh: a mesh spec such as
    "data:8" ("" or None: one device). max_gen_toks: default generation budget.
  """

  created: list["SparseJaxLM"] = []  # for main(), which gets no handle on lm-eval's instance

  def __init__(self, checkpoint: str, *, step: int | None = None, ffn: str | None = None,
               compute_dtype: str = "float32", tokenizer: str | None = None,
               batch_size: int | str | None = 16, max_length: int | None = None,
               mesh: str | None = None, max_gen_toks: int = 256,
               allow_unknown_config: bool = False, device: str | None = None,
               max_batch_size: int | None = None, **unused):
    super().__init__()
    if unused:
      raise ValueError(f"sparse_jax model: unknown argument(s) {', '.join(sorted(unused))}")
    del device, max_batch_size  # JAX places the model on its default devices (or the mesh)
    self.loaded = load_model(checkpoint, step=None if step in (None, "") else int(step), ffn=ffn,
                             compute_dtype=compute_dtype, tokenizer=tokenizer,
                             allow_unknown_config=str(allow_unknown_config).lower() == "true")
    self.tok = self.loaded.tokenizer
    # The project scorer's default too: a run's training length, a Hugging Face checkpoint's
    # max_position_embeddings up to 2048.
    self.max_length = int(max_length or self.loaded.cfg.data.seq_len)
    self.max_gen_toks = int(max_gen_toks)
    if str(batch_size).startswith("auto"):
      batch_size = 16  # no memory probing: a fixed, overridable batch
    self.batch_size = int(batch_size or 16)
    self.mesh = parallel.make_mesh(mesh) if mesh else None
    model = self.loaded.model
    if self.mesh is not None:
      shards = parallel.batch_shards(self.mesh)
      self.batch_size = -(-self.batch_size // shards) * shards
      # A sparse FFN runs per device when built with the mesh (nn.FFN(mesh=)): the same model's
      # structure built with it (no parameters drawn), holding the loaded parameters.
      on_mesh = nnx.eval_shape(lambda: Transformer(self.loaded.cfg.model, rngs=nnx.Rngs(0),
                                                   mesh=self.mesh))
      model = nnx.merge(nnx.graphdef(on_mesh), nnx.state(model))
    self.graphdef, self.state = nnx.split(model)
    if self.mesh is not None:
      self.state = parallel.place(self.state, parallel.tree_shardings(self.state, self.mesh))
    cfg = self.loaded.cfg.model
    self.stats = _Sparsity(cfg.n_layers, cfg.d_ff)
    SparseJaxLM.created.append(self)

  # ------------------------------------------------------------------ tokenization (TemplateLM)

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tok.eos_id  # a document starts after an end-of-document token, as in training

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # training added no special tokens; neither does scoring
    return [int(t) for t in self.tok.encode_batch([string])[0]]

  def tok_decode(self, tokens) -> str:
    return self.tok.decode(tokens)

  @property
  def tokenizer_name(self) -> str:
    return str(self.loaded.cfg.data.tokenizer).replace("/", "__")

  # ------------------------------------------------------------------ scoring

  def _forward(self, windows: list[tuple[list[int], list[int]]]
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Target log-probabilities and greedy flags of each (input ids, target ids) window."""
    width = bucket_length(max(len(inp) for inp, _ in windows))
    tokens_BxL1 = np.zeros((self.batch_size, width + 1), np.int32)  # causal: padding unseen
    real_BxL = np.zeros((self.batch_size, width), bool)
    for row, (inp, tgt) in enumerate(windows):
      tokens_BxL1[row, :len(inp)] = inp
      tokens_BxL1[row, 1:len(tgt) + 1] = tgt
      real_BxL[row, :len(inp)] = True
    batch = jnp.asarray(tokens_BxL1)
    if self.mesh is not None:
      batch = parallel.put(tokens_BxL1, parallel.batch_sharding(self.mesh, 2, 0))
    out = jax.device_get(_token_stats(self.state, batch, self.graphdef))
    self.stats.add(np.asarray(out["active_LxBxL"]), real_BxL, out)
    logp_BxL, greedy_BxL = -np.asarray(out["nll_BxL"], np.float64), np.asarray(out["greedy_BxL"])
    return [(logp_BxL[row, :len(inp)], greedy_BxL[row, :len(inp)])
            for row, (inp, _) in enumerate(windows)]

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    seqs = []
    for _, context_enc, continuation_enc in requests:
      full = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
      seqs.append((full[:-1], full[1:], len(continuation_enc)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # similar lengths together
    results: list[tuple[float, bool] | None] = [None] * len(seqs)
    for s in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm,
                  desc="sparse_jax: loglikelihood", dynamic_ncols=True):
      ids = order[s:s + self.batch_size]
      scored = self._forward([(seqs[i][0], seqs[i][1]) for i in ids])
      for i, (logp, greedy) in zip(ids, scored):
        n_cont = seqs[i][2]
        cont = slice(len(logp) - n_cont, len(logp))
        results[i] = (float(logp[cont].sum()), bool(greedy[cont].all()))
        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of whole texts in disjoint windows of at most max_length tokens, each
    predicted once with as much context as fits (lm-eval's rolling windows), from the EOS."""
    windows, owners = [], []
    for k, (text,) in enumerate(req.args for req in requests):
      for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append(((text,), list(ctx), list(cont)))
        owners.append(k)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = np.zeros(len(requests))
    for k, (ll, _) in zip(owners, scores):
      totals[k] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
    return totals.tolist()

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or, with do_sample, temperature) continuations, cut at the first stop string."""
    from sparse_jax.nn.generate import generate
    out = []
    for req in tqdm(requests, disable=disable_tqdm, desc="sparse_jax: generate_until"):
      context, gen_kwargs = req.args
      kwargs = dict(gen_kwargs)
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
      temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) \
          else 0.0
      ids = self.tok_encode(context) or [self.prefix_token_id]
      ids = ids[-max(self.max_length - max_new, 1):]
      gen = generate(self.loaded.model, np.asarray([ids], np.int32), max_new_tokens=max_new,
                     temperature=temperature, seed=0, eos_id=self.tok.eos_id,
                     n_ids=self.tok.vocab_size)
      row = gen.row(0)
      if row and row[-1] == self.tok.eos_id:
        row = row[:-1]
      text = self.tok_decode(row)
      for stop in until:
        if stop and stop in text:
          text = text[:text.index(stop)]
      self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
      out.append(text)
    return out

  def sparsity(self) -> dict:
    """Active FFN neurons per token (mean, per layer) over every position scored so far."""
    return self.stats.result()


def local_tasks(out_dir: str, data: dict[str, str]) -> list[str]:
  """Writes ``<task>_local.yaml`` for each ``{task: jsonl path}`` (task one of LOCAL_TASKS):
  lm-eval's own task definition (included from the installed lm_eval) reading the local file.
  Returns the task names, for ``--include-path out_dir``."""
  import lm_eval.tasks
  root = os.path.dirname(lm_eval.tasks.__file__)
  os.makedirs(out_dir, exist_ok=True)
  names = []
  for task, path in data.items():
    if task not in LOCAL_TASKS:
      raise ValueError(f"local task {task!r}: must be one of {', '.join(LOCAL_TASKS)}")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"local task {task!r}: no data file {path!r}")
    name = f"{task}_local"
    # lm-eval's arc_challenge includes arc_easy by a relative path; including its file keeps that.
    spec = {"include": os.path.join(root, LOCAL_TASKS[task]), "task": name, "tag": [],
            "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": os.path.abspath(path)}},
            "training_split": None, "validation_split": None, "test_split": "test",
            "fewshot_split": None}
    with open(os.path.join(out_dir, f"{name}.yaml"), "w") as fh:
      json.dump(spec, fh, indent=2)  # JSON is YAML
    names.append(name)
  return names


def run_harness(checkpoint: str, tasks: list[str], *, include_path: str | None = None,
                limit: int | None = None, num_fewshot: int | None = None, **model_args) -> dict:
  """lm_eval.simple_evaluate on a checkpoint; returns lm-eval's results with ``sparsity`` added."""
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager
  lm = SparseJaxLM(checkpoint, **model_args)
  results = simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                            task_manager=TaskManager(include_path=include_path),
                            log_samples=True)
  results["sparsity"] = lm.sparsity()
  return results


def evaluate_harness(checkpoint: str, tasks: list[str], *, out: str | None = None,
                     include_path: str | None = None, limit: int | None = None,
                     num_fewshot: int | None = None, **model_args) -> str:
  """``sparse-jax eval --harness``: runs the tasks, writes ``harness.json`` (lm-eval's results and
  the sparsity) and ``harness_samples.jsonl`` under ``out``, returns the table to print."""
  from lm_eval.utils import make_table
  results = run_harness(checkpoint, tasks, include_path=include_path, limit=limit,
                        num_fewshot=num_fewshot, **model_args)
  if out is None:  # as sparse-jax eval's report
    out = os.path.join(checkpoint, "eval") if is_run_dir(checkpoint) else os.path.join(
        "runs", "eval-" + os.path.basename(os.path.normpath(checkpoint)))
  os.makedirs(out, exist_ok=True)
  samples = results.pop("samples", {})
  with open(os.path.join(out, "harness.json"), "w") as fh:
    json.dump(results, fh, indent=2, default=str)
  with open(os.path.join(out, "harness_samples.jsonl"), "w") as fh:
    for task, rows in samples.items():
      for row in rows:
        fh.write(json.dumps({"task": task, **row}, default=str) + "\n")
  sp = results["sparsity"]
  layers = " ".join(f"{x:.1f}" for x in sp["mean_active_per_layer"])
  return (f"{make_table(results)}\nFFN: {sp['mean_active']:.2f} of {sp['d_ff']} neurons active "
          f"per token ({sp['sparsity_pct']:.2f}% zero; per layer {layers}) over {sp['tokens']:,} "
          f"scored positions\nwrote {out}/harness.json, harness_samples.jsonl")


def main(argv: list[str] | None = None) -> None:
  """lm-eval's own command line, with the ``sparse_jax`` model registered; the FFN sparsity of
  each sparse_jax model it ran follows lm-eval's table."""
  import sys

  from lm_eval.__main__ import cli_evaluate
  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()
  for lm in SparseJaxLM.created:
    print(f"sparse_jax {lm.loaded.label} FFN sparsity: {json.dumps(lm.sparsity())}")


if __name__ == "__main__":
  main()
