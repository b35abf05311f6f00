"""experiments/bench_decode.py runs end to end on the CPU (--cpu-smoke) and writes its JSON."""
import json

from experiments import bench_decode


def test_cpu_smoke_writes_a_side_by_side_row(tmp_path):
  out = tmp_path / "bench_decode.json"
  result = bench_decode.main(["--cpu-smoke", "--batches", "2", "--long-context", "0",
                              "--decode-path", "union", "--layers", "scan", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["rows"] == json.loads(json.dumps(result["rows"]))
  assert saved["device"].startswith("cpu") and "bench_decode.py" in saved["command"]
  (row,) = saved["rows"]
  assert row["config"] == "tiny" and row["batch"] == 2 and row["new_tokens"] == 6
  # A tiny union: the sparse model's decode steps take the decode path.
  assert row["decode_path"] and 0 < row["union_capacity"] < row["d_ff"]
  for v in ("dense", "sparse"):
    r = row[v]
    assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    assert len(r["decode_ms_rounds"]) == 2 and r["active_per_token_mean"] > 0
    assert r["mj_per_generated_token"] is None and "NVML" in r["energy_error"]
  assert row["sparse"]["compile_s"] > 0 and row["dense"]["compile_s"] > 0
  # scanned layers: the unrolled dense baseline, timed in the same alternation
  assert row["dense_unrolled"]["decode_tokens_per_s"] > 0
  best = max(row["dense"]["decode_tokens_per_s"], row["dense_unrolled"]["decode_tokens_per_s"])
  assert abs(row["speedup_decode_vs_best_dense"]
             - row["sparse"]["decode_tokens_per_s"] / best) < 1e-9
  assert 0 <= row["greedy_tokens_equal_share"] <= 1 and row["speedup_decode"] > 0


def test_profile_decode_groups_kernels_by_name_and_kind():
  from experiments import profile_decode
  kernels = [("loop_add_fusion_3", 0.002), ("loop_add_fusion_12", 0.004),
             ("mosaic_gpu_kernel", 0.01), ("sm90_xmma_gemm_bf16bf16_bf16f32", 0.02),
             ("input_reduce_fusion.1", 0.001)]
  groups = profile_decode.group(kernels)
  assert [g["name"] for g in groups] == ["sm90_xmma_gemm_bf16bf16_bf16f32", "mosaic_gpu_kernel",
                                         "loop_add_fusion", "input_reduce_fusion"]
  add = groups[2]
  assert add["calls"] == 2 and abs(add["us"] - 6.0) < 1e-9 and add["kind"] == "loop_fusion"
  assert [g["kind"] for g in groups[:2]] == ["gemm", "pallas"]
  assert groups[3]["kind"] == "input_fusion"
