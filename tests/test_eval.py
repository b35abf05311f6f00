"""Checkpoint evaluation: per-token sparsity agrees with the op's statistics, the accumulator's
numbers, multiple-choice formats and scoring, and the eval / generate / export-hf commands on a
short training run (report files, agreement with the training evaluation, HF round trip)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.cli import main
from sparse_jax.config import FFN_KINDS, ModelConfig, apply_overrides, get_config
from sparse_jax.data import ByteTokenizer
from sparse_jax.eval import (EvalOptions, SparsityAccumulator, load_task, loglikelihoods,
                             token_stats)
from sparse_jax.eval.lm import SURPRISAL_EDGES
from sparse_jax.eval.multiple_choice import encode_pair, stderr
from sparse_jax.nn import Transformer, forward_with_stats
from sparse_jax.train import train

VOCAB = 259


def random_model(key, **kw) -> Transformer:
  base = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, d_ff=176,
              compute_dtype="float32")
  return Transformer(ModelConfig(**{**base, **kw}),
                     rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 1 << 30))))


@pytest.mark.parametrize("ffn,dtype", [(k, "float32") for k in FFN_KINDS]
                         + [("relu_sparse", "bfloat16")])
def test_per_token_counts_agree_with_the_ops_statistics(key, ffn, dtype):
  model = random_model(key, ffn=ffn, compute_dtype=dtype)
  tokens = jax.random.randint(jax.random.fold_in(key, 1), (3, 21), 0, VOCAB)
  out = nnx.jit(token_stats)(model, tokens)
  logits, stats = nnx.jit(forward_with_stats)(model, tokens[:, :-1])
  active_LxBxL = np.asarray(out["active_LxBxL"])
  # Summed over tokens: the op's per-neuron counts; averaged: its L0.
  np.testing.assert_array_equal(active_LxBxL.sum(axis=(1, 2)),
                                np.asarray(stats.active_per_neuron).sum(axis=1))
  np.testing.assert_allclose(active_LxBxL.mean(axis=(1, 2)), stats.l0, rtol=1e-6)
  assert active_LxBxL.min() > 0 and active_LxBxL.max() <= 176
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
  tol = 2e-5 if dtype == "float32" else 3e-2  # bf16: two compilations may round differently
  np.testing.assert_allclose(out["nll_BxL"], nll, rtol=tol, atol=tol)


def test_accumulator_numbers(key):
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  n_layers, d_ff, b, length = 2, 40, 3, 9
  acc = SparsityAccumulator(n_layers=n_layers, d_ff=d_ff, seq_len=length)
  batches = []
  for _ in range(2):
    fired = rng.integers(0, 5, (n_layers, d_ff))
    fired[:, :3] = 0  # three dead neurons per layer
    batch = dict(nll_BxL=rng.exponential(2.0, (b, length)),
                 active_LxBxL=rng.integers(0, d_ff + 1, (n_layers, b, length)),
                 active_per_neuron_LxF=fired, overflow_rows_L=np.asarray([1, 0]),
                 dense_fallback_L=np.asarray([False, True]))
    acc.add(batch)
    batches.append(batch)
  r = acc.result()
  nll = np.concatenate([x["nll_BxL"] for x in batches])
  act = np.concatenate([x["active_LxBxL"] for x in batches], axis=1)  # [L, 2B, length]
  assert r["tokens"] == nll.size and r["overflow_rows"] == 2 and r["dense_fallback_calls"] == 2
  np.testing.assert_allclose(r["ppl"], np.exp(nll.mean()), rtol=1e-12)
  for layer in range(n_layers):
    x = r["layers"][layer]
    np.testing.assert_allclose(x["mean_active"], act[layer].mean(), rtol=1e-12)
    assert x["p50"] == int(np.percentile(act[layer], 50, method="inverted_cdf"))
    assert x["max_active"] == act[layer].max()
    fired = batches[0]["active_per_neuron_LxF"][layer] + batches[1]["active_per_neuron_LxF"][layer]
    assert x["dead_neurons"] == np.sum(fired == 0) >= 3
  np.testing.assert_allclose(r["by_position"]["mean_active"], act.mean(axis=(0, 1)), rtol=1e-12)
  # Surprisal of the token at t is the loss predicted at t - 1.
  s = nll[:, :-1].ravel()
  a = act[:, :, 1:].reshape(n_layers, -1).mean(axis=0)
  bins = np.digitize(s, SURPRISAL_EDGES[1:-1])
  want = [a[bins == k].mean() for k in np.unique(bins)]
  np.testing.assert_allclose(r["by_surprisal"]["mean_active"], want, rtol=1e-12)
  assert sum(r["by_surprisal"]["tokens"]) == s.size


# --------------------------------------------------------------------------- multiple choice


def write_jsonl(path, records) -> str:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


def test_task_shapes(tmp_path):
  hs = load_task(write_jsonl(tmp_path / "hs.jsonl", [
      {"activity_label": "Baking", "ctx_a": "She mixes the flour.", "ctx_b": "then she",
       "endings": ["bakes [title] the cake.", "sings  loudly", "c", "d"], "label": "1"},
      {"ctx": "A man walks.", "endings": ["x", "y"], "label": 0}]))
  assert hs.format == "hellaswag" and hs.name == "hs"
  assert hs.examples[0].context == "Baking: She mixes the flour. Then she"
  assert hs.examples[0].choices[:2] == ("bakes. the cake.", "sings loudly")
  assert [e.label for e in hs.examples] == [1, 0] and hs.examples[1].context == ": A man walks."
  arc = load_task(write_jsonl(tmp_path / "arc.jsonl", [
      {"question": "Which is a metal?", "choices": {"text": ["wood", "iron"], "label": ["A", "B"]},
       "answerKey": "B"},
      {"question": {"stem": "2 + 2?", "choices": [{"text": "4", "label": "1"},
                                                  {"text": "5", "label": "2"}]},
       "answerKey": "1"}]))
  assert arc.format == "arc" and arc.examples[0].context == "Question: Which is a metal?\nAnswer:"
  assert [e.label for e in arc.examples] == [1, 0] and arc.examples[1].choices == ("4", "5")
  piqa = load_task("piqa:" + write_jsonl(tmp_path / "p.jsonl", [
      {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}]))
  assert piqa.format == "piqa" and piqa.examples[0].choices == ("twist the lid", "eat the lid")


@pytest.mark.parametrize("records,message", [
    ([{"prompt": "x", "answer": "y"}], r"bad.jsonl:1: unknown multiple-choice record shape "
                                       r"\(fields \['answer', 'prompt'\]\).*piqa: goal, sol1"),
    ([{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g", "sol1": "a"}],
     "bad.jsonl:2: not a piqa record: no 'sol2' field"),
    ([{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}],
     "answerKey 'C' is not one of the choice labels"),
    ([{"ctx": "c", "endings": ["a", "b"], "label": 5}], "label 5 is not an index into the 2"),
    ([{"ctx": "c", "endings": ["a", "b"], "label": ""}], "label '' is not an index"),
    ([], "no records"),
])
def test_bad_task_files(tmp_path, records, message):
  with pytest.raises(ValueError, match=message):
    load_task(write_jsonl(tmp_path / "bad.jsonl", records))


def test_bad_json_line_and_missing_file(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{not json\n')
  with pytest.raises(ValueError, match="t.jsonl:2: not valid JSON"):
    load_task(str(path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_task(str(tmp_path / "missing.jsonl"))


def test_loglikelihoods_equal_unpadded_forward(key):
  model = random_model(key, ffn="relu_dense")
  tok = ByteTokenizer()
  pairs = [("Question: what?\nAnswer:", " yes"), ("ab", " a much longer continuation"),
           ("x" * 40, " end"), ("", " no context")]
  requests = [encode_pair(tok, c, x) for c, x in pairs]
  max_len = 32  # the third request is cut to its last 33 tokens
  got = loglikelihoods(model, requests, max_len=max_len, batch_size=3, progress=False)
  plain = nnx.jit(lambda m, t: m(t))
  for (ctx, cont), g in zip(requests, got):
    full = np.concatenate([ctx, cont])[-(max_len + 1):]
    logp = jax.nn.log_softmax(plain(model, jnp.asarray(full[None, :-1]))[0])
    want = sum(float(logp[len(full) - 1 - len(cont) + j, t]) for j, t in enumerate(cont))
    np.testing.assert_allclose(g, want, rtol=1e-5)
  assert requests[3][0].tolist() == [tok.eos_id]  # empty context: the end-of-document token


def test_encode_pair_moves_trailing_spaces_and_stderr():
  ctx, cont = encode_pair(ByteTokenizer(), "Answer: ", "yes")
  assert bytes(ctx.tolist()) == b"Answer:" and bytes(cont.tolist()) == b" yes"
  assert stderr(0.5, 21) == pytest.approx(np.sqrt(0.25 / 20))
  scores = np.r_[np.ones(7), np.zeros(13)]  # lm-eval: sample std / sqrt(n)
  assert stderr(0.35, 20) == pytest.approx(np.std(scores, ddof=1) / np.sqrt(20))
  assert stderr(1.0, 1) is None


# --------------------------------------------------------------------------- on a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 40-step tiny run on 200 stdlib files (~10 s): byte statistics of Python source."""
  seed = int.from_bytes(os.urandom(3), "little")
  print(f"run seed: {seed}")
  overrides = ["data.max_docs=200", "train.steps=40", "train.log_every=10",
               "train.eval_every=1000", "train.eval_batches=2", "train.ckpt_every=1000",
               "train.warmup_steps=5", "train.batch_size=8", "data.seq_len=64",
               f"train.seed={seed}", f"data.seed={seed}"]
  out = str(tmp_path_factory.mktemp("run"))
  summary = train(apply_overrides(get_config("tiny"), overrides), out, progress=False)
  return out, summary


