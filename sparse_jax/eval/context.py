"""Warnings for inputs longer than the context a model was trained on (``data.seq_len``): RoPE
positions past it were never seen in training, so evaluation and generation there degrade."""
from __future__ import annotations

import sys


def warn_past_context(n_tokens: int, trained: int, what: str) -> bool:
  """Prints a warning if ``n_tokens`` exceeds ``trained``; ``what`` reads "<what> N tokens" (e.g.
  "evaluation windows span"). Returns whether it warned."""
  if n_tokens <= trained:
    return False
  print(f"warning: {what} {n_tokens} tokens, past the {trained}-token context the model was "
        "trained on (data.seq_len); quality degrades beyond it", file=sys.stderr)
  return True
