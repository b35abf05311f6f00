"""experiments/bench_ffn.py and bench_ffn_train.py run end to end on the CPU (--cpu-smoke: the
XLA implementation at a tiny size) and write the JSON the GPU runs write."""
import json

import pytest

from experiments import bench_ffn, bench_ffn_train
from sparse_jax import ops

SMOKE = ["--cpu-smoke", "--dist", "uniform", "clustered", "dense_starts", "--active", "28",
         "--rounds", "2", "--calls-per-round", "1"]


@pytest.mark.parametrize("script", [bench_ffn, bench_ffn_train], ids=["inference", "training"])
def test_cpu_smoke_writes_the_table_json(script, tmp_path):
  out = str(tmp_path / "bench.json")
  extra = ["--compare-backward"] if script is bench_ffn_train else []
  res = script.main([*SMOKE, *extra, "--out", out])
  data = json.load(open(out))
  assert data["header"]["device"].startswith("cpu") and data["header"]["implementation"] == "xla"
  assert "--cpu-smoke" in data["header"]["command"]
  records = data["records"]
  assert [r["distribution"] for r in records] == ["uniform", "clustered", "dense_starts"]
  for r in records:
    assert r["device"] == data["header"]["device"] and r["command"] == data["header"]["command"]
    assert r["M"] == 512 and (r["d_model"], r["d_ff"]) == (128, 1024)
    assert abs(r["active_per_token"] - 28) < 3
    # The headline is the side-by-side wall clock; its ratio is the medians' ratio.
    wall = r["wall"]["candidates"]
    if script is bench_ffn:
      assert set(wall) == {"dense", "sparse", "sparse_forced", "mode_dense"}
      headline = wall["sparse"]
      assert r.get("kernel_speedup_forced") is None  # no CUPTI on the CPU
      # decided outside the compiled function: the forced kernels or the plain dense mode
      line = ops.SparseFFNConfig().max_active_fraction * (512 / 16384)**0.5
      host = wall["sparse_forced" if r["host_mode"] == "sparse" else "mode_dense"]
      assert r["speedup_host"] == pytest.approx(wall["dense"]["median_ms"] / host["median_ms"])
      assert (r["host_mode"] == "dense") == (r["dispatch_estimate"] > line)
    else:  # training: the headline is the mode auto_host settles on for this batch
      assert set(wall) == {"dense", "sparse", "defer", "defer_read", "defer_lagged", "mode_dense",
                           "device", "defer_alt"}
      assert r["alt_backward"] == "neuron_major"  # the first order other than the default ("auto")
      assert r["alt_over_defer"] == pytest.approx(wall["defer"]["median_ms"]
                                                  / wall["defer_alt"]["median_ms"])
      assert 0 < r["alt_grad_rel_err"] < 2e-2
      assert r["host_mode"] in ("defer", "defer+redo", "dense")
      # a sparse layer: the defer step with the loop's host read of the previous call's flag
      assert r["host_timed"] == ("mode_dense" if r["host_mode"] == "dense" else "defer_lagged")
      headline = wall[r["host_timed"]]
      redo = wall["sparse"]["median_ms"] if r["host_mode"] == "defer+redo" else 0.0
      assert r["host_ms"] == headline["median_ms"] + redo
      assert r["speedup_defer"] == pytest.approx(wall["dense"]["median_ms"]
                                                 / wall["defer"]["median_ms"])
      assert r.get("kernel_speedup_sparse") is None
      for k in ("grad_rel_errs", "grad_rel_errs_raw", "dense_grad_rel_errs",
                "dense_grad_rel_errs_raw"):
        assert set(r[k]) == {"dx", "dw_gate", "dw_up", "dw_down"}, k
      assert r["grad_rel_err"] == max(r["grad_rel_errs"].values())
      assert 0 <= r["tie_rows"] < 512
    if script is bench_ffn:
      assert r["speedup"] == pytest.approx(wall["dense"]["median_ms"] / headline["median_ms"])
    else:
      assert r["speedup"] == pytest.approx(wall["dense"]["median_ms"] / r["host_ms"])
    assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["wall"]["rounds"] == 2
    assert r["dense_fallback"] in (0.0, 1.0) and r["overflow_rows"] >= 0
    err = r["rel_err"] if script is bench_ffn else r["grad_rel_err"]
    assert 0 < err < 2e-2
  starts = records[2]
  assert starts["active_max"] > 0.15 * 1024  # the sequence start is dense
  assert data["summary"]["cases"] == 3 and res["summary"]["min_speedup"] > 0
  if script is bench_ffn_train:
    assert all(r["dense_peak_bytes"] > 0 and r["peak_ratio"] > 0 for r in records)
    # ~28 of 1024 active (2.7%) is above auto_host's line at M = 512: every layer stays dense
    assert [r["host_mode"] for r in records] == ["dense"] * 3
    assert bench_ffn_train.host_mode(2.0, 1024, 0.0, 16384) == "sparse"
    assert bench_ffn_train.host_mode(2.0, 1024, 1.0, 16384) == "dense"  # it fell back
    # --rederive recomputes the headline from the stored medians: the same numbers come back
    again = str(tmp_path / "again.json")
    bench_ffn_train.main(["--rederive", out, "--out", again])
    redone = json.load(open(again))
    assert redone["header"]["rederived"]["source"] == out
    for a, b in zip(records, redone["records"]):
      for k in ("host_mode", "speedup", "host_ms", "peak_ratio"):
        assert b[k] == pytest.approx(a[k]), k
    assert redone["summary"] == pytest.approx(data["summary"])


def test_grid_flags():
  with pytest.raises(SystemExit):
    bench_ffn.main(["--cpu-smoke", "--shape", "12"])
  with pytest.raises(SystemExit):
    bench_ffn.main(["--cpu-smoke", "--dist", "bimodal"])
