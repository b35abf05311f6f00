"""The run config reaches the sparse op: every ``SparseFFNConfig`` field is settable as
``model.sparse.<field>``, is recorded in a run's config.json, and arrives in every FFN of the
model; old run directories (``model.sparse_ell_width``) still load."""
import dataclasses
import json
import os

import pytest
from flax import nnx

from sparse_jax import ops
from sparse_jax.cli import main
from sparse_jax.config import Config, apply_overrides, get_config
from sparse_jax.nn import Transformer

# One valid non-default value per field (all of them: a new field must be added here).
NEW_VALUES = {"tile": 128, "twell_capacity": 64, "overflow_capacity": 48, "ell_width": 24,
              "tail_capacity": 9, "max_active_fraction": 0.02, "max_active_fraction_train": 0.01,
              "entry_capacity": 4096, "mode": "sparse", "overflow_fallback": "defer",
              "decode_max_tokens": 64, "decode_path": "union",
              "decode_density": 0.02, "decode_union_capacity": 512,
              "decode_max_union_fraction": 0.3, "decode_gate_split": 4, "gate_threshold": 0.05,
              "train_backward": "token_major"}


def test_every_field_is_settable_and_round_trips():
  assert set(NEW_VALUES) == {f.name for f in dataclasses.fields(ops.SparseFFNConfig)}
  cfg = apply_overrides(get_config("tiny"),
                        [f"model.sparse.{k}={v}" for k, v in NEW_VALUES.items()])
  assert dataclasses.asdict(cfg.model.sparse) == NEW_VALUES
  assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  off = apply_overrides(cfg, ["model.sparse.max_active_fraction=none"])
  assert off.model.sparse.max_active_fraction is None
  assert get_config("tiny").model.sparse == ops.SparseFFNConfig()  # presets are not mutated


def test_cli_print_config_shows_the_field(capsys):
  assert main(["train", "--config", "tiny", "--set", "model.sparse.twell_capacity=64",
               "--print-config"]) == 0
  cfg = json.loads(capsys.readouterr().out)
  assert cfg["model"]["sparse"]["twell_capacity"] == 64


@pytest.mark.parametrize("override,message", [
    ("model.sparse.twell_capacity=0", "twell_capacity must be a positive int"),
    ("model.sparse.max_active_fraction=2", "max_active_fraction must be None or in"),
    ("model.sparse.overflow_fallback=later", "overflow_fallback must be one of"),
    ("model.sparse.tiel=3", "model.sparse has no field 'tiel'"),
    ("model.sparse.tile=abc", "model.sparse.tile='abc': expected int"),
    ("model.n_layers.x=1", "model.n_layers is a value, not a section"),
])
def test_bad_sparse_overrides_name_the_field(override, message):
  with pytest.raises(ValueError, match=message):
    apply_overrides(get_config("tiny"), [override])


def test_old_run_config_and_old_key_still_load():
  old = get_config("tiny").to_dict()
  del old["model"]["sparse"]
  old["model"]["sparse_ell_width"] = 32  # config.json of a run from before model.sparse
  cfg = Config.from_dict(old)
  assert cfg.model.sparse == ops.SparseFFNConfig(ell_width=32)
  renamed = apply_overrides(get_config("tiny"), ["model.sparse_ell_width=40"])
  assert renamed.model.sparse.ell_width == 40


def test_every_ffn_gets_the_config():
  cfg = apply_overrides(get_config("tiny"), ["model.vocab_size=256", "model.sparse.ell_width=24",
                                             "model.sparse.twell_capacity=16"])
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  assert all(b.ffn.sparse_config == cfg.model.sparse for b in model.blocks)


@pytest.mark.slow
def test_a_run_records_the_field(tmp_path):
  """A 2-step run (on the tests' 8 CPU devices, so the FFNs run per device) writes the field."""
  from sparse_jax.train import train
  cfg = apply_overrides(get_config("tiny"), [
      "train.steps=2", "train.batch_size=8", "data.seq_len=32", "train.log_every=1",
      "train.eval_every=1000", "train.eval_batches=1", "train.ckpt_every=1000",
      "data.max_docs=40", "model.sparse.twell_capacity=64"])
  run = str(tmp_path / "run")
  train(cfg, run, progress=False)
  saved = json.load(open(os.path.join(run, "config.json")))
  assert saved["model"]["sparse"]["twell_capacity"] == 64
  assert Config.from_dict(saved).model.sparse.twell_capacity == 64


def test_bad_train_backward_names_the_choices():
  with pytest.raises(ValueError, match="train_backward must be one of"):
    apply_overrides(get_config("tiny"), ["model.sparse.train_backward=by_column"])


def test_auto_train_backward_is_the_fused_pass_where_it_was_measured():
  from sparse_jax.ops.base import FUSED_BACKWARD_MAX_D_MODEL, resolve_train_backward
  assert resolve_train_backward("auto", 2048) == "neuron_major_fused"
  assert resolve_train_backward("auto", FUSED_BACKWARD_MAX_D_MODEL + 256) == "neuron_major"
  assert resolve_train_backward("token_major", 2048) == "token_major"
  with pytest.raises(ValueError, match="unknown train_backward 'by_row'"):
    resolve_train_backward("by_row", 2048)
