"""Loading checkpoints, in one place: run directories and Hugging Face directories.

* a run directory of ``sparse-jax train`` (``DIR/checkpoints/`` holds orbax steps): ``load_run``;
* a Hugging Face Llama-format directory (``config.json`` + safetensors): ``sparse_jax.hf.load_hf``.

``load_model`` takes either and returns a ``Loaded`` (model, config, tokenizer); evaluation,
generation, export, the lm-eval adapter and the CLI all load through it. ``ffn`` and
``compute_dtype`` rebuild the model around the same weights: ``relu_sparse`` and ``relu_dense``
compute the same function (the sparse op against its dense baseline), and an fp32 compute dtype
removes bf16 rounding from a comparison.
"""
from __future__ import annotations

import dataclasses
import os

from flax import nnx

from sparse_jax import hf
from sparse_jax.config import Config
from sparse_jax.data import load_tokenizer
from sparse_jax.data.tokenizer import Tokenizer
from sparse_jax.nn import Transformer

# FFN kinds with the same parameters (gate, up, down), between which a model can be switched.
_GATED = ("relu_sparse", "relu_dense", "silu_dense")


@dataclasses.dataclass(frozen=True)
class Loaded:
  model: Transformer
  cfg: Config
  tokenizer: Tokenizer
  kind: str          # "run" or "hf"
  path: str
  step: int | None   # the run's optimiser step (None for a Hugging Face checkpoint)
  context: int       # the context it was trained for: data.seq_len, or max_position_embeddings

  @property
  def label(self) -> str:
    where = os.path.basename(os.path.normpath(self.path))
    return f"{where} (step {self.step})" if self.step is not None else f"{where} (Hugging Face)"


def is_run_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load_run(out: str, step: int | None = None) -> tuple[Transformer, Config, int]:
  """(model, config, step) of a run directory's checkpoint (by default the newest step that reads
  back; a damaged newer step is reported in one line, nothing is deleted)."""
  # orbax and the train state: imported only when a run directory is loaded.
  from sparse_jax.train.checkpoint import Checkpointer
  from sparse_jax.train.step import init_state
  directory = os.path.join(out, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints directory {directory} (is {out!r} a run directory?)")
  ckpt = Checkpointer(directory, keep=1_000_000)
  built = {}

  def template(saved_config: dict):
    built["cfg"] = Config.from_dict(saved_config)
    built["graphdef"], state = init_state(built["cfg"])
    return state

  try:
    # A damaged latest step is reported in one line and the newest complete one loaded.
    state, _, _, step, _ = ckpt.restore_intact(template, step)
  finally:
    ckpt.close()
  return nnx.merge(built["graphdef"], state.params), built["cfg"], step


def rebuild(model: Transformer, cfg: Config, **model_changes) -> tuple[Transformer, Config]:
  """The same weights in a model built from ``cfg.model`` with ``model_changes`` applied."""
  changes = {k: v for k, v in model_changes.items() if v is not None}
  if not changes or all(getattr(cfg.model, k) == v for k, v in changes.items()):
    return model, cfg
  if "ffn" in changes and not {changes["ffn"], cfg.model.ffn} <= set(_GATED):
    raise ValueError(f"cannot switch the FFN from {cfg.model.ffn!r} to {changes['ffn']!r}: only "
                     f"{', '.join(_GATED)} share their weights")
  new_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(new_cfg.model, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model)), new_cfg


def load_model(path: str, *, step: int | None = None, ffn: str | None = None,
               compute_dtype: str | None = None, tokenizer: str | None = None,
               allow_unknown_config: bool = False) -> Loaded:
  """The model, config and tokenizer of a run directory or a Hugging Face checkpoint.

  step: a run directory's step (default: the latest complete one).
  tokenizer: overrides the checkpoint's ("bytes" or a tokenizer.json path); a Hugging Face
    directory without tokenizer.json needs it.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path!r} is not a directory")
  if is_run_dir(path):
    model, cfg, step = load_run(path, step)
    kind, context = "run", cfg.data.seq_len
  elif hf.is_hf_checkpoint(path):
    if step is not None:
      raise ValueError("--step applies to run directories; a Hugging Face checkpoint has one "
                       "set of weights")
    if tokenizer is None and not hf.has_tokenizer(path):
      raise FileNotFoundError(f"{path} has no tokenizer.json: pass the tokenizer ('bytes' or the "
                              "path of a tokenizer.json)")
    model, cfg = hf.load_hf(path, ffn=ffn, compute_dtype=compute_dtype or "float32",
                            allow_unknown_config=allow_unknown_config)
    kind = "hf"
    context = int(hf.read_config(path).get("max_position_embeddings") or cfg.data.seq_len)
  else:
    raise FileNotFoundError(f"{path} is neither a run directory (with checkpoints/) nor a "
                            "Hugging Face checkpoint (config.json and *.safetensors)")
  if tokenizer is not None:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tokenizer))
  tok = load_tokenizer(cfg.data.tokenizer)
  if tok.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"the tokenizer {cfg.data.tokenizer!r} has {tok.vocab_size} ids but the "
                     f"model's vocabulary is {cfg.model.vocab_size}")
  model, cfg = rebuild(model, cfg, ffn=ffn, compute_dtype=compute_dtype)
  return Loaded(model=model, cfg=cfg, tokenizer=tok, kind=kind, path=path, step=step,
                context=context)
