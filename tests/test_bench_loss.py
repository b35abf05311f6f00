"""experiments/bench_loss.py runs end to end on the CPU (--cpu-smoke) and writes its JSON."""
import json

from experiments import bench_loss


def test_cpu_smoke_writes_the_side_by_side_rows(tmp_path):
  out = tmp_path / "bench_loss.json"
  result = bench_loss.main(["--cpu-smoke", "--chunks", "16", "32", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["header"]["device"].startswith("cpu")
  assert "bench_loss.py" in saved["header"]["command"]
  rows = {r["name"]: r for r in saved["records"]}
  assert list(rows) == ["unchunked", "chunk_16", "chunk_32"]
  assert [r["chunk"] for r in result["records"]] == [0, 16, 32]
  for r in rows.values():
    assert r["median_ms"] > 0 and len(r["rounds_ms"]) == 2 and r["speedup"] > 0
    assert r["loss_rel_err"] < 1e-3 and r["dx_rel_err"] < 1e-2 and r["dhead_rel_err"] < 1e-2
    assert r["peak_bytes"] > 0
  assert rows["unchunked"]["speedup"] == 1.0
  # one chunk's logits instead of the batch's: 2 x 64 x 512 x 4 bytes = 256 KB unchunked
  assert (rows["chunk_16"]["memory_analysis"]["temp"]
          < rows["unchunked"]["memory_analysis"]["temp"] - saved["header"]["logits_bytes_fp32"])
