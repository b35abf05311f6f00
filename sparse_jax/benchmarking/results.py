"""Result files and tables of the benchmarks: every record says on which device and by which
command it was measured."""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile


def device_name(device=None) -> str:
  """``platform:device_kind`` of ``device`` (default: JAX's first device)."""
  if device is None:
    import jax
    device = jax.devices()[0]
  return f"{device.platform}:{getattr(device, 'device_kind', device.platform)}"


def command_line(script: str | None = None, argv: list[str] | None = None) -> str:
  """The command that reproduces this run: ``python <script> <argv>`` (default: this process)."""
  if script is None:
    return shlex.join([os.path.basename(sys.executable)] + sys.argv)
  return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def run_header(command: str | None = None) -> dict:
  """device, jax version, command, UTC date and ``XLA_FLAGS`` (they change what is measured) of
  this run."""
  import jax
  return dict(device=device_name(), jax=jax.__version__, command=command or command_line(),
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              xla_flags=os.environ.get("XLA_FLAGS", ""))


def load_json(path: str):
  """The JSON at ``path``, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj, *, indent: int = 2, allow_nan: bool = True) -> None:
  """Writes ``obj`` atomically (a crash never leaves half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=indent, allow_nan=allow_nan)
  os.replace(tmp, path)


def write_results(path: str, header: dict, records: list[dict], **extra) -> None:
  """``{"header", **extra, "records"}``; every record carries the header's device and command."""
  tagged = [{"device": header["device"], "command": header.get("command"), **r} for r in records]
  write_json(path, dict(header=header, **extra, records=tagged))


def format_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
  """A plain-text table, columns padded to their widest cell."""
  widths = [max(len(x) for x in col) for col in zip(head, *rows)]
  line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
  return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def fmt(v, spec: str) -> str:
  """``format(v, spec)``, or "-" for a missing value."""
  return "-" if v is None else format(v, spec)


def short_error(e: BaseException, n: int = 600) -> str:
  """``Type: message`` on one line, cut at ``n`` characters (compiler errors run to pages)."""
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: " + (text if len(text) <= n else text[:n] + " ...")


def gpu_platform_expected() -> bool:
  """Whether JAX will run on a GPU, decided without initialising a backend in this process (a
  parent must not take GPU memory from its children)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").lower()
  if platforms:
    return any(p in platforms for p in ("cuda", "gpu", "rocm"))
  for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
               "jax_plugins.xla_cuda13"):
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except ModuleNotFoundError:
      pass
  return False


def run_in_child(script: str, spec: dict, timeout: float | None, *, repo: str,
                 mem_fraction: str = "0.95") -> dict:
  """Runs ``python script --job SPEC.json`` in a fresh process (its own memory, its own process
  group) and returns the JSON it writes to ``result.json`` beside the spec, or ``{"error"}``
  when it crashed or ran past ``timeout`` seconds (then its process group is killed). The
  child's stdout/stderr pass through."""
  with tempfile.TemporaryDirectory(prefix="bench_job_") as tmp:
    spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
    with open(spec_path, "w") as f:
      json.dump(spec, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([repo] + [x for x in env.get("PYTHONPATH", "").split(
        os.pathsep) if x])
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", mem_fraction)
    cmd = [sys.executable, os.path.abspath(script), "--job", spec_path]
    proc = subprocess.Popen(cmd, env=env, cwd=repo, start_new_session=True)
    try:
      code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, 9)  # the child's own process group (start_new_session)
      proc.wait()
      return dict(error=f"killed at the --max-minutes budget after {timeout:.0f} s")
    if os.path.exists(out_path):
      with open(out_path) as f:
        return json.load(f)
    return dict(error=f"the job's process exited with code {code} without a result (a crash; "
                      "see its output above)")


def child_result_path(spec_path: str) -> str:
  """Where the child started by ``run_in_child`` writes its result."""
  return os.path.join(os.path.dirname(spec_path), "result.json")
