"""Zero-shot multiple choice from local JSONL files, scored as lm-evaluation-harness does.

Each example is a context and N choices; the model scores every choice by the log-likelihood of
its tokens after the context (``" " + choice``, lm-eval's target delimiter). Two accuracies:

* ``acc``: the choice with the highest total log-likelihood;
* ``acc_norm``: the highest log-likelihood per character of the choice text (lm-eval's
  ``acc_norm``, which divides by ``len(choice)``), so long choices are not penalised for length.

The standard error of an accuracy p over n examples is lm-eval's ``sqrt(p (1 - p) / (n - 1))``
(the sample standard deviation of the per-example 0/1 scores over sqrt(n)).

Record shapes (one JSON object per line), with lm-eval's prompts:

* ``hellaswag``: ``ctx`` (or ``ctx_a`` + ``ctx_b``), optional ``activity_label``, ``endings``
  (list), ``label`` (int or digit string). Context ``"{activity_label}: {ctx_a} {Ctx_b}"`` (an
  empty label still gives the ``": "``, as lm-eval's), with HellaSwag's WikiHow markup removed
  from context and endings.
* ``arc``: ``question`` (string, or ``{"stem", "choices"}`` as in AI2's files), ``choices`` as
  ``{"text": [...], "label": [...]}`` or ``[{"text", "label"}, ...]``, ``answerKey``. Context
  ``"Question: {question}\\nAnswer:"``.
* ``piqa``: ``goal``, ``sol1``, ``sol2``, ``label`` (0 or 1). Context
  ``"Question: {goal}\\nAnswer:"``.

The shape is detected from the first record (or named: ``arc:path.jsonl``); every record must
have it. Context and choice are tokenized together and split as lm-eval's ``TemplateLM`` does (no
BOS: the model never saw one), and a sequence longer than ``max_len + 1`` tokens keeps its last
tokens, as lm-eval's HF model truncates. ``sparse_jax.eval.harness`` runs lm-eval itself;
tests/test_harness.py checks that both give the same per-example log-likelihoods.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparse_jax.data.sources import read_jsonl_records
from sparse_jax.data.tokenizer import Tokenizer
from sparse_jax.eval.lm import target_logprob
from sparse_jax.nn import Transformer

@dataclasses.dataclass(frozen=True)
class Example:
  context: str
  choices: tuple[str, ...]
  label: int


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  format: str
  path: str
  examples: tuple[Example, ...]


class _Bad(ValueError):
  """A record that lacks what its format needs (the loader adds file and line)."""


def _field(record: dict, name: str):
  if name not in record:
    raise _Bad(f"no {name!r} field")
  return record[name]


def _label(value, n_choices: int) -> int:
  if isinstance(value, str) and value.strip().lstrip("-").isdigit():
    value = int(value)
  if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_choices:
    raise _Bad(f"label {value!r} is not an index into the {n_choices} choices")
  return value


def _hellaswag_text(text: str) -> str:
  # lm-eval's HellaSwag preprocessing: WikiHow "[title]" marks become sentence breaks, other
  # bracketed markup goes, double spaces collapse.
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def _hellaswag(record: dict) -> Example:
  if "ctx_a" in record:
    ctx = f"{_field(record, 'ctx_a')} {str(_field(record, 'ctx_b')).capitalize()}"
  else:
    ctx = str(_field(record, "ctx"))
  ctx = f"{record.get('activity_label', '')}: {ctx}"
  endings = _field(record, "endings")
  if not isinstance(endings, list) or len(endings) < 2:
    raise _Bad("'endings' must be a list of at least two strings")
  choices = tuple(_hellaswag_text(str(e)) for e in endings)
  return Example(_hellaswag_text(ctx), choices, _label(_field(record, "label"), len(choices)))


def _arc(record: dict) -> Example:
  question = _field(record, "question")
  choices = record.get("choices")
  if isinstance(question, dict):  # AI2's original files nest the choices in the question
    choices = question.get("choices", choices)
    question = question.get("stem")
    if question is None:
      raise _Bad("'question' is an object without a 'stem'")
  if isinstance(choices, dict):
    texts, labels = choices.get("text"), choices.get("label")
  elif isinstance(choices, list) and all(isinstance(c, dict) for c in choices):
    texts, labels = [c.get("text") for c in choices], [c.get("label") for c in choices]
  else:
    raise _Bad("'choices' must be {'text': [...], 'label': [...]} or a list of "
               "{'text', 'label'} objects")
  if not texts or not labels or len(texts) != len(labels) or None in texts:
    raise _Bad("'choices' needs as many labels as texts")
  key = str(_field(record, "answerKey"))
  if key not in [str(x) for x in labels]:
    raise _Bad(f"answerKey {key!r} is not one of the choice labels {labels}")
  return Example(f"Question: {question}\nAnswer:", tuple(str(t) for t in texts),
                 [str(x) for x in labels].index(key))


def _piqa(record: dict) -> Example:
  choices = (str(_field(record, "sol1")), str(_field(record, "sol2")))
  return Example(f"Question: {_field(record, 'goal')}\nAnswer:", choices,
                 _label(_field(record, "label"), 2))


FORMATS = {"hellaswag": _hellaswag, "arc": _arc, "piqa": _piqa}
_SIGNATURES = {"hellaswag": ("endings",), "arc": ("question", "answerKey"),
               "piqa": ("goal", "sol1", "sol2")}


def detect_format(record: dict) -> str | None:
  for name, keys in _SIGNATURES.items():
    if all(k in record for k in keys):
      return name
  return None


def load_task(spec: str) -> Task:
  """``path.jsonl`` (shape detected) or ``FORMAT:path.jsonl`` with FORMAT one of FORMATS."""
  fmt, sep, path = spec.partition(":")
  if not sep or fmt not in FORMATS:
    fmt, path = None, spec
  if not os.path.isfile(path):
    raise FileNotFoundError(f"multiple-choice task file {path!r} does not exist")
  examples = []
  for n, record in read_jsonl_records(path):
    if fmt is None:
      fmt = detect_format(record)
      if fmt is None:
        shapes = "; ".join(f"{k}: {', '.join(v)}" for k, v in _SIGNATURES.items())
        raise ValueError(f"{path}:{n}: unknown multiple-choice record shape (fields "
                         f"{sorted(record)}); supported shapes and their key fields: {shapes}")
    try:
      examples.append(FORMATS[fmt](record))
    except _Bad as e:
      raise ValueError(f"{path}:{n}: not a {fmt} record: {e}") from None
  if not examples:
    raise ValueError(f"{path}: no records")
  name = os.path.splitext(os.path.basename(path))[0]
  return Task(name=name, format=fmt, path=path, examples=tuple(examples))


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str
                ) -> tuple[np.ndarray, np.ndarray]:
  """(context ids, continuation ids) split as lm-eval does: trailing spaces of the context move to
  the continuation, the pair is tokenized as one string and split at the context's length, so
  tokens that merge across the boundary are scored as the tokenizer would produce them (a
  continuation that merges wholly into the context's last token scores nothing, as in lm-eval).
  An empty context becomes the end-of-document token (lm-eval's prefix token), unless the
  continuation starts with it."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  if not context:
    cont = tokenizer.encode_batch([continuation])[0]
    if len(cont) and cont[0] == tokenizer.eos_id:
      return np.asarray(cont[:1], np.int32), np.asarray(cont[1:], np.int32)
    return np.asarray([tokenizer.eos_id], np.int32), np.asarray(cont, np.int32)
  whole, ctx = tokenizer.encode_batch([context + continuation, context])
  return np.asarray(ctx, np.int32), np.asarray(whole[len(ctx):], np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _continuation_logprob(state, tokens_BxL, targets_BxL, mask_BxL, graphdef):
  tok_logp_BxL = target_logprob(nnx.merge(graphdef, state)(tokens_BxL), targets_BxL)
  return jnp.sum(jnp.where(mask_BxL, tok_logp_BxL, 0.0), axis=-1)


def bucket_length(length: int) -> int:
  # Few distinct padded lengths, so few compilations: multiples of 32 up to 256, then of 128.
  step = 32 if length <= 256 else 128
  return -(-length // step) * step


def loglikelihoods(model: Transformer, requests: list[tuple[np.ndarray, np.ndarray]], *,
                   max_len: int, batch_size: int, progress: bool = True,
                   desc: str = "") -> np.ndarray:
  """Sum of log p(continuation | context) for each (context ids, continuation ids) pair."""
  seqs = []
  for ctx, cont in requests:
    if len(cont) > max_len:
      raise ValueError(f"a choice of {len(cont)} tokens does not fit the maximum length "
                       f"{max_len}; raise it")
    full = np.concatenate([ctx, cont])[-(max_len + 1):]
    seqs.append((full[:-1], full[1:], len(cont)))
  order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # similar lengths together
  graphdef, state = nnx.split(model)
  out = np.zeros(len(seqs))
  starts = range(0, len(order), batch_size)
  for s in tqdm(starts, desc=desc or "eval: multiple choice", unit="batch", disable=not progress,
                dynamic_ncols=True):
    ids = order[s:s + batch_size]
    width = bucket_length(max(len(seqs[i][0]) for i in ids))
    tokens = np.zeros((batch_size, width), np.int32)  # pad rows and columns: causal, so unseen
    targets = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), bool)
    for row, i in enumerate(ids):
      inp, tgt, n_cont = seqs[i]
      tokens[row, :len(inp)], targets[row, :len(tgt)] = inp, tgt
      mask[row, len(inp) - n_cont:len(inp)] = True
    lp = _continuation_logprob(state, jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(mask),
                               graphdef)
    out[ids] = np.asarray(lp)[:len(ids)]
  return out


def stderr(p: float, n: int) -> float | None:
  """lm-eval's standard error of a mean of 0/1 scores: sqrt(p (1 - p) / (n - 1))."""
  return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def evaluate_task(model: Transformer, tokenizer: Tokenizer, task: Task, *, max_len: int,
                  batch_size: int = 16, progress: bool = True) -> tuple[dict, list[dict]]:
  """(summary, per-example predictions) of one task."""
  requests, owners = [], []
  for e_idx, ex in enumerate(task.examples):
    for choice in ex.choices:
      requests.append(encode_pair(tokenizer, ex.context, " " + choice))
      owners.append(e_idx)
  lls = loglikelihoods(model, requests, max_len=max_len, batch_size=batch_size,
                       progress=progress, desc=f"eval: {task.name}")
  preds, hits, hits_norm = [], [], []
  start = 0
  for ex in task.examples:
    ll = lls[start:start + len(ex.choices)]
    start += len(ex.choices)
    ll_norm = ll / np.asarray([len(c) for c in ex.choices], np.float64)
    pred, pred_norm = int(np.argmax(ll)), int(np.argmax(ll_norm))
    hits.append(pred == ex.label)
    hits_norm.append(pred_norm == ex.label)
    preds.append(dict(label=ex.label, pred=pred, pred_norm=pred_norm, loglikelihoods=ll.tolist()))
  n = len(task.examples)
  acc, acc_norm = float(np.mean(hits)), float(np.mean(hits_norm))
  n_choices = sorted({len(ex.choices) for ex in task.examples})
  summary = dict(task=task.name, format=task.format, path=task.path, n=n, choices=n_choices,
                 chance=float(np.mean([1 / len(ex.choices) for ex in task.examples])),
                 acc=acc, acc_stderr=stderr(acc, n), acc_norm=acc_norm,
                 acc_norm_stderr=stderr(acc_norm, n))
  return summary, preds
