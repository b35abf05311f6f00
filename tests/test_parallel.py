"""Training on a device mesh, on the 8 simulated CPU devices: mesh specs, the FSDP rule, sharded
steps that match one device, checkpoints resumed on other meshes, the scaling script's smoke run."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import pytest
from jax.sharding import PartitionSpec as P

from sparse_jax import parallel
from sparse_jax.cli import main
from sparse_jax.config import ParallelConfig, apply_overrides, get_config
from sparse_jax.data import Batches, build_corpus, load_tokenizer
from sparse_jax.train import Checkpointer, init_state, resolve_config, train
from sparse_jax.train.checkpoint import flatten_state
from sparse_jax.train.loop import step_config
from sparse_jax.train.step import _accumulate, state_shardings, step_functions
from test_checkpoint import ROOT, assert_trees_identical
from test_train import fresh_seed, short_run_overrides

MESHES = ("data:8", "data:2,fsdp:4")
# In the "mean" normalisation: large enough that the L1 term's gradient on the gate and up weights
# is comparable to the cross-entropy's (a wrong per-device scaling of it would show).
L1_COEFF = 20.0


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_mesh_shapes():
  assert jax.device_count() == 8
  assert parallel.mesh_shape("auto", 8) == {"data": 8, "fsdp": 1}
  assert parallel.mesh_shape("data:2,fsdp:4", 8) == {"data": 2, "fsdp": 4}
  assert parallel.mesh_shape("fsdp:4, data:2", 8) == {"data": 2, "fsdp": 4}
  assert parallel.mesh_shape("fsdp:-1", 8) == {"data": 1, "fsdp": 8}
  assert parallel.mesh_shape("data:-1,fsdp:2", 8) == {"data": 4, "fsdp": 2}
  mesh = parallel.make_mesh("data:2,fsdp:4")
  assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (2, 4)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  assert parallel.describe(mesh) == "data:2,fsdp:4" and parallel.batch_shards(mesh) == 8
  assert parallel.describe(parallel.run_mesh(ParallelConfig())) == "data:8,fsdp:1"
  assert parallel.make_mesh("auto", jax.devices()[:1]).size == 1


@pytest.mark.parametrize("spec,message", [
    ("data:4", r"mesh of 4 devices \(data:4,fsdp:1\) but there are 8"),
    ("data:2,fsdp:2", "product of the axis sizes must equal the device count"),
    ("model:8", "unknown mesh axis 'model'; the axes are data, fsdp"),
    ("data:4,tensor:2", "unknown mesh axis 'tensor'"),
    ("data", "'data' must be AXIS:SIZE"),
    ("data:two", "must be AXIS:SIZE with an integer size"),
    ("data:0", "must be positive"),
    ("data:2,data:4", "given twice"),
    ("data:-1,fsdp:-1", "only one axis can be -1"),
    ("data:3,fsdp:-1", "needs the other axes' product \\(3\\) to divide the 8 devices"),
    ("", "must be 'auto' or look like data:2,fsdp:4"),
])
def test_bad_mesh_specs(spec, message):
  with pytest.raises(ValueError, match=message):
    parallel.make_mesh(spec)


def test_bad_mesh_or_batch_fails_before_training(tmp_path, capsys):
  with pytest.raises(ValueError, match="parallel.mesh='gpu:8': unknown mesh axis 'gpu'"):
    apply_overrides(get_config("tiny"), ["parallel.mesh=gpu:8"])
  with pytest.raises(ValueError, match="but there are 8"):
    train(apply_overrides(get_config("tiny"), ["parallel.mesh=data:4"]), str(tmp_path),
          progress=False)
  with pytest.raises(ValueError, match="12 sequences per micro-batch cannot be split over the 8"):
    train(apply_overrides(get_config("tiny"), ["train.batch_size=12"]), str(tmp_path),
          progress=False)
  assert main(["train", "--out", str(tmp_path), "--mesh", "data:3"]) == 2
  assert "mesh of 3 devices" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "checkpoints")


def test_fsdp_rule_and_sharded_state():
  assert parallel.fsdp_spec((384, 128), 4) == P("fsdp", None)
  assert parallel.fsdp_spec((128, 4, 32), 4) == P("fsdp", None, None)
  assert parallel.fsdp_spec((4, 32, 128), 8) == P(None, None, "fsdp")
  assert parallel.fsdp_spec((10, 6), 3) == P(None, "fsdp")  # the largest does not divide
  assert parallel.fsdp_spec((10, 6), 4) == P()
  assert parallel.fsdp_spec((352,), 4) == P() and parallel.fsdp_spec((), 4) == P()
  assert parallel.fsdp_spec((384, 128), 1) == P()
  cfg, _ = resolve_config(get_config("tiny"))
  mesh = parallel.make_mesh("data:2,fsdp:4")
  _, state = init_state(cfg, mesh)
  flat, _ = flatten_state(state)
  expected, _ = flatten_state(state_shardings(cfg, mesh))
  for name, array in flat.items():
    assert array.sharding == expected[name], name
    # Every matrix of the tiny model has a dimension that 4 divides; vectors are replicated.
    assert ("fsdp" in array.sharding.spec) == (array.ndim >= 2), (name, array.sharding.spec)
  # AdamW moments are split like their parameters.
  for name, array in flat.items():
    if name.startswith("opt_state/") and "/mu/" in name:
      param = "params/" + name.split("/mu/", 1)[1]
      assert array.sharding.spec == flat[param].sharding.spec, name
  device0 = jax.devices()[0]
  total = sum(a.nbytes for a in flat.values())
  on_device0 = sum(s.data.nbytes for a in flat.values() for s in a.addressable_shards
                   if s.device == device0)
  print(f"state bytes: {total} in all, {on_device0} on one device")
  assert on_device0 < 0.3 * total  # ~1/4 (fsdp:4) plus the replicated vectors


# --------------------------------------------------------------------------- sharded = single


def _cfg(*overrides):
  return resolve_config(apply_overrides(get_config("tiny"), [
      "data.seq_len=32", "train.batch_size=16", "train.grad_accum=2", "train.l1_norm=mean",
      *overrides]))[0]


# A gate pre-activation (or, on an active neuron, an up projection) closer to zero than this can
# change sign between two reduction orders of the same f32 sums (their differences are ~1e-7).
TIE_MARGIN = 2e-6


def _gate_margin(graphdef, params, tokens) -> float:
  """The smallest |gate pre-activation| of any layer on ``tokens`` [..., L + 1], and |up
  projection| where the gate is on (the L1 term's sign(h)): how far the batch is from a ReLU or
  sign tie."""
  model = nnx.merge(graphdef, params)
  _, inter = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(
      jnp.asarray(tokens[..., :-1]).reshape(-1, tokens.shape[-1] - 1), logits=False)
  margin = np.inf
  for i, block in enumerate(model.blocks):
    x = np.asarray(inter["blocks"][i]["ffn_norm"]["__call__"][0], np.float64)
    gate = x @ np.asarray(block.ffn.w_gate_FxD.value, np.float64).T
    up = x @ np.asarray(block.ffn.w_up_FxD.value, np.float64).T
    margin = min(margin, np.abs(gate).min(), np.abs(up[gate > 0]).min())
  return float(margin)


@pytest.fixture(scope="module")
def f32_reference():
  """A float32 model whose sparse FFN takes the sparse path (an ELL as wide as d_ff never
  overflows), a random batch, and one device's accumulated gradients with and without L1.

  The batch is redrawn until no gate pre-activation lies within TIE_MARGIN of zero: a ReLU that
  flips between the sharded and the one-device reduction order changes a whole gate-weight row of
  the gradient, and everything upstream of it (seen: 8.9e-3 relative, seed 14085818), which is
  not a sharding error."""
  cfg = _cfg("model.compute_dtype=float32", "model.sparse_ell_width=352")
  graphdef, state = init_state(cfg)
  rng = np.random.default_rng(fresh_seed())
  for _ in range(30):
    batch = rng.integers(0, 259, (2, 8, 33), dtype=np.int32)
    margin = _gate_margin(graphdef, state.params, batch)
    if margin > TIE_MARGIN:
      break
    print(f"batch redrawn: a gate or up pre-activation within {margin:.1e} of zero")
  else:
    raise AssertionError("30 batches in a row came within TIE_MARGIN of a ReLU tie")
  accumulate = jax.jit(_accumulate, static_argnames=("graphdef", "cfg"))
  ref = {coeff: jax.device_get(accumulate(state.params, graphdef, batch, coeff, cfg))
         for coeff in (0.0, L1_COEFF)}
  return cfg, batch, state, accumulate, ref


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_gradients_match_one_device(f32_reference, spec):
  """Loss, L1, statistics and gradients of a sharded step equal one device's to f32 rounding,
  with the L1 term's gradient (through the per-device op and the pmean) included.

  Typical agreement is ~1e-6 relative (the batch keeps clear of ReLU and sign(h) ties: see
  ``f32_reference``); a wrong reduction or L1 scaling is off by O(1)."""
  cfg, batch, state, accumulate, ref = f32_reference
  mesh = parallel.make_mesh(spec)
  graphdef, sharded = init_state(cfg, mesh)
  assert_trees_identical(sharded.params, state.params)  # a seed gives the same model on any mesh
  on_mesh = parallel.put(batch, parallel.batch_sharding(mesh, ndim=3, axis=1))
  for coeff in (0.0, L1_COEFF):
    grads, loss, ce, l1, stats = jax.device_get(
        accumulate(sharded.params, graphdef, on_mesh, coeff, cfg))
    grads_1, loss_1, ce_1, l1_1, stats_1 = ref[coeff]
    print(f"{spec} coeff {coeff}: loss {loss} vs {loss_1}, l1 {l1} vs {l1_1}")
    np.testing.assert_allclose([loss, ce, l1], [loss_1, ce_1, l1_1], rtol=1e-5)
    np.testing.assert_allclose(stats.l0, stats_1.l0, rtol=1e-4)
    assert np.abs(stats.active_per_neuron - stats_1.active_per_neuron).sum() <= 2
    assert not np.any(stats.dense_fallback) and not np.any(stats_1.dense_fallback)
    assert np.all(stats.overflow_rows == 0)
    errors = {name: rel_err(g, g1) for name, (g, g1) in _named_pairs(grads, grads_1)}
    print(f"  gradients: largest relative error {max(errors.values()):.1e} "
          f"({max(errors, key=errors.get)}), median {np.median(list(errors.values())):.1e}")
    assert max(errors.values()) < 1e-4, errors
  # The L1 term's own gradient (what the penalty adds to the gate and up weights, through the
  # per-device op and the pmean) agrees too, and is not negligible.
  sharded_l1 = flatten_state(jax.device_get(
      accumulate(sharded.params, graphdef, on_mesh, L1_COEFF, cfg))[0])[0]
  sharded_0 = flatten_state(jax.device_get(
      accumulate(sharded.params, graphdef, on_mesh, 0.0, cfg))[0])[0]
  for name, (g1, g0) in _named_pairs(ref[L1_COEFF][0], ref[0.0][0]):
    if "/ffn/w_gate" in name or "/ffn/w_up" in name:
      d_ref, d_sharded = g1 - g0, sharded_l1[name] - sharded_0[name]
      print(f"{name}: |L1 grad| / |CE grad| = {np.linalg.norm(d_ref) / np.linalg.norm(g0):.3f}, "
            f"sharded vs one device {rel_err(d_sharded, d_ref):.2e}")
      assert np.linalg.norm(d_ref) > 0.1 * np.linalg.norm(g0), name
      assert rel_err(d_sharded, d_ref) < 1e-4, name


def test_sharded_remat_keeping_sparse_residuals_matches_one_device(f32_reference):
  """remat with the default policy (the sparse op's residuals kept, named inside the per-device
  op's shard_map) on a 2 x 4 mesh: the one-device step's loss and gradients without remat."""
  cfg, batch, _, accumulate, ref = f32_reference
  remat = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=True))
  assert remat.model.remat_policy == "keep_sparse_ffn"
  mesh = parallel.make_mesh("data:2,fsdp:4")
  graphdef, sharded = init_state(remat, mesh)
  on_mesh = parallel.put(batch, parallel.batch_sharding(mesh, ndim=3, axis=1))
  grads, loss, ce, l1, _ = jax.device_get(accumulate(sharded.params, graphdef, on_mesh, L1_COEFF,
                                                     remat))
  grads_1, loss_1, ce_1, l1_1, _ = ref[L1_COEFF]
  np.testing.assert_allclose([loss, ce, l1], [loss_1, ce_1, l1_1], rtol=1e-5)
  errors = {name: rel_err(g, g1) for name, (g, g1) in _named_pairs(grads, grads_1)}
  assert max(errors.values()) < 1e-4, errors


def _named_pairs(a, b):
  fa, fb = flatten_state(a)[0], flatten_state(b)[0]
  return [(k, (np.asarray(fa[k]), np.asarray(fb[k]))) for k in fa]


def test_sharded_bf16_step_matches_one_device():
  """bf16 compute, the default ELL width (at init most rows are long: the dense fallback), a whole
  optimiser step: metrics and updated parameters agree to bf16 reduction-order rounding."""
  cfg = _cfg("train.warmup_steps=0")  # the full learning rate at step 0: parameters move
  batch = np.random.default_rng(fresh_seed()).integers(0, 259, (2, 8, 33), dtype=np.int32)
  start = jax.device_get(init_state(cfg)[1].params)
  runs = {}
  for spec in (None, "data:2,fsdp:4"):
    mesh = None if spec is None else parallel.make_mesh(spec)
    graphdef, state = init_state(cfg, mesh)
    step = step_functions(graphdef, step_config(cfg), mesh)[0]
    runs[spec] = jax.device_get(step(state, batch))
  (s1, m1), (s8, m8) = runs[None], runs["data:2,fsdp:4"]
  for key in ("loss", "ce", "l1", "grad_norm"):
    print(f"{key}: {m8[key]} vs {m1[key]}")
  np.testing.assert_allclose([m8["loss"], m8["ce"], m8["l1"]], [m1["loss"], m1["ce"], m1["l1"]],
                             rtol=1e-3)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=2e-3)
  np.testing.assert_allclose(m8["l0_L"], m1["l0_L"], rtol=1e-3)
  np.testing.assert_array_equal(m8["dense_fallback_L"], m1["dense_fallback_L"])
  # AdamW's first update is lr x sign(gradient): the same but where a gradient entry is within
  # bf16 rounding of zero (~0.1% of the entries).
  flipped = total = 0
  for name, (p8, p1) in _named_pairs(s8.params, s1.params):
    p0 = np.asarray(flatten_state(start)[0][name])
    flipped += np.sum(np.sign(p8 - p0) != np.sign(p1 - p0))
    total += p0.size
  print(f"updates of opposite sign: {flipped} of {total} entries")
  assert flipped < 5e-3 * total


def test_pallas_backend_runs_per_device(pallas_interpret):
  """The Pallas backend (kernels traced in both branches of its dispatcher, forward and backward)
  under shard_map: a sharded bf16 gradient step agrees with one device's."""
  cfg = _cfg("model.d_model=256", "model.d_ff=512", "model.n_layers=1", "model.ffn_impl=pallas",
             "train.grad_accum=1", "train.batch_size=8")
  batch = np.random.default_rng(fresh_seed()).integers(0, 259, (1, 8, 33), dtype=np.int32)
  accumulate = jax.jit(_accumulate, static_argnames=("graphdef", "cfg"))
  graphdef, state = init_state(cfg)
  grads_1, loss_1, *_ = jax.device_get(accumulate(state.params, graphdef, batch, 1.0, cfg))
  mesh = parallel.make_mesh("data:2,fsdp:4")
  graphdef, state = init_state(cfg, mesh)
  on_mesh = parallel.put(batch, parallel.batch_sharding(mesh, ndim=3, axis=1))
  grads, loss, *_ = jax.device_get(accumulate(state.params, graphdef, on_mesh, 1.0, cfg))
  errors = {name: rel_err(g, g1) for name, (g, g1) in _named_pairs(grads, grads_1)}
  print(f"pallas: loss {loss} vs {loss_1}, gradients within {max(errors.values()):.1e}")
  np.testing.assert_allclose(loss, loss_1, rtol=1e-3)
  assert max(errors.values()) < 2e-2, errors


# --------------------------------------------------------------------------- checkpoints


def _continue(cfg, state, data_state, mesh, steps):
  """``steps`` more optimiser steps from ``state`` on ``mesh``, on the run's own batches."""
  corpus = build_corpus(cfg.data, load_tokenizer(cfg.data.tokenizer), progress=False)
  batches = Batches(corpus.train_tokens, cfg.data.seq_len, cfg.train.batch_size, cfg.data.seed,
                    state=data_state)
  graphdef = init_state(cfg, mesh)[0]
  step = step_functions(graphdef, step_config(cfg), mesh)[0]
  micro = cfg.train.batch_size // cfg.train.grad_accum
  for _ in range(steps):
    state, _ = step(state, batches.next().reshape(cfg.train.grad_accum, micro, -1))
  return jax.device_get(state)


def test_sharded_checkpoint_resumes_on_other_meshes(tmp_path):
  """A data:8 run saved at step 2 restores exactly onto data:2,fsdp:4 and onto one device, each
  array in the new run's sharding, and training goes on there as it does on data:8."""
  overrides = short_run_overrides("train.steps=4", "train.log_every=1", "train.grad_accum=2",
                                  "model.compute_dtype=float32", seed=fresh_seed())
  cfg = apply_overrides(get_config("tiny"), overrides + ["parallel.mesh=data:8"])
  run, straight = str(tmp_path / "run"), str(tmp_path / "straight")
  train(cfg, run, stop_at=2, progress=False)
  train(cfg, straight, progress=False)
  cfg_r, _ = resolve_config(cfg)
  ckpt = Checkpointer(os.path.join(run, "checkpoints"), keep=2)
  saved, data_state, _, _ = ckpt.restore(init_state(cfg_r, parallel.make_mesh("data:8"))[1])
  final = jax.device_get(Checkpointer(os.path.join(straight, "checkpoints"), keep=2).restore(
      init_state(cfg_r)[1])[0])
  for spec in ("data:2,fsdp:4", None):
    mesh = None if spec is None else parallel.make_mesh(spec)
    template = init_state(cfg_r, mesh)[1]
    restored, data_r, _, step = ckpt.restore(template)
    assert step == 2 and data_r == data_state
    assert_trees_identical(restored, saved)
    for name, array in flatten_state(restored)[0].items():
      assert array.sharding == flatten_state(template)[0][name].sharding, (spec, name)
    continued = _continue(cfg_r, restored, data_r, mesh, steps=2)
    assert int(continued.step) == 4
    errors = {name: rel_err(a, b) for name, (a, b) in _named_pairs(continued.params, final.params)}
    print(f"step 4 on {spec or 'one device'} vs data:8: parameters within "
          f"{max(errors.values()):.1e}")
    assert max(errors.values()) < 1e-4, errors
  ckpt.close()
  # The training loop resumes the data:8 run on data:2,fsdp:4 (the CLI's --mesh), like the
  # uninterrupted data:8 run.
  assert main(["train", "--out", run, "--no-progress", "--mesh", "data:2,fsdp:4",
               "--set", *overrides]) == 0
  recs = {name: [r for r in map(json.loads, open(os.path.join(d, "metrics.jsonl")))
                 if r["split"] == "train"] for name, d in (("run", run), ("straight", straight))}
  assert [r["step"] for r in recs["run"]] == [1, 2, 3, 4]
  for a, b in zip(recs["run"], recs["straight"]):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  summary = json.load(open(os.path.join(run, "summary.json")))
  assert summary["mesh"] == "data:2,fsdp:4" and summary["devices"] == 8


_HOST_PROCESS = textwrap.dedent("""
    import json, os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.path.insert(0, {root!r})
    from sparse_jax.config import apply_overrides, get_config
    from sparse_jax.train import train

    cfg = apply_overrides(get_config("tiny"), {overrides!r} + [
        "parallel.distributed=true", "parallel.coordinator_address=localhost:{port}",
        "parallel.num_processes=2", "parallel.process_id=" + sys.argv[1]])
    train(cfg, {out!r}, stop_at=2, progress=False)  # a sharded save from both processes
    summary = train(cfg, {out!r}, progress=False)    # and its restore
    print("RESULT", json.dumps([jax.process_count(), jax.device_count(), summary["val_ce"]]))
""")


def test_two_processes_train_like_one(tmp_path):
  """Two processes of 4 CPU devices each (jax.distributed, gloo collectives) train, save and
  resume a data:2,fsdp:4 run as one process of 8 devices does."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  overrides = short_run_overrides("train.steps=4", "train.log_every=1",
                                  "parallel.mesh=data:2,fsdp:4", seed=fresh_seed())
  out = str(tmp_path / "hosts")
  script = _HOST_PROCESS.format(root=ROOT, overrides=overrides, port=port, out=out)
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  results = []
  for proc, log in zip(procs, logs):
    assert proc.returncode == 0, log[-3000:]
    results.append(json.loads(log.split("RESULT ", 1)[1].splitlines()[0]))
  one = train(apply_overrides(get_config("tiny"), overrides), str(tmp_path / "one"),
              progress=False)
  print(f"val loss: processes {[r[2] for r in results]}, one process {one['val_ce']}")
  for count, devices, val_ce in results:
    assert (count, devices) == (2, 8)
    np.testing.assert_allclose(val_ce, one["val_ce"], rtol=1e-4)
  assert os.path.exists(os.path.join(out, "summary.json"))
  assert os.path.exists(os.path.join(out, "process_1", "summary.json"))
  assert Checkpointer(os.path.join(out, "checkpoints"), keep=2).all_steps() == [2, 4]


# --------------------------------------------------------------------------- scaling script


def test_scale_script_smoke(tmp_path, capsys):
  sys.path.insert(0, ROOT)
  from experiments import scale
  out = str(tmp_path / "scale.json")
  result = scale.main(["--config", "tiny", "--steps", "2", "--warmup", "1", "--repeats", "1",
                       "--per-device-batch", "1", "--set", "data.seq_len=32", "--out", out])
  printed = capsys.readouterr().out
  assert "scaling efficiency 1 -> 8 devices" in printed
  on_disk = json.load(open(out))
  assert on_disk == json.loads(json.dumps(result))
  one, eight = on_disk["records"]
  assert (one["devices"], one["mesh"], eight["devices"], eight["mesh"]) == (
      1, "single device", 8, "data:8,fsdp:1")
  assert (one["global_batch"], eight["global_batch"]) == (1, 8)
  assert one["tokens_per_s"] > 0 and eight["tokens_per_s"] > 0
  np.testing.assert_allclose(on_disk["efficiency"],
                             eight["tokens_per_s"] / (8 * one["tokens_per_s"]))
  assert len(on_disk["devices"]) == 8 and on_disk["command"].startswith("python experiments/")
  assert np.isfinite(eight["final_loss"])


def test_scale_script_calibrated_sparsity(tmp_path):
  """--calibrate-sparsity: both runs start from the calibrated (sparse) model, lr frozen."""
  sys.path.insert(0, ROOT)
  from experiments import scale
  out = str(tmp_path / "scale_sparse.json")
  result = scale.main(["--config", "tiny", "--cpu-devices", "8", "--steps", "2", "--warmup", "1",
                       "--repeats", "1", "--per-device-batch", "2", "--calibrate-sparsity", "0.99",
                       "--out", out])
  on_disk = json.load(open(out))
  assert on_disk == json.loads(json.dumps(result))
  d_ff = on_disk["model"]["d_ff"]
  assert on_disk["calibrate_sparsity"] == 0.99 and on_disk["warmup_steps"] == scale.FROZEN_WARMUP
  assert on_disk["ffn"] == "relu_sparse"
  assert 0 < on_disk["calib_check_active_fraction"] < 0.05
  one, eight = on_disk["records"]
  assert (one["devices"], eight["devices"]) == (1, 8)
  for rec in (one, eight):
    print(f"{rec['devices']} device(s): active/token {rec['active_per_token']:.2f} of {d_ff}, "
          f"dense share {rec['dense_fallback_share']:.2f}")
    assert 0 < rec["active_per_token"] < 0.1 * d_ff  # a fresh model: ~0.5 * d_ff
    assert rec["dense_fallback_share"] < 0.5
    assert np.isfinite(rec["final_loss"])
  # The same calibrated model and batches on both: the measured sparsity agrees.
  np.testing.assert_allclose(one["active_per_token"], eight["active_per_token"], rtol=0.5)
