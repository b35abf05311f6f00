"""Peak device memory: XLA's compiled memory analysis and the device allocator's peak."""
from __future__ import annotations


def compiled_memory(compiled) -> dict:
  """{"peak_bytes", "memory_analysis"} of a compiled function: argument + output + temp - alias
  bytes, the bytes one call needs (``peak_bytes`` None where the backend gives no analysis)."""
  m = compiled.memory_analysis()
  if m is None:
    return dict(peak_bytes=None)
  parts = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
           ("argument", "output", "temp", "alias", "generated_code")}
  return dict(peak_bytes=parts["argument"] + parts["output"] + parts["temp"] - parts["alias"],
              memory_analysis=parts)


def peak_bytes(jitted, *args) -> int | None:
  """``compiled_memory(...)["peak_bytes"]`` of ``jitted`` compiled for ``args``."""
  return compiled_memory(jitted.lower(*args).compile())["peak_bytes"]


def allocator_stats(device) -> dict:
  stats = device.memory_stats() or {}
  return dict(peak_bytes_in_use=stats.get("peak_bytes_in_use"),
              bytes_limit=stats.get("bytes_limit"))


def check_fits(peak: int | None, device) -> None:
  """Raises MemoryError, before anything runs, when a compiled step needs more than the device
  allows (the allocator's ``bytes_limit``)."""
  limit = allocator_stats(device)["bytes_limit"]
  if limit and peak and peak > limit:
    raise MemoryError(f"the compiled step needs {peak / 1e9:.1f} GB, the device allows "
                      f"{limit / 1e9:.1f} GB: use a smaller --batch")
