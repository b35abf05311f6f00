"""Benchmark support shared by the scripts in ``experiments/``: timing, energy, memory, result
files. Benchmarks are scripts that print a table and write JSON; this package holds what more
than one of them needs, so each script keeps only what is specific to it.

* ``timing``: ``side_by_side`` (the headline wall-clock ratio: candidates timed alternately in one
  process), ``timed_windows`` (throughput windows with energy), CUPTI kernel sums.
* ``energy``: ``EnergyMeter`` (NVML total-energy counter or sampled power).
* ``memory``: XLA's compiled memory analysis and the device allocator's peak.
* ``results``: run header (device, jax, command, date), atomic JSON writing, tables, child
  processes for isolated jobs.
* ``model_rows``: the dense-vs-sparse row files of ``experiments/bench_model.py`` (rows measured
  in separate invocations merge), its memory estimates and plot.
"""
from sparse_jax.benchmarking.energy import EnergyMeter
from sparse_jax.benchmarking.memory import (allocator_stats, check_fits, compiled_memory,
                                            peak_bytes)
from sparse_jax.benchmarking.results import (device_name, format_table, gpu_platform_expected,
                                             load_json, run_header, run_in_child, write_json,
                                             write_results)
from sparse_jax.benchmarking.timing import (cupti_breakdown, cupti_ms, side_by_side,
                                            timed_windows, wall_ms_per_call)

__all__ = ["EnergyMeter", "allocator_stats", "check_fits", "compiled_memory", "cupti_breakdown",
           "cupti_ms", "device_name", "format_table", "gpu_platform_expected", "load_json",
           "peak_bytes", "run_header", "run_in_child", "side_by_side", "timed_windows",
           "wall_ms_per_call", "write_json", "write_results"]
