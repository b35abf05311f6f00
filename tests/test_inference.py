"""Preparing a checkpoint for sparse inference (sparse_jax.inference, `sparse-jax
prepare-inference`): permuted checkpoints compute the same logits, the prepared directory loads
with the split FFN, the CLI round trip."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax import cli, hf, inference
from sparse_jax.config import Config, ModelConfig, apply_overrides
from sparse_jax.nn import Transformer, forward_with_stats
from sparse_jax.ops.hotcold import LayerPlan

D_FF = 352


def _model(seed: int, **kw) -> tuple[Transformer, Config]:
  mcfg = ModelConfig(vocab_size=384, d_model=64, n_layers=3, n_heads=4, d_ff=D_FF,
                     compute_dtype="float32", ffn_impl="xla", **kw)
  return Transformer(mcfg, rngs=nnx.Rngs(seed)), Config(model=mcfg)


@nnx.jit
def _forward(model, tokens):
  return forward_with_stats(model, tokens)


def _tokens(seed: int, b=2, length=24):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 259, (b, length)), jnp.int32)


def test_model_config_checks_hot_neurons():
  assert ModelConfig(n_layers=2, sparse_hot_neurons=[0, 352]).sparse_hot_neurons == (0, 352)
  for bad in ([0], [0, 353], [0, -1], [0, 1.5], "12"):
    with pytest.raises(ValueError, match="sparse_hot_neurons"):
      ModelConfig(n_layers=2, sparse_hot_neurons=bad)
  cfg = Config(model=ModelConfig(n_layers=2, sparse_hot_neurons=(128, 0)))
  assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert apply_overrides(Config(), ["model.sparse_hot_neurons=128,0"]) == cfg
  assert apply_overrides(cfg, ["model.sparse_hot_neurons=none"]).model.sparse_hot_neurons is None
  with pytest.raises(ValueError, match="sparse_hot_neurons"):
    apply_overrides(Config(), ["model.sparse_hot_neurons=128"])


def test_permuted_checkpoint_gives_the_same_logits():
  """Layers with n_hot = 0 (plain op), one tile (256) and all neurons, each with a random
  permutation: logits and per-layer statistics (in the permuted order) as the original's."""
  seed = int(np.random.default_rng().integers(1 << 30))
  model, cfg = _model(seed)
  rng = np.random.default_rng(seed)
  plans = [LayerPlan(perm=rng.permutation(D_FF), n_hot=n, predicted={}) for n in (0, 256, D_FF)]
  prepared, new_cfg = inference.apply_plan(model, cfg, plans)
  assert new_cfg.model.sparse_hot_neurons == (0, 256, D_FF)
  assert [b.ffn.hot_neurons for b in prepared.blocks] == [0, 256, D_FF]
  tokens = _tokens(seed)
  logits, stats = _forward(model, tokens)
  logits_p, stats_p = _forward(prepared, tokens)
  np.testing.assert_allclose(np.asarray(logits_p), np.asarray(logits), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(stats_p.l0), np.asarray(stats.l0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stats_p.l1), np.asarray(stats.l1), rtol=1e-5)
  for layer, plan in enumerate(plans):
    np.testing.assert_array_equal(np.asarray(stats_p.active_per_neuron[layer]),
                                  np.asarray(stats.active_per_neuron[layer])[plan.perm])


def test_firing_counts_and_plan_model():
  model, _ = _model(3)
  batches = [np.asarray(_tokens(s)) for s in (1, 2)]
  counts, n = inference.firing_counts(model, batches)
  assert counts.shape == (3, D_FF) and n == 2 * 2 * 24
  _, stats = _forward(model, jnp.asarray(batches[0]))
  _, stats2 = _forward(model, jnp.asarray(batches[1]))
  np.testing.assert_array_equal(counts, np.asarray(stats.active_per_neuron)
                                + np.asarray(stats2.active_per_neuron))
  plans = inference.plan_model(counts, n, d_model=64)
  assert len(plans) == 3 and all(sorted(p.perm) == list(range(D_FF)) for p in plans)
  with pytest.raises(ValueError, match="n_tokens"):
    inference.plan_model(counts, 1, d_model=64)


