"""Layers of one shape share their Mosaic GPU kernels (``common.shared_lowering``): a program with
several layers holds each distinct kernel once, so XLA compiles it once (checked by cross-lowering
for a CUDA GPU on the CPU: the kernels' hashes in the lowered module)."""
import re

import jax
import jax.numpy as jnp
import pytest

from sparse_jax import ops
from sparse_jax.ops import pallas_backend
from sparse_jax.synthetic import make_ffn_problem

HASH = re.compile(r'kernel_hash = "((?:[^"\\]|\\.)*)"')


def kernel_hashes(f, *args) -> list[str]:
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return HASH.findall(text)


def layers(n_layers, op):
  """n_layers FFN layers of one shape, each with its own weights (as an unrolled model)."""
  def f(x, wg, wu, wd):
    for i in range(n_layers):
      y = op(x, wg * (1 + i / 8), wu, wd)
      x = x + y.astype(x.dtype)
    return x
  return f


@pytest.mark.parametrize("mode", ["decode", "inference", "training"])
def test_layers_of_one_shape_share_their_kernels(key, mode):
  m = 8 if mode == "decode" else 256
  p = make_ffn_problem(key, m, 256, 512, active_per_token=12.0)
  cfg = ops.SparseFFNConfig(decode_path="kernel" if mode == "decode" else "dense",
                            decode_max_tokens=16 if mode == "decode" else 0)
  op = lambda x, wg, wu, wd: pallas_backend.gated_ffn(x, wg, wu, wd, cfg)[0]

  def program(n_layers):
    fwd = layers(n_layers, op)
    if mode != "training":
      return fwd
    return lambda x, wg, wu, wd: jax.grad(
        lambda x, wd: jnp.sum(fwd(x, wg, wu, wd).astype(jnp.float32)), argnums=(0, 1))(x, wd)

  args = (p.x, p.w_gate, p.w_up, p.w_down)
  three, six = kernel_hashes(program(3), *args), kernel_hashes(program(6), *args)
  assert three, "no Mosaic GPU kernel in the lowered program"
  # (each lowering numbers its modules afresh, so hashes compare only within one program; under
  # jax.grad one kernel may sit in two wrapper functions, with the same hash: compiled once)
  assert len(set(six)) == len(set(three)), "more layers lowered more distinct kernels"
