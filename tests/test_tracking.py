"""Run tracking: TensorBoard event files read back, interval-averaged train metrics, the time
budget's progress bar, W&B asked for but not installed; config files and --help-config."""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.cli import main
from sparse_jax.config import Config, TrainConfig, apply_overrides, get_config
from sparse_jax.config_files import (config_from_mapping, docstring_entries, field_rows,
                                     load_config, undocumented_fields)
from sparse_jax.train import train
from sparse_jax.train import tracking
from sparse_jax.train.tracking import IntervalMean, ProgressBar, read_events
from test_train import fresh_seed, short_run_config


def records(run, split="train"):
  return [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))
          if r["split"] == split]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same short run logged every step and every 3 steps, the latter stopped and resumed."""
  base = tmp_path_factory.mktemp("runs")
  cfg = short_run_config("train.steps=6", "train.eval_every=3", "train.dead_window=2",
                         "train.log_every=1", seed=fresh_seed())
  every = str(base / "every")
  train(cfg, every, progress=False)
  third = str(base / "third")
  cfg3 = apply_overrides(cfg, ["train.log_every=3"])
  train(cfg3, third, stop_at=4, progress=False)  # the resumed run purges its events past 4
  train(cfg3, third, progress=False)
  return cfg, every, third


def test_event_files_hold_the_metrics(runs):
  cfg, every, _ = runs
  ev = read_events(every)
  sc = ev["scalars"]
  recs = records(every)
  for name in ("train/loss", "train/ce", "train/lr", "train/tokens_per_s", "train/l1",
               "train/grad_norm", "val/ce", "val/sparsity_pct"):
    assert name in sc, name
  for layer in range(cfg.model.n_layers):
    assert [s for s, _ in sc[f"train/l0_L/layer_{layer}"]] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in sc[f"train/l0_L/layer_{layer}"]],
                               [r["l0_L"][layer] for r in recs], rtol=1e-6)
    # Dead neurons once a window of 2 steps has closed.
    assert [s for s, _ in sc[f"train/dead_fraction_L/layer_{layer}"]] == list(range(2, 7))
    assert [s for s, _ in sc[f"val/dead_on_val_L/layer_{layer}"]] == [0, 3, 6]
    # Per-neuron firing histograms at every evaluation, one count per neuron.
    assert ev["histograms"][f"val/firing/layer_{layer}"] == [(s, cfg.model.d_ff) for s in (0, 3, 6)]
  np.testing.assert_allclose([v for _, v in sc["train/ce"]], [r["ce"] for r in recs], rtol=1e-6)
  np.testing.assert_allclose([v for _, v in sc["train/lr"]], [r["lr"] for r in recs], rtol=1e-6)
  assert all(v > 0 for _, v in sc["train/tokens_per_s"])


def test_train_records_average_the_log_interval(runs):
  _, every, third = runs
  per_step, averaged = records(every), records(third)
  assert [r["step"] for r in averaged] == [3, 4, 6]  # 4: the stop; 6: after resuming
  assert [r["interval_steps"] for r in averaged] == [3, 1, 2]
  spans = {3: per_step[0:3], 4: per_step[3:4], 6: per_step[4:6]}
  for r in averaged:
    steps = spans[r["step"]]
    for k in ("loss", "ce", "l1", "grad_norm"):
      np.testing.assert_allclose(r[k], np.mean([s[k] for s in steps]), rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(r["l0_L"], np.mean([s["l0_L"] for s in steps], axis=0), rtol=1e-5)
    # The schedule and the tracker's state are the last step's.
    assert r["lr"] == pytest.approx(steps[-1]["lr"])
    assert r["dead_fraction_L"] == pytest.approx(steps[-1]["dead_fraction_L"])
  # The resumed run's event files hold each record of metrics.jsonl once (the stop's records at
  # step 4 included), nothing twice.
  sc = read_events(third)["scalars"]
  assert [s for s, _ in sc["train/ce"]] == [3, 4, 6]
  assert [s for s, _ in sc["val/ce"]] == [r["step"] for r in records(third, "val")] == [0, 3, 4, 6]


def test_interval_mean_matches_numpy(key):
  rng = np.random.default_rng(fresh_seed())
  steps = [dict(ce=rng.normal(), l0_L=rng.normal(size=3), lr=rng.normal(),
                reinit_neurons=int(rng.integers(0, 9)), dead_fraction_L=rng.normal(size=3))
           for _ in range(5)]
  acc = IntervalMean()
  for s in steps:
    acc.add({k: jnp.asarray(v, jnp.float32) for k, v in s.items()})
  out = acc.take()
  assert out["interval_steps"] == 5 and acc.steps == 0
  np.testing.assert_allclose(out["ce"], np.mean([s["ce"] for s in steps]), rtol=1e-5)
  np.testing.assert_allclose(out["l0_L"], np.mean([s["l0_L"] for s in steps], 0), rtol=1e-5)
  np.testing.assert_allclose(out["reinit_neurons"], sum(s["reinit_neurons"] for s in steps))
  np.testing.assert_allclose(out["lr"], steps[-1]["lr"], rtol=1e-6)
  np.testing.assert_allclose(out["dead_fraction_L"], steps[-1]["dead_fraction_L"], rtol=1e-6)
  with pytest.raises(ValueError, match="no step was added"):
    acc.take()


def test_interval_mean_leaves_out_skipped_nonfinite_steps():
  """A step skipped as non-finite (train.nonfinite=skip; its metrics hold NaN) is counted in
  ``nonfinite`` and left out of the averages, instead of making the interval's record NaN."""
  rng = np.random.default_rng(fresh_seed())
  ce = rng.normal(size=4)
  ce[1] = np.nan
  acc = IntervalMean()
  for i, c in enumerate(ce):
    acc.add(dict(ce=jnp.float32(c), lr=jnp.float32(i), nonfinite=jnp.asarray(i == 1)))
  out = acc.take()
  assert out["interval_steps"] == 4 and int(out["nonfinite"]) == 1
  np.testing.assert_allclose(out["ce"], np.mean(ce[[0, 2, 3]]), rtol=1e-5)
  assert float(out["lr"]) == 3.0
  acc.add(dict(ce=jnp.float32(np.nan), nonfinite=jnp.asarray(True)))
  out = acc.take()
  assert int(out["nonfinite"]) == 1 and np.isnan(out["ce"])