def test_apply_plan_refuses_what_it_cannot_prepare():
  model, cfg = _model(0)
  good = [LayerPlan(perm=np.arange(D_FF), n_hot=0, predicted={})] * 3
  with pytest.raises(ValueError, match="layers"):
    inference.apply_plan(model, cfg, good[:2])
  bad = good[:2] + [LayerPlan(perm=np.zeros(D_FF, np.int64), n_hot=0, predicted={})]
  with pytest.raises(ValueError, match="permutation"):
    inference.apply_plan(model, cfg, bad)
  silu, silu_cfg = _model(0, ffn="silu_dense")
  with pytest.raises(ValueError, match="ReLU-gated"):
    inference.apply_plan(silu, silu_cfg, good)


def test_prepare_inference_cli_round_trip(tmp_path, capsys):
  """A Hugging Face checkpoint -> `sparse-jax prepare-inference` -> a directory that loads with
  the split FFN, computes the same logits, and runs `eval` and `generate`."""
  model, cfg = _model(5)
  src = str(tmp_path / "src")
  hf.export_hf(model, src, tokenizer="bytes", max_position_embeddings=64)
  text = tmp_path / "calib.txt"
  text.write_text("def main():\n    return sum(x * x for x in range(10))\n" * 40)
  out = str(tmp_path / "prepared")
  argv = ["prepare-inference", "--checkpoint", src, "--out", out, "--data", str(text),
          "--max-tokens", "256", "--seq-len", "32", "--batch-size", "2", "--no-progress"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert "dense neurons" in printed
  with open(os.path.join(out, inference.PLAN_FILE)) as fh:
    plan = json.load(fh)
  with open(os.path.join(out, hf.CONFIG_FILE)) as fh:
    hot = json.load(fh)[hf.HOT_NEURONS_FIELD]
  assert hot == plan["sparse_hot_neurons"] and len(hot) == 3
  assert plan["tokens"] == 256  # 4 windows of 32 tokens, 2 per batch
  check = plan["first_batch"]
  assert check["max_abs_logit_diff"] < 1e-5 * max(1.0, check["max_abs_logit"])
  np.testing.assert_allclose(check["active_per_token_prepared"], check["active_per_token"])
  assert all(0 <= n <= D_FF and (n % 128 == 0 or n == D_FF) for n in hot)

  from sparse_jax.eval import load_checkpoint
  loaded = load_checkpoint(out)
  assert loaded.cfg.model.sparse_hot_neurons == tuple(hot)
  assert [b.ffn.hot_neurons for b in loaded.model.blocks] == hot
  tokens = _tokens(9)
  np.testing.assert_allclose(np.asarray(loaded.model(tokens)), np.asarray(model(tokens)),
                             rtol=2e-5, atol=2e-5)
  # Preparing into an existing directory is refused before any work.
  assert cli.main(argv) == 2
  assert "already exists" in capsys.readouterr().err
  assert cli.main(["generate", "--checkpoint", out, "--prompt", "def", "--max-new-tokens",
                   "4"]) == 0
  assert cli.main(["eval", "--checkpoint", out, "--data", str(text), "--seq-len", "32",
                   "--batch-size", "2", "--max-batches", "1", "--out", str(tmp_path / "ev"),
                   "--no-progress"]) == 0


def test_split_model_on_a_device_mesh_matches_one_device():
  """A model with the split FFN built on a data:2,fsdp:4 mesh (the op per device, statistics
  reduced outside the map) computes one device's logits and statistics."""
  from sparse_jax import parallel
  mcfg = ModelConfig(vocab_size=384, d_model=64, n_layers=2, n_heads=4, d_ff=D_FF,
                     compute_dtype="float32", ffn_impl="xla", sparse_hot_neurons=(128, 0))
  one = Transformer(mcfg, rngs=nnx.Rngs(4))
  mesh = parallel.make_mesh("data:2,fsdp:4")
  sharded = Transformer(mcfg, rngs=nnx.Rngs(4), mesh=mesh)
  tokens = _tokens(4, b=8, length=16)
  logits, stats = _forward(one, tokens)
  logits_s, stats_s = _forward(sharded, tokens)
  np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(stats_s.l0), np.asarray(stats.l0), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(stats_s.active_per_neuron),
                                np.asarray(stats.active_per_neuron))
