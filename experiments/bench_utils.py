"""Shared benchmark plumbing: device description, CUPTI timing, result files."""
from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time

import jax


def device_name() -> str:
  dev = jax.devices()[0]
  return f"{dev.platform}:{getattr(dev, 'device_kind', dev.platform)}"


def run_header() -> dict:
  return dict(device=device_name(), jax=jax.__version__, command=" ".join([sys.executable] + sys.argv),
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def cupti_ms(f, *args, iterations: int = 20) -> tuple[float, list[float]]:
  """Median and all per-iteration kernel times (ms) of a jitted function, from CUPTI: the sum of
  the durations of every kernel the call launches, launch gaps excluded."""
  from jax.experimental.mosaic.gpu import profiler
  jax.block_until_ready(f(*args))  # compile and warm up
  # One measurement per call: with lax.cond inside, CUPTI's multi-iteration mode refuses
  # kernel lists that differ between iterations.
  times = []
  for _ in range(iterations):
    _, t = profiler.measure(f)(*args)
    if t is None:
      raise RuntimeError("CUPTI saw no kernels")
    times.append(t)
  return statistics.median(times), times


def cupti_breakdown(f, *args) -> list[tuple[str, float]]:
  """Per-kernel (name, ms) of one call."""
  from jax.experimental.mosaic.gpu import profiler
  jax.block_until_ready(f(*args))
  _, kernels = profiler.measure(f, aggregate=False)(*args)
  return [(name, ms) for name, ms in (kernels or [])]


def wall_ms_per_call(f, *args, calls: int = 20) -> tuple[float, float]:
  """(host dispatch ms per call, wall ms per call) of ``calls`` back-to-back calls. Dispatch time
  close to wall time means the host waited on the device inside the call (a host sync)."""
  jax.block_until_ready(f(*args))
  t0 = time.perf_counter()
  outs = [f(*args) for _ in range(calls)]
  t1 = time.perf_counter()
  jax.block_until_ready(outs)
  t2 = time.perf_counter()
  return (t1 - t0) * 1e3 / calls, (t2 - t0) * 1e3 / calls


def write_results(path: str, header: dict, records: list[dict]) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(dict(header=header, records=[{**dict(device=header["device"]), **r} for r in records]),
              f, indent=2)
