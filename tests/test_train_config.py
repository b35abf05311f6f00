"""Configs and the command line: presets, overrides, clear errors on bad values and paths."""
import dataclasses
import json

import pytest

from sparse_jax.cli import format_summary, main
from sparse_jax.config import PRESETS, Config, ModelConfig, TrainConfig, apply_overrides, get_config


def test_presets_valid_and_round_trip_through_json():
  for name in PRESETS:
    cfg = get_config(name)
    assert cfg.name == name
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_overrides_parse_by_field_type():
  cfg = apply_overrides(get_config("tiny"), [
      "model.n_layers=4", "train.lr=3e-4", "model.remat=true", "model.n_kv_heads=2",
      "model.vocab_size=none", "data.source=/data/*.parquet", "train.steps=1e4",
      "train.max_minutes=2.5"])
  assert (cfg.model.n_layers, cfg.train.lr, cfg.model.remat, cfg.model.n_kv_heads) == (4, 3e-4,
                                                                                       True, 2)
  assert cfg.model.vocab_size is None and cfg.data.source == "/data/*.parquet"
  assert cfg.train.steps == 10000 and cfg.train.max_minutes == 2.5
  assert get_config("tiny").model.n_layers == 2  # presets are not mutated


@pytest.mark.parametrize("override,message", [
    ("model.n_layers=0", "model.n_layers=0: must be a positive integer"),
    ("model.n_layers=2.5", "model.n_layers='2.5': expected int"),
    ("model.ffn=gelu", "model.ffn='gelu': must be one of relu_sparse"),
    ("model.ffn_impl=cuda", "must be one of auto, xla, pallas"),
    ("model.n_kv_heads=3", "must divide n_heads=4"),
    ("model.n_heads=5", "model.n_heads=5: must divide d_model=128"),
    ("model.remat=maybe", "expected bool"),
    ("model.compute_dtype=int8", "must be one of float32"),
    ("train.l1_norm=sum", "train.l1_norm='sum': must be one of mean, sum_neurons"),
    ("train.l1_coeff=-1", "must be non-negative"),
    ("train.grad_accum=3", "must divide batch_size=16"),
    ("train.b2=1.5", "must be in \\[0, 1\\)"),
    ("data.val_fraction=0.9", "must be in \\(0, 0.5\\)"),
    ("model.d_modle=64", "model has no field 'd_modle'"),
    ("optim.lr=1", "the key must be one of"),
    ("model.n_layers", "must look like section.field=value"),
])
def test_bad_overrides_name_the_field(override, message):
  with pytest.raises(ValueError, match=message):
    apply_overrides(get_config("tiny"), [override])


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown config 'huge'"):
    get_config("huge")


def test_dataclass_checks_apply_to_direct_construction():
  with pytest.raises(ValueError, match="model.d_model"):
    ModelConfig(d_model=-1)
  with pytest.raises(ValueError, match="train.steps"):
    dataclasses.replace(TrainConfig(), steps=0)


def test_cli_print_config_applies_flags_and_sets(capsys):
  assert main(["train", "--config", "small", "--steps", "7", "--set", "model.n_layers=3",
               "train.lr=1e-4", "--print-config"]) == 0
  cfg = json.loads(capsys.readouterr().out)
  assert cfg["name"] == "small" and cfg["train"]["steps"] == 7
  assert cfg["model"]["n_layers"] == 3 and cfg["train"]["lr"] == 1e-4


def test_cli_errors_are_clear(capsys, tmp_path):
  assert main(["train", "--set", "model.d_model=abc", "--print-config"]) == 2
  assert "model.d_model='abc': expected int" in capsys.readouterr().err
  missing = str(tmp_path / "no_such_dir" / "*.jsonl")
  assert main(["train", "--data", missing, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
  assert "matches no files" in capsys.readouterr().err
  # --config takes a preset or a file: an unknown name is an input error naming both.
  assert main(["train", "--config", "huge"]) == 2
  assert "--config 'huge' is neither a preset (tiny, " in capsys.readouterr().err


def test_summary_table_formats():
  s = dict(config="tiny", ffn="relu_sparse", params=451200, steps=10, target_steps=10,
           stop_reason="steps", tokens=20480, tokens_per_s=None, wall_s=3.0, l1_coeff=2e-3,
           l1_norm="sum_neurons", train_ce_first=4.0, train_ce_last=2.0, val_ce_initial=6.0,
           val_ce=2.1, val_ppl=8.2, val_active_per_token_L=[3.0, 4.0], val_active_per_token=3.5,
           d_ff=352, val_sparsity_pct=99.0, dead_on_val_pct=1.0, dead_last_window_pct=None,
           val_overflow_rows=0, val_dense_fallback=0.0, checkpoint_dir="c", plot="p")
  table = format_summary(s)
  assert "6.000 -> 2.100" in table and "3.5 of 352" in table and "n/a tokens/s" in table