def test_progress_total_follows_the_time_budget(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(tracking.time, "perf_counter", lambda: now[0])
  bar = ProgressBar(TrainConfig(steps=10_000, max_minutes=1.0), 0, desc="t", disable=True)
  assert bar.bar.total == 10_000
  now[0] = 110.0  # the first step compiled for 10 s
  bar.update(1)
  now[0] = 111.0
  bar.update(2)
  now[0] = 111.5
  bar.update(3)  # 2 steps in 1.5 s after the first; 48.5 s left -> 3 + 64.67 steps
  assert bar.bar.total == 68
  # When the step count ends the run first, it stays the total.
  short = ProgressBar(TrainConfig(steps=20, max_minutes=1.0), 0, desc="t", disable=True)
  for step in range(1, 4):
    now[0] += 0.1
    short.update(step)
  assert short.bar.total == 20
  plain = ProgressBar(TrainConfig(steps=30), 5, desc="t", disable=True)
  plain.update(6)
  assert plain.bar.total == 30


def test_wandb_asked_for_but_not_installed(tmp_path, capsys):
  pytest.importorskip("tensorboardX")
  try:
    import wandb  # noqa: F401
    pytest.skip("wandb is installed here")
  except ImportError:
    pass
  assert main(["train", "--wandb", "proj", "--out", str(tmp_path), "--no-progress"]) == 2
  assert "train.wandb=true (--wandb) needs the Weights & Biases client" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "checkpoints")


# --------------------------------------------------------------------------- config files


def test_config_files(tmp_path):
  yaml_path = tmp_path / "exp.yaml"
  yaml_path.write_text("preset: small\nmodel:\n  n_layers: 3\ntrain:\n  lr: 3e-4\n  steps: 1e3\n"
                       "  max_minutes: 2\ndata:\n  max_docs: null\n")
  cfg = load_config(str(yaml_path))
  small = get_config("small")
  assert cfg.name == "exp" and cfg.model == dataclasses.replace(small.model, n_layers=3)
  assert (cfg.train.lr, cfg.train.steps, cfg.train.max_minutes) == (3e-4, 1000, 2.0)
  assert isinstance(cfg.train.max_minutes, float) and cfg.data == small.data
  # A run's own config.json (every field) loads as the same config.
  full = apply_overrides(get_config("1b"), ["train.lr=1e-4", "data.source=/x/*.txt"])
  path = tmp_path / "config.json"
  path.write_text(json.dumps(full.to_dict()))
  assert load_config(str(path)) == full
  # --set on top of a file, through the CLI.
  assert main(["train", "--config", str(yaml_path), "--set", "train.lr=1e-3",
               "--print-config"]) == 0
  assert load_config("0.5b") == get_config("0.5b")