def python_vs_garbage_task(path, rng, n=24) -> str:
  """PIQA-shaped: a Python statement against the same length of characters that never occur in
  the training text. Any model that learnt byte statistics picks the Python."""
  snippets = ["return self", "import os", "for i in range(n):", "if x is None:", "def f(self):",
              "print(value)", "raise ValueError", "except KeyError:"]
  odd = list("ʬ¤ΩЖ჻ꙮ⌘")
  records = []
  for i in range(n):
    good = snippets[rng.integers(len(snippets))]
    bad = "".join(rng.choice(odd, size=len(good)))
    label = int(rng.integers(2))
    sols = (good, bad) if label == 0 else (bad, good)
    records.append({"goal": f"Python line {i}", "sol1": sols[0], "sol2": sols[1], "label": label})
  return write_jsonl(path, records)


def test_eval_command_on_a_run(run, tmp_path, capsys):
  out, summary = run
  rng = np.random.default_rng(int.from_bytes(os.urandom(3), "little"))
  piqa = python_vs_garbage_task(tmp_path / "pyq.jsonl", rng)
  arc = write_jsonl(tmp_path / "arc.jsonl", [
      {"question": f"{a} + {b} =", "choices": {"text": [str(a + b), str(a + b + 1), "x"],
                                               "label": ["A", "B", "C"]}, "answerKey": "A"}
      for a, b in rng.integers(0, 50, (6, 2))])
  report_dir = str(tmp_path / "report")
  # The training evaluation's windows: the validation split in batches of 8, first 2 batches.
  assert main(["eval", "--checkpoint", out, "--out", report_dir, "--batch-size", "8",
               "--max-batches", "2", "--tasks", piqa, arc, "--no-progress"]) == 0
  table = capsys.readouterr().out
  assert "perplexity" in table and "pyq (piqa)" in table
  r = json.load(open(os.path.join(report_dir, "report.json")))
  lm = r["lm"]
  print(f"eval ce {lm['ce']:.4f} (training eval {summary['val_ce']:.4f}), active/token "
        f"{[x['mean_active'] for x in lm['layers']]}")
  np.testing.assert_allclose(lm["ce"], summary["val_ce"], rtol=1e-5)
  np.testing.assert_allclose([x["mean_active"] for x in lm["layers"]],
                             summary["val_active_per_token_L"], rtol=1e-5)
  assert lm["tokens"] == 2 * 8 * 64 and len(lm["by_position"]["keys"]) == 64
  for name in ("report.md", "sparsity_by_layer.png", "active_distribution.png",
               "sparsity_by_position.png", "sparsity_by_surprisal.png", "neuron_firing.png"):
    with open(os.path.join(report_dir, name), "rb") as f:
      head = f.read(8)
    assert name.endswith(".md") or head == b"\x89PNG\r\n\x1a\n"
  assert "## Zero-shot multiple choice" in open(os.path.join(report_dir, "report.md")).read()
  mc = {t["task"]: t for t in r["multiple_choice"]}
  print(f"python-vs-garbage acc {mc['pyq']['acc']:.3f} acc_norm {mc['pyq']['acc_norm']:.3f}")
  assert mc["pyq"]["acc"] >= 0.9 and mc["pyq"]["acc_norm"] >= 0.9
  assert mc["pyq"]["acc_stderr"] == pytest.approx(stderr(mc["pyq"]["acc"], 24))
  preds = [json.loads(line) for line in open(os.path.join(report_dir, "mc_arc.jsonl"))]
  assert mc["arc"]["n"] == 6 and mc["arc"]["chance"] == pytest.approx(1 / 3)
  assert mc["arc"]["acc"] == pytest.approx(np.mean([p["pred"] == p["label"] for p in preds]))


