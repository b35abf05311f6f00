"""The decode kernels compiled on a Hopper GPU (skipped elsewhere): exact against float32 at the
2b model's FFN shape for 1..256 tokens, silent tiles, non-finite rows, and the op's decode path
with its statistics."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from pallas_kernels import common, twell_decode
from sparse_jax import ops
from sparse_jax.ops import pallas_backend
from sparse_jax.ops.dense import ffn_with_l1
from sparse_jax.synthetic import make_ffn_problem

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not common.hopper_available(), reason="needs a Hopper GPU")]

D, N = 2048, 5632


def _problem(key, m, dist="skewed", active=28.0):
  p = make_ffn_problem(key, max(m, 256), D, N, active_per_token=active, distribution=dist)
  return dataclasses.replace(p, x=p.x[:m])


def _f32(x, wg, wu, wd, threshold=0.0):
  f = lambda a: None if a is None else a.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    return ffn_with_l1(f(x), f(wg), f(wu), f(wd), threshold)[0]


@pytest.mark.parametrize("m,gated,dist,narrow,split", [
    (1, True, "skewed", False, 1), (1, True, "skewed", True, 1), (8, True, "zipf", False, 1),
    (16, False, "uniform", True, 1), (64, True, "clustered", False, 1),
    (200, True, "heavy_tail", False, 1), (256, True, "skewed", False, 1),
    (1, True, "skewed", True, 4), (8, True, "zipf", True, 2), (16, False, "uniform", True, 4)])
def test_decode_kernels_match_float32(key, m, gated, dist, narrow, split):
  """split > 1: ``DecodeConfig.gate_split`` (the gate streamed by split CTAs per tile)."""
  p = _problem(key, m, dist)
  xp = jnp.pad(p.x, ((0, twell_decode.pad_tokens(m) - m), (0, 0)))
  wu = p.w_up if gated else None
  cfg = dataclasses.replace(twell_decode.default_config(xp.shape[0], D, N), narrow_partials=narrow,
                            gate_split=split)
  y, h, pg, flags = jax.jit(lambda *a: twell_decode.decode_ffn(*a, config=cfg))(
      xp, p.w_gate, wu, p.w_down)
  ref = _f32(p.x, p.w_gate, wu, p.w_down)
  assert rel_err(y[:m], ref) < 1e-2
  assert not np.any(np.asarray(y[m:], np.float32))
  g = np.asarray(p.x.astype(jnp.float32) @ p.w_gate.astype(jnp.float32).T)
  live = (g > 1e-2).reshape(m, -1, twell_decode.NEURON_TILE).any(axis=(0, 2))
  assert np.all(np.asarray(flags)[live] != 0)  # every tile with a clearly firing neuron ran


def test_decode_kernels_nonfinite_rows_on_gpu(key):
  p = _problem(key, 4)
  x = p.x.at[1, 7].set(jnp.inf).at[2, 0].set(jnp.nan)
  xp = jnp.pad(x, ((0, 12), (0, 0)))
  y = np.asarray(jax.jit(twell_decode.decode_ffn)(xp, p.w_gate, p.w_up, p.w_down)[0][:4],
                 np.float32)
  ref = np.asarray(_f32(x, p.w_gate, p.w_up, p.w_down))
  np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
  assert rel_err(y[[0, 3]], ref[[0, 3]]) < 1e-2


@pytest.mark.parametrize("m", [1, 8, 64])
def test_op_decode_path_kernel_on_gpu(key, m):
  p = _problem(key, m)
  cfg = ops.SparseFFNConfig(decode_path="kernel")
  y, stats = jax.jit(lambda *a: pallas_backend.gated_ffn(*a, cfg))(p.x, p.w_gate, p.w_up,
                                                                   p.w_down)
  assert rel_err(y, _f32(p.x, p.w_gate, p.w_up, p.w_down)) < 1e-2
  _, ref = jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="xla"))(
      p.x, p.w_gate, p.w_up, p.w_down)
  # The gate rounds differently in the kernel (wgmma, f32) and XLA: allow a neuron at ~0 to differ.
  assert abs(float(stats.l0) - float(ref.l0)) <= 0.02 * float(ref.l0) + 1
  assert int(stats.overflow_rows) == 0 and not bool(stats.dense_fallback)
