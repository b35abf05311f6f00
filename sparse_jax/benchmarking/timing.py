"""Timing: wall-clock side by side (the headline), throughput windows, CUPTI kernel sums.

Wall clock is what a user sees: kernels, launch gaps, the device-side conditionals of the
dispatcher. CUPTI (``jax.experimental.mosaic.gpu.profiler``) sums the durations of the kernels a
call launches, without launch gaps and without the kernels inside XLA's device-side conditionals,
so it is a breakdown, never the headline. Once CUPTI has been attached to a process, wall times
measured after it in the same process can come out inflated: time wall clock first.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import numpy as np


def _block(x):
  import jax
  return jax.block_until_ready(x)


def _summary(ms_per_call: list[float]) -> dict:
  a = np.asarray(ms_per_call, np.float64)
  q25, q75 = np.percentile(a, [25, 75])
  return dict(median_ms=float(np.median(a)), min_ms=float(a.min()), q25_ms=float(q25),
              q75_ms=float(q75), iqr_ms=float(q75 - q25), rounds_ms=[float(v) for v in a])


def side_by_side(fns: dict[str, Callable], args: tuple, *, rounds: int = 10,
                 calls_per_round: int | None = 10, warmup: int = 2, baseline: str | None = None,
                 target_round_s: float = 0.02) -> dict:
  """Wall-clock ms per call of each candidate, timed ALTERNATELY in this process on the same
  inputs: each round runs every candidate once (the order rotates from round to round, so no
  candidate always follows another), and a candidate's turn is ``calls_per_round`` back-to-back
  calls (each output released as the next call is queued) closed by ``block_until_ready``.
  Drift of clocks, temperature and other load hits all candidates alike.

  ``calls_per_round=None`` picks it per candidate from one timed call so that a turn lasts about
  ``target_round_s``. Returns ``{"candidates": {name: {median_ms, min_ms, q25_ms, q75_ms, iqr_ms,
  rounds_ms}}, "rounds", "calls_per_round": {name: n}, "timer"}`` and, with ``baseline`` (e.g.
  "dense"), ``"speedup": {name: baseline median / name median}`` and ``"speedup_paired":
  {name: median over rounds of the per-round ratio}`` for every other candidate.
  """
  if not fns:
    raise ValueError("fns is empty: nothing to time")
  if baseline is not None and baseline not in fns:
    raise ValueError(f"baseline {baseline!r} is not one of the candidates {list(fns)}")
  if rounds < 1 or warmup < 0 or (calls_per_round is not None and calls_per_round < 1):
    raise ValueError(f"rounds ({rounds}) and calls_per_round ({calls_per_round}) must be >= 1, "
                     f"warmup ({warmup}) >= 0")
  names = list(fns)
  calls = {}
  for name in names:  # compile, warm up, and size the turns
    for _ in range(max(1, warmup)):
      _block(fns[name](*args))
    if calls_per_round is None:
      t0 = time.perf_counter()
      _block(fns[name](*args))
      one = max(time.perf_counter() - t0, 1e-6)
      calls[name] = max(3, math.ceil(target_round_s / one))
    else:
      calls[name] = calls_per_round
  per_round = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      f, n = fns[name], calls[name]
      t0 = time.perf_counter()
      out = None
      for _ in range(n):
        out = None  # the previous output is released (after its computation) before the next
        out = f(*args)
      _block(out)
      per_round[name].append((time.perf_counter() - t0) * 1e3 / n)
  res = dict(candidates={n: _summary(v) for n, v in per_round.items()}, rounds=rounds,
             calls_per_round=calls, timer="wall clock, candidates alternating, median over rounds")
  if baseline is not None:
    base = res["candidates"][baseline]["median_ms"]
    res["speedup"] = {n: base / res["candidates"][n]["median_ms"] for n in names if n != baseline}
    res["speedup_paired"] = {
        n: float(np.median(np.asarray(per_round[baseline]) / np.asarray(per_round[n])))
        for n in names if n != baseline}
  return res


def timed_windows(call: Callable[[], object], *, warmup: int, windows: int, min_seconds: float,
                  meter=None) -> dict:
  """Throughput of one function: warm-up calls, then ``windows`` windows of n back-to-back calls
  (n from one timed call so that all windows last about ``min_seconds``), ``block_until_ready``
  at each window's end; energy over the windows from ``meter`` (an ``EnergyMeter``) if given.
  Returns calls_per_window, window_s, s_per_call (median window / n) and the energy fields."""
  for _ in range(warmup):
    _block(call())
  t0 = time.perf_counter()
  _block(call())
  one = time.perf_counter() - t0
  n = max(2, math.ceil(min_seconds / windows / max(one, 1e-6)))
  if meter is not None:
    meter.start()
  window_s = []
  for _ in range(windows):
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
      out = None  # the previous output is released (after its computation) before the next
      out = call()
    _block(out)
    window_s.append(time.perf_counter() - t0)
  energy = meter.stop() if meter is not None else {}
  return dict(calls_per_window=n, window_s=window_s, s_per_call=statistics.median(window_s) / n,
              **energy)


def wall_ms_per_call(f, *args, calls: int = 20) -> tuple[float, float]:
  """(host dispatch ms per call, wall ms per call) of ``calls`` back-to-back calls. Dispatch time
  close to wall time means the host waited on the device inside the call (a host sync)."""
  _block(f(*args))
  t0 = time.perf_counter()
  outs = [f(*args) for _ in range(calls)]
  t1 = time.perf_counter()
  _block(outs)
  t2 = time.perf_counter()
  return (t1 - t0) * 1e3 / calls, (t2 - t0) * 1e3 / calls


def cupti_ms(f, *args, iterations: int = 20) -> tuple[float, list[float]]:
  """Median and all per-iteration kernel times (ms) of a jitted function, from CUPTI: the sum of
  the durations of every kernel the call launches, launch gaps excluded (GPU only)."""
  from jax.experimental.mosaic.gpu import profiler
  _block(f(*args))  # compile and warm up
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
  """Per-kernel (name, ms) of one call (GPU only)."""
  from jax.experimental.mosaic.gpu import profiler
  _block(f(*args))
  _, kernels = profiler.measure(f, aggregate=False)(*args)
  return [(name, ms) for name, ms in (kernels or [])]
