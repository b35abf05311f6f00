"""``load_hf``: a Hugging Face Llama-format checkpoint directory as a (model, config) pair."""
from __future__ import annotations

import os

from sparse_jax.config import Config, DataConfig
from sparse_jax.hf.config import TOKENIZER_FILE, model_config_from_hf, read_config
from sparse_jax.hf.weights import model_from_hf_tensors, read_hf_tensors
from sparse_jax.nn import Transformer


def load_hf(path: str, *, ffn: str | None = None, compute_dtype: str = "float32",
            param_dtype: str = "float32", allow_unknown_config: bool = False
            ) -> tuple[Transformer, Config]:
  """(model, config) of a Hugging Face Llama-format checkpoint directory.

  The config's ``data.tokenizer`` is the directory's ``tokenizer.json`` if it has one (else
  ``"bytes"``: check ``has_tokenizer``), and ``data.seq_len`` its ``max_position_embeddings``
  (at most 2048), the default evaluation length.
  """
  hf = read_config(path)
  cfg = model_config_from_hf(hf, ffn=ffn, compute_dtype=compute_dtype, param_dtype=param_dtype,
                             allow_unknown_config=allow_unknown_config)
  tensors = read_hf_tensors(path, cfg)
  model = model_from_hf_tensors(tensors, cfg)
  tok = os.path.join(path, TOKENIZER_FILE)
  seq_len = min(int(hf.get("max_position_embeddings") or 2048), 2048)
  data = DataConfig(tokenizer=tok if os.path.isfile(tok) else "bytes", seq_len=seq_len)
  return model, Config(name=f"hf:{os.path.basename(os.path.normpath(path))}", model=cfg,
                       data=data)


def has_tokenizer(path: str) -> bool:
  return os.path.isfile(os.path.join(path, TOKENIZER_FILE))