def test_export_then_eval_the_hf_checkpoint(run, tmp_path, capsys):
  out, _ = run
  hf_dir = str(tmp_path / "hf")
  assert main(["export-hf", "--checkpoint", out, "--out", hf_dir]) == 0
  text = tmp_path / "eval.txt"
  text.write_text(open(os.__file__).read()[:20000])
  reports = {}
  for name, ckpt in (("run", out), ("hf", hf_dir)):
    # The same compute dtype for both: a run keeps bf16, an import defaults to fp32.
    assert main(["eval", "--checkpoint", ckpt, "--out", str(tmp_path / name), "--data", str(text),
                 "--compute-dtype", "float32", "--max-batches", "4", "--no-progress"]) == 0
    reports[name] = json.load(open(tmp_path / name / "report.json"))["lm"]
  np.testing.assert_allclose(reports["hf"]["ce"], reports["run"]["ce"], rtol=1e-6)
  assert reports["hf"]["layers"] == reports["run"]["layers"]
  capsys.readouterr()
  assert main(["export-hf", "--checkpoint", out, "--out", hf_dir]) == 2
  assert "already exists" in capsys.readouterr().err


def test_generate_command(run, capsys):
  out, _ = run
  args = ["generate", "--checkpoint", out, "--prompt", "def ", "--max-new-tokens", "24",
          "--temperature", "0.9", "--top-p", "0.9", "--num-samples", "2", "--seed", "5"]
  assert main(args) == 0
  first = capsys.readouterr().out
  assert main(args) == 0
  assert capsys.readouterr().out.split("---")[:5] == first.split("---")[:5]  # the same samples
  assert first.count("--- sample") == 2 and "\ndef " in first
  assert "active FFN neurons per generated token" in first
  assert "layers unrolled, FFN decode path model" in first  # CPU: the model's own path
  assert main(args[:-1] + ["6"]) == 0
  assert capsys.readouterr().out.split("---")[:5] != first.split("---")[:5]
  assert main(args + ["--layers", "scan"]) == 0  # (scan = unrolled: tests/test_generate.py)
  assert "layers scan, FFN decode path model" in capsys.readouterr().out


def test_command_errors(run, tmp_path, capsys):
  out, _ = run
  assert main(["eval", "--checkpoint", str(tmp_path)]) == 2
  assert "neither a run directory" in capsys.readouterr().err
  bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
  assert main(["eval", "--checkpoint", out, "--tasks", bad, "--no-progress"]) == 2
  assert "unknown multiple-choice record shape" in capsys.readouterr().err
  assert main(["generate", "--checkpoint", out, "--top-p", "1.5"]) == 2
  assert "top_p=1.5" in capsys.readouterr().err
  with pytest.raises(ValueError, match="nothing to evaluate"):
    EvalOptions(checkpoint=out, lm=False)
  hf_dir = tmp_path / "hf"
  assert main(["export-hf", "--checkpoint", out, "--out", str(hf_dir)]) == 0
  os.remove(hf_dir / "tokenizer.json")
  capsys.readouterr()
  assert main(["eval", "--checkpoint", str(hf_dir), "--no-progress"]) == 2
  assert "has no tokenizer.json" in capsys.readouterr().err
