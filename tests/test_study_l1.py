"""experiments/study_l1.py and its report (sparse_jax.eval.study_report): a tiny L1 sweep on the
CPU, interrupted and resumed, then its report."""
import json
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import study_l1  # noqa: E402
from sparse_jax.eval import study_report  # noqa: E402

STEPS = 4


def _argv(tmp_path, *extra):
  return ["--config", "tiny", "--steps", str(STEPS), "--coeffs", "0", "1e-3",
          "--eval-batches", "2", "--out", str(tmp_path / "out"),
          "--results", str(tmp_path / "results"), "--doc", str(tmp_path / "doc" / "study.md"),
          "--no-progress", "--set", "data.max_docs=60", "data.seq_len=32", "train.batch_size=8",
          "model.n_layers=1", "model.d_model=64", "model.n_heads=2", "model.d_ff=128",
          *extra]


def _finite(obj, where="study"):
  if isinstance(obj, float):
    assert math.isfinite(obj), where
  elif isinstance(obj, dict):
    for k, v in obj.items():
      _finite(v, f"{where}.{k}")
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      _finite(v, f"{where}[{i}]")


def test_settle_step():
  steps = [10, 20, 30, 40, 50, 60, 70]
  # Final value: mean of the last 5 = 10; within 10% from step 30 on.
  assert study_report.settle_step(steps, [100, 50, 10.5, 9.5, 10, 10, 10], tail=5)["step"] == 30
  # A late excursion moves the settling step past it.
  assert study_report.settle_step(steps, [10, 10, 10, 20, 10, 10, 10], tail=3)["step"] == 50
  assert study_report.settle_step([], [])["step"] is None


def test_arguments_are_checked(tmp_path, capsys):
  with pytest.raises(SystemExit):
    study_l1.parse_args(["--set", "train.l1_coeff=1e-3"])
  assert "per run" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    study_l1.parse_args(["--coeffs", "1e-3", "1e-3"])
  args = study_l1.parse_args(["--config", "small"])
  assert args.steps == study_l1.DEFAULT_STEPS["small"] and args.out == "runs/study_l1_small"
  assert [r.name for r in study_l1.plan_runs(args)] == [
      "silu_dense", "relu_l1_0", "relu_l1_1.00e-05", "relu_l1_3.16e-05", "relu_l1_1.00e-04",
      "relu_l1_3.16e-04", "relu_l1_1.00e-03"]
  cfg = study_l1.study_config(args)
  assert (cfg.train.l1_norm, cfg.data.source, cfg.train.steps) == ("sum_neurons", "stdlib-prose",
                                                                   args.steps)


