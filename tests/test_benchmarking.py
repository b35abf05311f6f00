"""sparse_jax.benchmarking: the side-by-side timer, timed windows, memory analysis, result files."""
import json
import os
import time

import jax
import jax.numpy as jnp
import pytest

from sparse_jax import benchmarking


def test_side_by_side_alternates_and_ranks_the_slower_candidate():
  order = []

  def make(name, seconds):
    def f(x):
      order.append(name)
      time.sleep(seconds)
      return x + 1
    return f

  fns = {"dense": make("dense", 0.02), "sparse": make("sparse", 0.002)}
  res = benchmarking.side_by_side(fns, (jnp.ones(3),), rounds=4, calls_per_round=2, warmup=1,
                                  baseline="dense")
  assert set(res["candidates"]) == {"dense", "sparse"} and res["rounds"] == 4
  for c in res["candidates"].values():
    assert len(c["rounds_ms"]) == 4 and c["min_ms"] <= c["median_ms"]
    assert c["q25_ms"] <= c["q75_ms"] and c["iqr_ms"] >= 0
  assert res["speedup"]["sparse"] > 2 and res["speedup_paired"]["sparse"] > 2
  timed = order[2:]  # after one warm-up call each
  # Alternating turns of calls_per_round calls, the order rotating every round.
  turns = [timed[i] for i in range(0, len(timed), 2)]
  assert turns == ["dense", "sparse", "sparse", "dense", "dense", "sparse", "sparse", "dense"]


def test_side_by_side_sizes_turns_and_checks_arguments():
  f = jax.jit(lambda x: x @ x)
  x = jnp.ones((64, 64))
  res = benchmarking.side_by_side({"a": f}, (x,), rounds=2, calls_per_round=None,
                                  target_round_s=0.005)
  assert res["calls_per_round"]["a"] >= 3 and "speedup" not in res
  with pytest.raises(ValueError, match="baseline"):
    benchmarking.side_by_side({"a": f}, (x,), baseline="dense")
  with pytest.raises(ValueError, match="empty"):
    benchmarking.side_by_side({}, (x,))


def test_timed_windows_memory_and_results(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((32, 32))
  t = benchmarking.timed_windows(lambda: f(x), warmup=1, windows=2, min_seconds=0.01)
  assert t["calls_per_window"] >= 2 and len(t["window_s"]) == 2 and t["s_per_call"] > 0
  assert benchmarking.peak_bytes(f, x) >= 2 * 32 * 32 * 4  # argument and output
  meter = benchmarking.EnergyMeter(jax.devices()[0])
  meter.start()
  assert meter.stop()["energy_mj"] is None  # no NVML on the CPU, and it says so
  header = benchmarking.run_header()
  assert header["device"].startswith("cpu") and header["command"]
  assert header["xla_flags"] == os.environ.get("XLA_FLAGS", "")
  path = str(tmp_path / "r" / "out.json")
  benchmarking.write_results(path, header, [dict(a=1)], note="x")
  data = json.load(open(path))
  assert data["records"] == [dict(device=header["device"], command=header["command"], a=1)]
  assert data["note"] == "x" and benchmarking.load_json(str(tmp_path / "none.json")) is None
  table = benchmarking.format_table(("a", "bb"), [("1", "2"), ("333", "4")])
  assert table.splitlines()[0] == "a   | bb" and len(table.splitlines()) == 4
