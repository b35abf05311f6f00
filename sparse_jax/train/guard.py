"""Guards of a training run: stop signals and non-finite steps.

* ``StopSignals``: SIGTERM (schedulers, ``timeout``, container stops), SIGINT (Ctrl-C) and SIGHUP
  (a closed terminal) only set a flag; the loop stops at the next step boundary, saves a
  checkpoint and raises ``StoppedBySignal`` with the resume message. A save under way when the
  signal comes is finished first. A second signal stops at once (``KeyboardInterrupt``), without a
  new save: orbax's atomic step directories keep the last complete checkpoint intact.
* ``keep_finite`` (inside the jitted step) keeps the previous parameters, optimiser state and
  sparsity tracker when the loss, the gradients or the update are not finite, so the train state
  never holds non-finite weights; ``NonfiniteWatch`` (on the host) counts such steps and, with
  ``train.nonfinite="stop"``, stops the run with ``DivergenceError`` before anything is saved.
"""
from __future__ import annotations

import dataclasses
import signal
import threading

import jax
import jax.numpy as jnp
import optax

from sparse_jax.errors import RunError

STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGHUP"))
                     if s is not None)


class StoppedBySignal(KeyboardInterrupt):
  """The run stopped on a signal after saving its checkpoint; ``signum`` is the signal."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


class StopNow(KeyboardInterrupt):
  """A second stop signal: leave at once, without saving."""


class DivergenceError(RunError):
  """A training step produced a non-finite loss, gradient or update."""


class StopSignals:
  """Context manager: while active, STOP_SIGNALS set ``received`` (the first one's number) instead
  of killing the process. Outside the main thread (where Python cannot install handlers) it does
  nothing and signals act as usual."""

  def __init__(self, say=print):
    self.received: int | None = None
    self._say = say
    self._previous: dict[int, object] = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:
      self._restore()
      raise StopNow(f"second signal ({signal.Signals(signum).name}): stopped at once, "
                              "without saving; the last complete checkpoint is kept")
    self.received = signum
    self._say(f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this "
              "step, then stopping (send it again to stop at once without saving)")

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name if self.received is not None else ""

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for s in STOP_SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def _restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def __exit__(self, *exc) -> None:
    self._restore()


# --------------------------------------------------------------------------- non-finite steps


def keep_finite(old_state, new_state, loss, grads, updates):
  """(state, nonfinite flag): ``new_state`` if the loss, the gradient norm and the update norm are
  finite, else ``old_state`` with only its step counter advanced (the batch is consumed, nothing is
  learned from it). Traced inside the train step; exact (a select) when everything is finite."""
  finite = (jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
            & jnp.isfinite(optax.tree.norm(updates)))
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
  return dataclasses.replace(kept, step=new_state.step), ~finite


NONFINITE_MODES = ("stop", "skip")


class NonfiniteWatch:
  """Host side of ``keep_finite``. ``after_step`` reads the flag of the previous step (already
  computed while the current one was dispatched, so no step waits for the device) and ``flush``
  the last one, before a checkpoint is written or the run ends."""

  def __init__(self, mode: str, say=print):
    if mode not in NONFINITE_MODES:
      raise ValueError(f"train.nonfinite={mode!r}: must be one of {', '.join(NONFINITE_MODES)}")
    self.mode = mode
    self.skipped: list[int] = []
    self._pending = None
    self._say = say

  def after_step(self, step: int, metrics: dict) -> None:
    pending, self._pending = self._pending, (step, metrics)
    if pending is not None:
      self._check(*pending)

  def flush(self) -> None:
    pending, self._pending = self._pending, None
    if pending is not None:
      self._check(*pending)

  def _check(self, step: int, metrics: dict) -> None:
    if not bool(jax.device_get(metrics["nonfinite"])):
      return
    loss, gnorm = (float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm"))
    if self.mode == "stop":
      raise DivergenceError(
          f"training diverged: step {step} has a non-finite loss or gradient (loss {loss}, "
          f"gradient norm {gnorm}); nothing from it was saved and the checkpoints on disk hold "
          "finite weights. Lower train.lr (or raise train.warmup_steps) and resume, or set "
          "train.nonfinite=skip to skip such steps")
    self.skipped.append(step)
    self._say(f"warning: step {step} skipped: non-finite loss or gradient (loss {loss}, gradient "
              f"norm {gnorm}); {len(self.skipped)} skipped so far")


@jax.jit
def _all_finite(flat: dict) -> dict:
  return {k: jnp.all(jnp.isfinite(v)) for k, v in flat.items()}


def nonfinite_leaves(tree) -> list[str]:
  """Names ("params/blocks/0/...") of the float leaves of ``tree`` holding NaN or +-Inf (one
  compiled reduction on the device, so sharded arrays are checked where they live)."""
  from sparse_jax.train.checkpoint import flatten_state
  flat, _ = flatten_state(tree)
  floats = {k: v for k, v in flat.items() if jnp.issubdtype(jnp.asarray(v).dtype, jnp.inexact)}
  ok = jax.device_get(_all_finite(floats))
  return [k for k in floats if not bool(ok[k])]
