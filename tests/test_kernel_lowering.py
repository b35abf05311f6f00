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


@pytest.mark.parametrize("d_model,d_ff", [(1024, 8192), (4096, 11008), (4096, 14336)])
def test_other_model_families_lower_for_cuda(d_model, d_ff, monkeypatch):
  """The FFN shapes of other model families (issue 14: Llama-2-7B 4096/11008, Mistral-7B
  4096/14336, a 1024/8192 FFN; 11008 is not a multiple of the 256-column tile) lower through the
  Mosaic GPU kernels, inference and training, without a GPU. Through the public op in mode
  "auto", widths above ``PAYING_MAX_D_MODEL`` (where the fused kernel spills) hold no kernel and
  no conditional: the plain dense FFN."""
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
          for s in [(512, d_model), (d_ff, d_model), (d_ff, d_model), (d_ff, d_model)]]
  forced = ops.SparseFFNConfig(max_active_fraction=None)
  op = lambda *a: pallas_backend.gated_ffn(*a, forced)
  kernels = lambda f: len(kernel_hashes(f, *args))  # noqa: E731
  assert kernels(lambda *a: op(*a)[0]) >= 2  # gate + fused up/down
  loss = lambda *a: jnp.sum(op(*a)[0].astype(jnp.float32)) + op(*a)[1].l1
  assert kernels(jax.grad(loss, argnums=(0, 1, 2, 3))) >= 4  # + backward, weight gradients
  from pallas_kernels import common
  monkeypatch.setattr(common, "hopper_available", lambda: True)  # as on the GPU
  public = lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas")
  loss = lambda *a: jnp.sum(public(*a)[0].astype(jnp.float32)) + public(*a)[1].l1
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  runs_dense = d_model > pallas_backend.PAYING_MAX_D_MODEL
  assert ("mosaic_gpu" not in text) == runs_dense
  assert ("stablehlo.case" not in text and "stablehlo.if" not in text) or not runs_dense
