"""experiments/bench_model.py: the CPU quick mode writes the JSON rows and the plot; merging of
rows measured in separate invocations; memory estimates."""
import json
import os
import re

import pytest

from experiments import bench_model
from sparse_jax.benchmarking import model_rows
from sparse_jax.config import get_config

REQUIRED = ("device", "config", "mode", "sparsity_target", "sparsity_measured", "batch", "seq",
            "tokens_per_ms_dense", "tokens_per_ms_sparse", "speedup", "mj_per_token_dense",
            "mj_per_token_sparse", "peak_bytes_dense", "peak_bytes_sparse", "command", "jax")


def test_quick_mode_writes_rows(tmp_path):
  """Both modes; the sparse model's training step is the host dispatcher's (auto_host with the
  hot/cold split): it decides after each settling step and the settled pattern's step is timed,
  while the dense model runs its plain step."""
  out = str(tmp_path / "bench.json")
  overrides = ["train.dispatch=auto_host", "train.hot_cold=true"]
  bench_model.main(["--quick", "--sparsity", "0.99", "--windows", "1", "--warmup", "0",
                    "--min-seconds", "0.05", "--isolate", "no", "--settle-steps", "2",
                    "--set", *overrides, "--out", out])
  with open(out) as f:
    data = json.load(f)
  assert data["paper"]["forward"]["2b"]["speedup"] == pytest.approx(1.205)
  assert data["runs"][0]["command"].startswith("python experiments/bench_model.py --quick")
  rows = data["records"]
  assert sorted(r["mode"] for r in rows) == ["forward", "train"]
  for r in rows:
    missing = [k for k in REQUIRED if k not in r]
    assert not missing, missing
    assert r["config"] == "tiny" and r["seq"] == 64 and r["batch"] == 2
    assert r["sparse_impl"] in ("xla", "pallas-interpret")
    assert r["tokens_per_ms_dense"] > 0 and r["tokens_per_ms_sparse"] > 0 and r["speedup"] > 0
    assert r["peak_bytes_dense"] > 0 and r["peak_bytes_sparse"] > 0
    # Measured, not assumed: near the target (tiny d_ff, few calibration tokens).
    assert 0.97 < r["sparsity_measured"] < 0.999
    assert len(r["op_active_per_token_L"]) == r["n_layers"] == 2
    assert r["mj_per_token_dense"] is None  # no NVML on the CPU
    # The dense model is relu_dense_bf16 built from the config with the same (calibrated) weights:
    # both compute the same function.
    assert r["dense_baseline"] == "relu_dense_bf16" and r["final_loss_rel_diff"] < 1e-2
    assert r["overrides"] == overrides
    # every setting each model ran with, defaults included
    sparse_cfg, dense_cfg = r["resolved_config_sparse"], r["resolved_config_dense"]
    assert sparse_cfg["train"]["dispatch"] == "auto_host" and sparse_cfg["train"]["hot_cold"]
    assert sparse_cfg["model"]["sparse"]["train_backward"] == "auto"
    assert (sparse_cfg["model"]["ffn"], dense_cfg["model"]["ffn"]) == ("relu_sparse",
                                                                      "relu_dense_bf16")
    assert dense_cfg["train"]["loss_chunk"] == sparse_cfg["train"]["loss_chunk"]
    if r["mode"] == "train":
      assert r["dispatch_hot_cold"] is True and len(r["dispatch_settling"]) == 2
      assert re.fullmatch(r"([SD]\d*){2}", r["dispatch_pattern"]), r["dispatch_pattern"]
      assert r["dispatch_pattern"] == r["dispatch_settling"][-1]
      # Each pattern run (the first all dense) compiled once; the settled one is timed.
      assert "DD" in r["dispatch_compile_s"] and r["dispatch_pattern"] in r["dispatch_compile_s"]
      assert r["compile_s_sparse"] == r["dispatch_compile_s"][r["dispatch_pattern"]] > 0
    else:
      assert "dispatch_pattern" not in r
  assert os.path.exists(str(tmp_path / "bench.png"))


def _result(variant, tokens_per_ms, error=None):
  level = dict(target=0.99, params=10, n_layers=1, d_ff=8, model={})
  if error:
    level["error"] = error
  else:
    level.update(tokens_per_ms=tokens_per_ms, s_per_call=1.0, window_s=[1.0], calls_per_window=1,
                 peak_bytes=100, sparsity_measured=0.99)
  return dict(device="gpu:X", jax="0", levels=[level])


def test_rows_merge_across_invocations(tmp_path):
  out = str(tmp_path / "m.json")
  spec = lambda v: dict(config="1b", mode="train", variant=v, levels=[dict(target=0.99)],
                        profile="skewed", batch=16, seq=2048, dense_baseline="relu_dense",
                        overrides=[], data="synthetic", sparse_impl_label="pallas")
  run = lambda i: dict(run_id=str(i), command=f"run {i}", date="d", device="gpu:X", jax="0")
  # Invocation 1: dense measured, sparse skipped at the budget.
  model_rows.merge_results(out, run(1), model_rows.make_rows(
      [(spec("dense"), _result("dense", 10.0)),
       (spec("sparse"), dict(error="skipped: --max-minutes budget"))], run(1)))
  # Invocation 2: only the sparse side.
  data = model_rows.merge_results(out, run(2), model_rows.make_rows(
      [(spec("sparse"), _result("sparse", 12.0))], run(2)))
  (row,) = data["records"]
  assert row["speedup"] == pytest.approx(1.2)
  assert row["measured_in"]["dense"]["command"] == "run 1"
  assert row["measured_in"]["sparse"]["command"] == "run 2"
  assert "error_sparse" not in row and len(data["runs"]) == 2
  # A failed re-measurement of one side keeps the earlier numbers and notes the error.
  data = model_rows.merge_results(out, run(3), model_rows.make_rows(
      [(spec("dense"), _result("dense", 0, error="OOM")),
       (spec("sparse"), _result("sparse", 15.0))], run(3)))
  (row,) = data["records"]
  assert row["tokens_per_ms_dense"] == 10.0 and row["speedup"] == pytest.approx(1.5)
  assert row["rerun_errors"] == {"dense": "OOM"}


def test_estimates_and_batch_parsing():
  m = get_config("2b").model
  assert model_rows.param_count(m) == 2_053_269_504
  assert 50e9 < model_rows.estimate_peak_bytes(m, "train", 16, 2048) < 110e9
  assert bench_model._parse_batch("forward=32,train=8") == {"forward": 32, "train": 8}
  assert bench_model._parse_batch("4") == {"forward": 4, "train": 4}
  with pytest.raises(ValueError):
    bench_model._parse_batch("prefill=3")
