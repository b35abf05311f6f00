"""One writer per run directory: an advisory ``fcntl.flock`` on ``OUT/.lock``.

The lock is held for as long as the trainer runs and released by the operating system when the
process ends, however it ends (even ``kill -9``), so a lock can never outlive its holder: a lock
file left by a dead process (or by a machine that went away) is simply taken over, with a note
naming the previous holder. The file records who holds the lock (pid, host, start time, command),
which the refusal message of a second trainer quotes.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys

from sparse_jax.errors import RunError

LOCK_NAME = ".lock"


class RunDirectoryLocked(RunError):
  """Another live process holds the run directory."""


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
          f"{holder.get('started', '?')}")


class RunLock:
  """``with RunLock(out):`` holds ``out``'s lock, or raises ``RunDirectoryLocked`` at once."""

  def __init__(self, out: str, say=print):
    self.out = out
    self.path = os.path.join(out, LOCK_NAME)
    self._say = say
    self._fd: int | None = None

  def __enter__(self) -> "RunLock":
    os.makedirs(self.out, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      raise RunDirectoryLocked(
          f"run directory {self.out} is in use by another trainer ({_describe(holder)}); wait "
          "for it to finish, stop it (it saves a checkpoint on SIGTERM), or use another --out"
      ) from None
    previous = _read(fd)
    if previous:
      # flock succeeded, so whoever wrote this is gone (or on another machine and gone: an NFS
      # lock dies with its client).
      self._say(f"note: recovered a stale lock of {self.out} (left by {_describe(previous)}, "
                "which is no longer running)")
    me = dict(pid=os.getpid(), host=socket.gethostname(),
              started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command=" ".join(sys.argv))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is None:
      return
    # Emptied before the unlock: a later trainer finds no stale holder to report.
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def _read(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
    return json.loads(text) if text else {}
  except (OSError, ValueError):
    return {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}