def test_sweep_resumes_and_reports(tmp_path, capsys):
  # 1. Interrupted: the first run stops at step 2 (checkpoint saved), the sweep stops.
  first = study_l1.run(_argv(tmp_path, "--stop-at", "2"))
  assert first["actions"] == {"silu_dense": "partial (step 2, stop_at)"}
  assert first["study"] is None
  assert os.path.isdir(tmp_path / "out" / "runs" / "silu_dense" / "checkpoints" / "2")
  assert not os.path.exists(tmp_path / "results" / "runs")

  # 2. Resumed: the partial run continues from step 2, the others train.
  second = study_l1.run(_argv(tmp_path))
  assert second["actions"] == {"silu_dense": "resumed from step 2", "relu_l1_0": "trained",
                               "relu_l1_1.00e-03": "trained"}
  runs = tmp_path / "results" / "runs"
  mtimes = {p: os.path.getmtime(runs / p) for p in os.listdir(runs)}
  assert sorted(mtimes) == ["relu_l1_0.json", "relu_l1_1.00e-03.json", "silu_dense.json"]
  metrics = [json.loads(x) for x in open(tmp_path / "out" / "runs" / "silu_dense" /
                                         "metrics.jsonl")]
  train_steps = [r["step"] for r in metrics if r["split"] == "train"]
  assert train_steps == sorted(set(train_steps)) and train_steps[-1] == STEPS

  # 3. Nothing left: finished runs are not retrained; the report is rewritten.
  third = study_l1.run(_argv(tmp_path))
  assert set(third["actions"].values()) == {"skipped (done)"}
  assert {p: os.path.getmtime(runs / p) for p in os.listdir(runs)} == mtimes
  printed = capsys.readouterr().out
  assert "relu_l1_1.00e-03" in printed and "report:" in printed
  # A results folder that lost a run's JSON gets it back from the copy beside the checkpoints.
  kept = open(runs / "relu_l1_0.json").read()
  os.remove(runs / "relu_l1_0.json")
  assert set(study_l1.run(_argv(tmp_path, "--plan"))["actions"].values()) == {"skipped (done)"}
  assert open(runs / "relu_l1_0.json").read() == kept

  # 4. The report: files, finite numbers, consistent with each other.
  results = tmp_path / "results"
  for name in ["study.json", "table.md", *study_report.PLOTS.values()]:
    assert os.path.getsize(results / name) > 0, name
  doc = open(tmp_path / "doc" / "study.md").read()
  assert "## The paper's claims against these numbers" in doc and "sum_neurons" in doc
  for png in study_report.PLOTS.values():
    assert png in doc
  study = json.load(open(results / "study.json"))
  _finite(study)
  assert study["missing"] == [] and len(study["runs"]) == 3
  assert study["corpus"]["documents"] == 60 and study["corpus"]["train_tokens"] > 0
  assert study["token_budget"] == STEPS * 8 * 32
  assert study["epochs"] == pytest.approx(study["token_budget"] / study["corpus"]["train_tokens"])
  assert {c["claim"] for c in study["claims"]} >= {"sparsity", "quality", "settling",
                                                   "dead_neurons", "early_positions",
                                                   "surprisal"}
  assert all(c["verdict"] in ("agree", "partly", "disagree", "not tested", "context")
             for c in study["claims"])
  by_name = {r["name"]: r for r in study["runs"]}
  assert by_name["silu_dense"]["ffn"] == "silu_dense"
  assert by_name["relu_l1_1.00e-03"]["l1_coeff"] == 1e-3
  for r in study["runs"]:
    d_ff = r["d_ff"]
    assert r["steps"] == STEPS and r["tokens"] == STEPS * 8 * 32
    assert r["l1_coeff_mean_norm"] == pytest.approx(r["l1_coeff"] * d_ff)
    assert r["val_ppl"] == pytest.approx(math.exp(r["val_ce"]), rel=1e-6)
    # The final evaluation (sparse_jax.eval) and the training loop's on the same windows.
    assert r["val_ce"] == pytest.approx(r["val_ce_in_training"], rel=2e-2)
    assert r["best_val_ce"] <= r["val_ce_in_training"] + 1e-9
    assert r["mean_active"] == pytest.approx(np.mean(r["active_per_layer"]), rel=1e-6)
    assert r["sparsity_pct"] == pytest.approx(100 * (1 - r["mean_active"] / d_ff), abs=1e-6)
    assert r["dead_pct"] == pytest.approx(np.mean(r["dead_pct_per_layer"]), abs=1e-6)
    assert all(0 <= x <= 100 for x in r["dead_pct_per_layer"])
    assert all(0 <= a <= d_ff for a in r["active_per_layer"])
    assert all(p50 <= p90 <= p99 <= m for p50, p90, p99, m in zip(
        r["p50_per_layer"], r["p90_per_layer"], r["p99_per_layer"], r["max_per_layer"]))
    assert r["settle"]["step"] is None or 1 <= r["settle"]["step"] <= STEPS
    assert r["train_wall_s"] > 0 and r["device"].startswith("cpu")
  assert by_name["silu_dense"]["invocations"] == 2 and by_name["relu_l1_0"]["invocations"] == 1
  # Per-run files hold the history behind the curves.
  full = json.load(open(runs / "relu_l1_1.00e-03.json"))
  h = full["history"]
  assert len(h["steps"]) == len(h["active_ema"]) == len(h["train_ce"]) and h["steps"][-1] == STEPS
  assert len(full["by_position"]["positions"]) == 32

  # 5. --report-only reproduces the report from the JSONs; other settings are refused.
  again = study_l1.run(_argv(tmp_path, "--report-only"))["study"]
  assert again["runs"] == study["runs"] and again["claims"] == study["claims"]
  with pytest.raises(SystemExit, match="other settings"):
    study_l1.run(_argv(tmp_path, "--steps", "5"))
