"""lm-evaluation-harness on a sparse_jax checkpoint (CPU, offline): lm-eval's own hellaswag, arc
and piqa definitions over local files give the same per-example log-likelihoods and accuracies
as the project's scorer; rolling log-likelihood, generation and a data mesh agree with the model."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from sparse_jax import hf  # noqa: E402
from sparse_jax.config import ModelConfig  # noqa: E402
from sparse_jax.data import ByteTokenizer  # noqa: E402
from sparse_jax.eval.harness import SparseJaxLM, local_tasks  # noqa: E402
from sparse_jax.eval.multiple_choice import evaluate_task, load_task  # noqa: E402
from sparse_jax.nn import Transformer  # noqa: E402

MAX_LEN = 48  # short, so that the long hellaswag contexts below are truncated (left)


def _words(rng, n):
  vocab = ["the", "cat", "sat", "on", "a", "mat", "then", "she", "ran", "home", "to", "eat",
           "bread", "[title]", "[step]", "quickly", "green", "water", "jar"]
  return " ".join(rng.choice(vocab, size=n))


def _data(tmp_path, rng):
  # Endings start with a plain word: one of only "[title]" would be "" after lm-eval's
  # preprocessing, and lm-eval fails on an empty choice.
  hellaswag = [{"activity_label": "" if i == 0 else _words(rng, 2), "ctx_a": _words(rng, 6 + 8 * i),
                "ctx_b": _words(rng, 3), "endings": ["she " + _words(rng, int(k)) for k in
                                                     rng.integers(1, 6, 4)],
                "label": str(int(rng.integers(0, 4)))} for i in range(5)]
  arc = [{"question": _words(rng, 5) + "?", "choices": {"text": [_words(rng, int(k)) for k in
                                                                rng.integers(1, 4, 3)],
                                                       "label": ["A", "B", "C"]},
          "answerKey": "ABC"[int(rng.integers(0, 3))]} for _ in range(5)]
  piqa = [{"goal": _words(rng, 4), "sol1": _words(rng, 3), "sol2": _words(rng, 5),
           "label": int(rng.integers(0, 2))} for _ in range(5)]
  out = {}
  for name, records in (("hellaswag", hellaswag), ("arc_easy", arc), ("piqa", piqa)):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out[name] = str(path)
  return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A random sparse (relu_sparse) byte-level model, exported as a Hugging Face directory."""
  cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                    compute_dtype="float32", tie_embeddings=False)
  path = str(tmp_path_factory.mktemp("harness") / "ckpt")
  hf.export_hf(Transformer(cfg, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30)))),
               path, max_position_embeddings=MAX_LEN)
  return path


def test_lm_eval_equals_the_project_scorer(tmp_path, checkpoint, key):
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  data = _data(tmp_path, rng)
  names = local_tasks(str(tmp_path / "tasks"), data)
  lm = SparseJaxLM(checkpoint, batch_size=8)
  assert lm.max_length == MAX_LEN
  results = lm_eval.simple_evaluate(model=lm, tasks=names, log_samples=True,
                                    task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
  fmt = {"hellaswag": "hellaswag", "arc_easy": "arc", "piqa": "piqa"}
  for task, path in data.items():
    name = f"{task}_local"
    ours, preds = evaluate_task(lm.loaded.model, lm.tok, load_task(f"{fmt[task]}:{path}"),
                                max_len=MAX_LEN, batch_size=4, progress=False)
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    assert len(samples) == len(preds) == 5
    for sample, pred in zip(samples, preds):
      theirs = [r[0][0] for r in sample["resps"]]
      np.testing.assert_allclose(theirs, pred["loglikelihoods"], rtol=1e-5, atol=1e-5)
      assert int(sample["target"]) == pred["label"]
    scores = results["results"][name]
    assert scores["acc,none"] == ours["acc"] and scores["acc_norm,none"] == ours["acc_norm"]
  sparsity = lm.sparsity()
  assert sparsity["tokens"] > 0 and 0 < sparsity["mean_active"] < 64


def test_rolling_and_generation_follow_the_model(checkpoint):
  lm = SparseJaxLM(checkpoint, batch_size=4, max_length=16)
  text = "the cat sat on the mat"  # 22 bytes: more than one 16-token window
  (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
  ids = [ByteTokenizer.EOS] + list(text.encode())
  logits = np.asarray(lm.loaded.model(np.asarray([ids[:17]]))[0], np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  first = sum(logp[i, ids[i + 1]] for i in range(16))  # the first window, from the EOS
  # The last 6 tokens, with the 16 before them as context (the window keeps max_length inputs).
  rest = lm._loglikelihood_tokens([((text,), ids[6:17], ids[17:])])[0][0]
  assert rolling == pytest.approx(first + rest, rel=1e-5)
  (free,) = lm.generate_until([Instance("generate_until", {}, ("the cat", {"max_gen_toks": 6}),
                                        0)])
  assert len(free) <= 6  # characters: at most one per byte token
  if free:  # a stop string cuts the text before it
    (cut,) = lm.generate_until([Instance("generate_until", {},
                                         ("the cat", {"max_gen_toks": 6, "until": [free[-1]]}),
                                         0)])
    assert cut == free[:free.index(free[-1])]


def test_a_data_mesh_gives_the_same_scores(checkpoint):
  requests = [Instance("loglikelihood", {}, ("Question: the cat\nAnswer:", f" {w}"), i)
              for i, w in enumerate(["mat", "green water", "a", "home to eat bread"])]
  one = SparseJaxLM(checkpoint, batch_size=4).loglikelihood(requests)
  meshed = SparseJaxLM(checkpoint, batch_size=3, mesh="data:-1")  # every (virtual) device
  assert meshed.batch_size == len(jax.devices())  # rounded up to a multiple of the devices
  many = meshed.loglikelihood(requests)
  np.testing.assert_allclose([x[0] for x in many], [x[0] for x in one], rtol=1e-5)
  assert [x[1] for x in many] == [x[1] for x in one]