@pytest.mark.parametrize("text,message", [
    ('{"model": {"n_layer": 3}}', "model: no field 'n_layer'"),
    ('{"modle": {}}', "unknown section"),
    ('{"train": {"steps": "many"}}', "train.steps='many': expected int"),
    ('{"train": {"steps": 2.5}}', "train.steps=2.5: expected int"),
    ('{"train": {"reinit_dead": 1}}', "train.reinit_dead=1: expected bool"),
    ('{"train": {"lr": -1}}', "train.lr=-1.0: must be positive"),
    ('{"train": 3}', "section 'train' must be a mapping"),
    ('[1, 2]', "expected a mapping of sections"),
    ('{"model": ', "not valid JSON"),
])
def test_bad_config_files(tmp_path, text, message):
  path = tmp_path / "bad.json"
  path.write_text(text)
  with pytest.raises(ValueError, match=message):
    load_config(str(path))


def test_unknown_config_spec(capsys):
  with pytest.raises(ValueError, match="neither a preset .* nor a JSON/YAML file"):
    load_config("tinyy")
  with pytest.raises(FileNotFoundError, match="no such file"):
    load_config("missing.yaml")
  assert main(["train", "--config", "tinyy"]) == 2


def test_help_config_lists_every_field(capsys):
  assert undocumented_fields() == []
  rows = field_rows()
  keys = {r["key"] for r in rows}
  for section in ("model", "data", "train", "parallel"):
    obj = getattr(Config(), section)
    cls = type(obj)
    for f in dataclasses.fields(cls):
      value = getattr(obj, f.name)
      # A nested section (model.sparse) is listed field by field.
      assert ({f"{section}.{f.name}.{g.name}" for g in dataclasses.fields(value)}
              if dataclasses.is_dataclass(value) else {f"{section}.{f.name}"}) <= keys
    # No docstring entry names a field that no longer exists.
    assert set(docstring_entries(cls)) <= {f.name for f in dataclasses.fields(cls)}, section
  assert docstring_entries(TrainConfig)["b2"] == docstring_entries(TrainConfig)["eps"]
  assert main(["train", "--config", "0.5b", "--help-config"]) == 0
  out = capsys.readouterr().out
  assert "train.batch_size (int, default 512)" in out  # the chosen config's defaults
  assert "model.d_ff (int, default 5632)" in out and "FFN hidden width" in out
  assert "parallel.process_id (int | None, default null)" in out
  assert config_from_mapping({}) == Config()


def test_renamed_keys_of_older_configs_load(monkeypatch):
  """Keys listed in config.RENAMED_KEYS move to their new place (an older config.json loads)."""
  from sparse_jax import config as config_module
  monkeypatch.setattr(config_module, "RENAMED_KEYS", {"train.lr_peak": "train.lr"},
                      raising=False)
  assert config_from_mapping({"train": {"lr_peak": 2e-4}}).train.lr == 2e-4
  assert config_from_mapping({"train": {"lr_peak": 2e-4, "lr": 1e-4}}).train.lr == 1e-4


def test_config_file_with_nested_sparse_section_and_tuples():
  """A run's config.json holds model.sparse as a nested mapping and sparse_hot_neurons as a JSON
  list: both load (``--config runs/x/config.json`` repeats run x)."""
  d = json.loads(json.dumps(get_config("tiny").to_dict()))
  d["model"]["sparse"]["twell_capacity"] = 16
  d["model"]["sparse_hot_neurons"] = [3, 5]
  cfg = config_from_mapping(d)
  assert cfg.model.sparse.twell_capacity == 16 and cfg.model.sparse_hot_neurons == (3, 5)
  assert cfg.to_dict() == Config.from_dict(d).to_dict()
  with pytest.raises(ValueError, match="model.sparse: no field 'bogus'"):
    config_from_mapping({"model": {"sparse": {"bogus": 1}}})
