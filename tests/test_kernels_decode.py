"""Decode kernels (pallas_kernels/twell_decode.py) on the CPU: GPU interpret mode against the float32
dense FFN, silent tiles, non-finite rows, and CPU cross-lowering of the real GPU paths."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ffn_problem_without_gate_ties, rel_err

from pallas_kernels import twell_decode
from sparse_jax.ops.dense import ffn_with_l1

SMALL = twell_decode.DecodeConfig(tile_k=64, max_concurrent_steps=2, down_tiles_per_cta=3)


def problem(key, m, d=256, n=512, active=6.0, dist="skewed", silent_tiles=(2, 5)):
  """A drawn problem whose gate rows of ``silent_tiles`` (64-neuron tiles) never fire, with no
  gate pre-activation at a ReLU tie (``conftest.ffn_problem_without_gate_ties``): there the
  kernel's gate (split-K partial sums, another f32 summation order) and the XLA reference's may
  fire differently, and the statistics' counts are compared exactly (seen: l0 24.0 vs 24.2 with
  seed 359804879, a pre-activation within f32 noise of 0)."""
  p = ffn_problem_without_gate_ties(key, m, d, n, active_per_token=active, distribution=dist,
                                    dtype=jnp.bfloat16)
  for t in silent_tiles:
    rows = slice(t * twell_decode.NEURON_TILE, (t + 1) * twell_decode.NEURON_TILE)
    p = dataclasses.replace(p, w_gate=p.w_gate.at[rows].set(0))
  m_pad = twell_decode.pad_tokens(m)
  return p, jnp.pad(p.x, ((0, m_pad - m), (0, 0)))


def dense32(x, wg, wu, wd, threshold=0.0):
  f32 = lambda a: None if a is None else a.astype(jnp.float32)
  return ffn_with_l1(f32(x), f32(wg), f32(wu), f32(wd), threshold)


@pytest.mark.parametrize("m,gated,threshold,narrow,split", [
    (1, True, 0.0, False, 1), (5, False, 0.0, True, 1), (16, True, 0.05, False, 1),
    (40, True, 0.0, True, 1), (1, True, 0.0, True, 4), (16, False, 0.05, True, 2),
    (24, True, 0.0, False, 2)])
def test_decode_kernels_interpret_match_dense(pallas_interpret, key, m, gated, threshold, narrow,
                                              split):
  """split > 1: the gate streamed by ``gate_split`` CTAs per tile (partial sums, kernel 1b)."""
  p, x = problem(key, m)
  wu = p.w_up if gated else None
  cfg = dataclasses.replace(SMALL, narrow_partials=narrow, gate_split=split)
  y, h, pg, flags = jax.jit(lambda *a: twell_decode.decode_ffn(
      *a, threshold=threshold, config=cfg))(x, p.w_gate, wu, p.w_down)
  y_ref, _ = dense32(p.x, p.w_gate, wu, p.w_down, threshold)
  assert y.shape == x.shape and y.dtype == jnp.bfloat16
  assert rel_err(y[:m], y_ref) < 1e-2
  assert not np.any(np.asarray(y[m:], np.float32))  # padded tokens give zeros
  # fired gate values and flags: exactly where the float32 gate fires
  g = (p.x.astype(jnp.float32) @ p.w_gate.astype(jnp.float32).T)
  g_bf = np.asarray(jnp.asarray(pg, jnp.float32))[:, :m].T
  fired = np.asarray(g > threshold)
  # The kernel's gate (wgmma, f32 accumulation in another order) may fall on the other side of
  # the threshold where the float32 gate is within 1e-3 of it; everywhere else they agree.
  sure = np.abs(np.asarray(g) - threshold) >= 1e-3
  np.testing.assert_array_equal((g_bf != 0)[sure], fired[sure])
  per_tile = lambda a: a.reshape(m, -1, twell_decode.NEURON_TILE).any(axis=(0, 2))  # noqa: E731
  tiles = per_tile(fired)
  assert 0 < tiles.sum() < tiles.size, "the draw should have both silent and live tiles"
  ran = np.asarray(flags) != 0
  assert np.all(ran[per_tile(fired & sure)]) and not np.any(ran[~per_tile(fired | ~sure)])
  # tiles that did not run hold zero hidden activations
  h_t = np.asarray(jnp.asarray(h, jnp.float32)).reshape(-1, twell_decode.NEURON_TILE, h.shape[1])
  assert not np.any(h_t[~ran])


@pytest.mark.parametrize("split", [1, 2])
def test_decode_kernels_nonfinite_rows_are_the_dense_rows(pallas_interpret, key, split):
  m = 4
  p, x = problem(key, m)
  x = x.at[1, 3].set(jnp.inf).at[2, 0].set(jnp.nan)
  cfg = dataclasses.replace(SMALL, gate_split=split)
  y, *_ = jax.jit(lambda *a: twell_decode.decode_ffn(*a, config=cfg))(
      x, p.w_gate, p.w_up, p.w_down)
  y_ref, _ = dense32(x[:m], p.w_gate, p.w_up, p.w_down)
  y, y_ref = np.asarray(y[:m], np.float32), np.asarray(y_ref)
  np.testing.assert_array_equal(np.isnan(y[1:3]), np.isnan(y_ref[1:3]))
  assert np.isnan(y_ref[1:3]).all()
  assert rel_err(y[[0, 3]], y_ref[[0, 3]]) < 1e-2


def test_decode_kernels_inf_in_a_silent_neurons_up_row_stays_out(pallas_interpret, key):
  m = 2
  p, x = problem(key, m)
  g = np.asarray(p.x.astype(jnp.float32) @ p.w_gate.astype(jnp.float32).T)
  silent = int(np.flatnonzero(~(g > 0).any(axis=0))[0])
  wu = p.w_up.at[silent, 0].set(jnp.inf)
  y, *_ = jax.jit(lambda *a: twell_decode.decode_ffn(*a, config=SMALL))(x, p.w_gate, wu, p.w_down)
  y_ref, _ = dense32(p.x, p.w_gate, p.w_up, p.w_down)
  assert np.isfinite(np.asarray(y, np.float32)).all() and rel_err(y[:m], y_ref) < 1e-2


@pytest.mark.parametrize("m,narrow,split", [(16, False, 1), (64, False, 1), (256, False, 1),
                                            (16, True, 1), (16, True, 4), (64, True, 2)])
def test_decode_kernels_cross_lower(key, m, narrow, split):
  p, x = problem(key, m, d=2048, n=1024)
  cfg = dataclasses.replace(twell_decode.default_config(m, 2048, 1024), narrow_partials=narrow,
                            gate_split=split)
  assert cfg.gate_smem_bytes(m) <= twell_decode.SMEM_BUDGET
  f = jax.jit(lambda *a: twell_decode.decode_ffn(*a, config=cfg))
  text = f.trace(x, p.w_gate, p.w_up, p.w_down).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == (2 if split == 1 else 3)


def test_decode_kernels_reject_bad_shapes(key):
  p, x = problem(key, 16)
  with pytest.raises(ValueError, match="multiple of 16"):
    twell_decode.decode_ffn(x[:5], p.w_gate, p.w_up, p.w_down)
  with pytest.raises(ValueError, match="w_up must be"):
    twell_decode.decode_ffn(x, p.w_gate, p.w_up[:, :128], p.w_down)
  with pytest.raises(NotImplementedError, match="bf16"):
    twell_decode.decode_ffn(x.astype(jnp.float32), p.w_gate, p.w_up, p.w_down)
  with pytest.raises(ValueError, match="gate_split=3"):  # d_model / tile_k = 4 steps
    twell_decode.decode_ffn(x, p.w_gate, p.w_up, p.w_down,
                            config=dataclasses.replace(SMALL, gate_split=3))
  with pytest.raises(ValueError, match="shared memory"):
    twell_decode.decode_ffn(x, p.w_gate, p.w_up, p.w_down,
                            config=dataclasses.replace(SMALL, tile_k=256, max_concurrent_steps=8))


@pytest.mark.parametrize("m,gated,split", [(3, True, None), (24, False, None), (5, True, 2)])
def test_op_decode_path_kernel_matches_dense_and_the_ops_stats(pallas_interpret, key, m, gated,
                                                               split):
  """The public op, Pallas backend, decode regime with decode_path="kernel": the decode kernels,
  the op's statistics, no conditional in the compiled call; ``decode_gate_split`` reaches the
  kernels (d_model 512: two tile_k steps to split)."""
  from sparse_jax import ops
  p, _ = problem(key, m, d=256 if split is None else 512)
  cfg = ops.SparseFFNConfig(decode_path="kernel", decode_gate_split=split)
  if gated:
    f = lambda impl: jax.jit(lambda x, g, u, d: ops.gated_sparse_ffn(
        x, g, u, d, implementation=impl, config=cfg))
    args = (p.x, p.w_gate, p.w_up, p.w_down)
  else:
    f = lambda impl: jax.jit(lambda x, u, d: ops.sparse_ffn(
        x, u, d, implementation=impl, config=cfg))
    args = (p.x, p.w_gate, p.w_down)
  y, stats = f("pallas")(*args)
  y_ref, l1_ref = dense32(p.x, p.w_gate, p.w_up if gated else None, p.w_down)
  assert rel_err(y, y_ref) < 1e-2
  _, ref = f("xla")(*args)
  assert float(stats.l0) == float(ref.l0) > 0
  np.testing.assert_array_equal(stats.active_per_neuron, ref.active_per_neuron)
  assert rel_err(stats.l1, l1_ref) < 1e-2
  assert int(stats.overflow_rows) == 0 and not bool(stats.dense_fallback)


def test_decode_gate_split_config_is_checked(pallas_interpret, key):
  from sparse_jax import ops
  with pytest.raises(ValueError, match="decode_gate_split"):
    ops.SparseFFNConfig(decode_gate_split=0)
  p, _ = problem(key, 2, d=256)  # d_model / tile_k = 1 step: nothing to split
  with pytest.raises(ValueError, match="gate_split=2"):
    ops.gated_sparse_ffn(p.x, p.w_gate, p.w_up, p.w_down, implementation="pallas",
                         config=ops.SparseFFNConfig(decode_path="kernel", decode_gate_split=2))


@pytest.mark.parametrize("path,kernels", [("kernel", 2), ("dense", 0)])
def test_decode_regime_compiles_to_no_conditional(key, path, kernels):
  """Generation calls the FFN once per layer and step: a conditional there stalls each call on a
  host round trip. Both decode paths lower (for the GPU, from the CPU) without one, and the
  kernel path to exactly the two decode kernels."""
  from sparse_jax import ops
  from sparse_jax.ops import pallas_backend
  p, _ = problem(key, 8, d=256, n=512)
  cfg = ops.SparseFFNConfig(decode_path=path)
  text = jax.jit(lambda *a: pallas_backend.gated_ffn(*a, cfg)).trace(
      p.x, p.w_gate, p.w_up, p.w_down).lower(lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.case" not in text and "stablehlo.if" not in text
  assert text.count("stablehlo.custom_call @mosaic_gpu") == kernels
