"""Energy of the GPU that JAX uses, from NVML."""
from __future__ import annotations

import os
import threading
import time

import numpy as np


class EnergyMeter:
  """Energy of the GPU JAX uses, from NVML: the total-energy counter
  (``nvmlDeviceGetTotalEnergyConsumption``, mJ), else ``nvmlDeviceGetPowerUsage`` sampled every
  10 ms by a thread and integrated. On other platforms, or without ``pynvml``, ``stop()`` returns
  ``energy_mj=None`` and the reason in ``energy_error``."""

  def __init__(self, device):
    self.handle, self.error, self.method, self.nvml_name = None, None, None, None
    if device.platform != "gpu":
      self.error = f"no NVML on {device.platform}"
      return
    try:
      import pynvml
    except ImportError:
      self.error = "pynvml not installed (pip install nvidia-ml-py): no energy figures"
      print(f"warning: {self.error}", flush=True)
      return
    self.nvml = pynvml
    try:
      pynvml.nvmlInit()
      self.handle = self._handle_for(device)
      name = pynvml.nvmlDeviceGetName(self.handle)
      self.nvml_name = name.decode() if isinstance(name, bytes) else name
    except pynvml.NVMLError as e:
      self.error, self.handle = f"NVML: {e}", None
      print(f"warning: {self.error}", flush=True)
      return
    try:
      pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
      self.method = "nvml_total_energy_counter"
    except pynvml.NVMLError:
      self.method = "nvml_power_samples_10ms"

  def _handle_for(self, device):
    """The NVML handle of JAX's device: by PCI bus id if JAX exposes it, else through
    CUDA_VISIBLE_DEVICES (indices or UUIDs), else the CUDA ordinal."""
    nv = self.nvml
    bus = getattr(device, "pci_bus_id", None)
    if bus:
      return nv.nvmlDeviceGetHandleByPciBusId(bus)
    ordinal = getattr(device, "local_hardware_id", None)
    ordinal = device.id if ordinal is None else ordinal
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if v.strip()]
    if visible and ordinal < len(visible):
      entry = visible[ordinal]
      if entry.isdigit():
        return nv.nvmlDeviceGetHandleByIndex(int(entry))
      return nv.nvmlDeviceGetHandleByUUID(entry)
    return nv.nvmlDeviceGetHandleByIndex(ordinal)

  def start(self) -> None:
    if self.handle is None:
      return
    self._t0 = time.perf_counter()
    if self.method == "nvml_total_energy_counter":
      self._e0 = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
      return
    self._samples, self._stop = [], threading.Event()

    def sample():
      while not self._stop.is_set():
        self._samples.append((time.perf_counter(),
                              self.nvml.nvmlDeviceGetPowerUsage(self.handle)))  # mW
        time.sleep(0.01)

    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()

  def stop(self) -> dict:
    """{"energy_mj", "seconds", "avg_power_w", "energy_method"} of the region since start()."""
    if self.handle is None:
      return dict(energy_mj=None, avg_power_w=None, energy_method=None, energy_error=self.error)
    t1 = time.perf_counter()
    seconds = t1 - self._t0
    if self.method == "nvml_total_energy_counter":
      mj = float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self._e0)
    else:
      self._stop.set()
      self._thread.join()
      ts = np.array([t for t, _ in self._samples])
      watts = np.array([p for _, p in self._samples]) / 1e3
      trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
      mj = float(trapezoid(watts, ts) * 1e3) if len(ts) > 1 else None
    return dict(energy_mj=mj, seconds=seconds, energy_method=self.method,
                avg_power_w=None if mj is None else mj / 1e3 / seconds)
