"""The TwELL kernels on a Hopper GPU (skipped elsewhere): the shared check suite through
implementation="pallas", and kernel-level checks at the paper's FFN shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from ffn_checks import PallasChecks

from pallas_kernels import common, twell_ffn, twell_gate
from sparse_jax import ops
from sparse_jax.formats import twell
from sparse_jax.synthetic import make_ffn_problem, tie_free_cotangent

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not common.hopper_available(), reason="needs a Hopper GPU")]


class TestPallasBackendGPU(PallasChecks):
  implementation = "pallas"
  M, D, N = 384, 256, 1024

  def call(self, x, wg, wu, wd, cfg, gated):
    if gated:
      return ops.gated_sparse_ffn(x, wg, wu, wd, implementation="pallas", config=cfg)
    return ops.sparse_ffn(x, wg, wd, implementation="pallas", config=cfg)


def _clear_rows(x, w):
  pre = jnp.dot(x, w.T, preferred_element_type=jnp.float32)
  return ~np.asarray(jnp.any(jnp.abs(pre) < 1e-4, axis=1))


@pytest.mark.parametrize("dist,capacity", [("uniform", 32), ("skewed", 32), ("skewed", 8)])
def test_gate_kernel_paper_shape(key, dist, capacity):
  p = make_ffn_problem(key, 2048, 2048, 5632, active_per_token=28, distribution=dist)
  x = p.x.at[3, 100].set(jnp.nan)
  tw = jax.jit(lambda x, w: twell_gate.gate_twell(x, w, capacity=capacity))(x, p.w_gate)
  ref = twell.encode(jnp.maximum(jnp.dot(x, p.w_gate.T, preferred_element_type=jnp.float32),
                                 0).astype(jnp.bfloat16), capacity=capacity)
  clear = _clear_rows(x, p.w_gate)
  clear[3] = True
  np.testing.assert_array_equal(tw.counts_MxT[clear], ref.counts_MxT[clear])
  assert int(tw.counts_MxT[3].min()) == 256
  ok = clear & ~np.asarray(tw.row_overflow())
  np.testing.assert_allclose(np.asarray(twell.decode(tw, on_overflow="nan")[ok], np.float32),
                             np.asarray(twell.decode(ref, on_overflow="nan")[ok], np.float32),
                             rtol=8e-3, atol=0)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dist,capacity", [("uniform", 32), ("skewed", 32), ("skewed", 8)])
def test_fused_kernel_paper_shape(key, gated, dist, capacity):
  """Every row exact; with capacity 8 many tiles overflow and are recomputed in the kernel."""
  p = make_ffn_problem(key, 2048, 2048, 5632, active_per_token=56, distribution=dist)
  x = p.x.at[11, 7].set(jnp.nan)  # a NaN token: every tile overflows, output row NaN like dense
  g = jnp.maximum(jnp.dot(x, p.w_gate.T, preferred_element_type=jnp.float32), 0).astype(jnp.bfloat16)
  g = jnp.where(jnp.isnan(jnp.dot(x, p.w_gate.T, preferred_element_type=jnp.float32)), jnp.nan, g)
  tw = twell.encode(g, capacity=capacity)
  y, l1 = jax.jit(lambda x, wg, wu, wd, tw: twell_ffn.fused_up_down(x, wg, wu, wd, tw))(
      x, p.w_gate, p.w_up if gated else None, p.w_down, tw)
  u = jnp.dot(x, p.w_up.T, preferred_element_type=jnp.float32)
  h = (g.astype(jnp.float32) * u).astype(jnp.bfloat16) if gated else g
  ref = jnp.dot(h.astype(jnp.float32), p.w_down.astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST)
  assert np.isnan(np.asarray(y[11], np.float32)).all()
  ok = np.ones(2048, bool)
  ok[11] = False
  assert rel_err(y[ok], ref[ok]) < 1e-2
  # A different dot-product order can flip the bf16 rounding of an h by an ulp (up to 2^-7
  # relative).
  np.testing.assert_allclose(l1[ok], jnp.sum(jnp.abs(h.astype(jnp.float32)), axis=1)[ok],
                             rtol=8e-3)


@pytest.mark.parametrize("dist", ["uniform", "skewed"])
def test_full_op_paper_shape_against_float32(key, dist):
  p = make_ffn_problem(key, 4096, 2048, 5632, active_per_token=28, distribution=dist)
  cfg = ops.SparseFFNConfig(max_active_fraction=None)
  y, st = jax.jit(lambda *a: ops.gated_sparse_ffn(*a, implementation="pallas", config=cfg))(
      p.x, p.w_gate, p.w_up, p.w_down)
  f32 = lambda a: a.astype(jnp.float32)
  h = jnp.maximum(f32(p.x) @ f32(p.w_gate).T, 0) * (f32(p.x) @ f32(p.w_up).T)
  ref = h @ f32(p.w_down)
  assert rel_err(y, ref) < 1e-2
  assert not bool(st.dense_fallback)


@pytest.mark.parametrize("dist,piece,out_dtype", [("uniform", 512, jnp.float32),
                                                  ("skewed", 512, jnp.bfloat16),
                                                  ("skewed", 16, jnp.float32)])
def test_weight_gradient_kernel_paper_shape(key, dist, piece, out_dtype):
  """The sparse weight-gradient kernel against dense float32 products S^T B (piece 16 splits
  every busy neuron into partial rows)."""
  from pallas_kernels import twell_wgrad
  k1, k2, k3 = jax.random.split(key, 3)
  p = make_ffn_problem(k1, 4096, 2048, 5632, active_per_token=28, distribution=dist)
  g = jnp.maximum(jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32), 0)
  tw = twell.encode(g.astype(jnp.bfloat16), capacity=32)  # 5632 = 22 tiles of 256
  vals = [jax.random.normal(k, tw.values_MxTxC.shape, jnp.float32) for k in jax.random.split(k2, 3)]
  dy = jax.random.normal(k3, p.x.shape, jnp.bfloat16)
  keep = jnp.ones((4096,), bool).at[7].set(False)

  @jax.jit
  def run(tw, vals, x, dy):
    lists = twell_wgrad.entry_lists(tw, keep, 262144)
    return twell_wgrad.sparse_weight_gradients(lists, lists.gather(vals), x, dy, n_x=2,
                                               out_dtype=out_dtype,
                                               config=twell_wgrad.WgradConfig(piece=piece)), lists

  outs, lists = run(tw, vals, p.x, dy)
  assert not bool(lists.overflowed())
  ok = keep & ~tw.row_overflow()
  for o, v, b in zip(outs, vals, [p.x, p.x, dy]):
    with jax.default_matmul_precision("highest"):  # not TF32
      ref = twell.densify(tw, v, keep_rows=ok).astype(jnp.float32).T @ b.astype(jnp.float32)
    assert rel_err(o, ref) < (1e-5 if out_dtype == jnp.float32 else 8e-3)


@pytest.mark.parametrize("dist,slice_width", [("uniform", 512), ("skewed", 2048)])
def test_neuron_major_pass_paper_shape(key, dist, slice_width):
  """dWd = T^T dOut and a = dOut_i . Wd[j] per entry from the pass by neuron (d_model slices of
  512, or whole rows) against float32 products; hot neurons split into pieces (piece 16)."""
  from pallas_kernels import twell_wgrad
  k1, k2, k3 = jax.random.split(key, 3)
  p = make_ffn_problem(k1, 4096, 2048, 5632, active_per_token=28, distribution=dist)
  g = jnp.maximum(jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32), 0)
  tw = twell.encode(g.astype(jnp.bfloat16), capacity=32)
  t = jax.random.normal(k2, tw.values_MxTxC.shape, jnp.float32)
  dy = jax.random.normal(k3, p.x.shape, jnp.bfloat16)
  keep = jnp.ones((4096,), bool).at[7].set(False)
  wcfg = twell_wgrad.WgradConfig(piece=16, slice_width=slice_width)

  @jax.jit
  def run(tw, t, dy, wd):
    lists = twell_wgrad.entry_lists(tw, keep, 262144)
    (tc,) = lists.gather([t])
    return twell_wgrad.neuron_major_pass(lists, tc, dy, wd, out_dtype=jnp.float32,
                                         config=wcfg), lists

  (dwd, a), lists = run(tw, t, dy, p.w_down)
  assert not bool(lists.overflowed())
  ok = keep & ~tw.row_overflow()
  with jax.default_matmul_precision("highest"):
    ref = twell.densify(tw, t, keep_rows=ok).astype(jnp.float32).T @ dy.astype(jnp.float32)
    n = int(lists.n_entries)
    rows, slots = lists.rows[:n], lists.slots[:n]
    neuron = tw.global_indices().reshape(-1)[slots]
    a_ref = jnp.sum(dy[rows].astype(jnp.float32) * p.w_down[neuron].astype(jnp.float32), axis=1)
  assert rel_err(dwd[:5632], ref[:5632]) < 1e-5
  assert rel_err(a[:n], a_ref) < 1e-5


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("shape,fine", [((2048, 5632), False), ((1024, 8192), False),
                                        ((4096, 14336), False), ((2048, 5632), True)])
def test_fused_neuron_major_pass_paper_shape(key, gated, shape, fine):
  """neuron_major_pass_fused (whole rows, the per-entry math in the kernel) equals the sliced
  pass plus the XLA math (pallas_backend's neuron_major glue): dWd, and dU / dR by entry and at
  the slots. The paper's shape and two wider or narrower d_model (train_backward="auto" runs the
  fused pass up to ``FUSED_BACKWARD_MAX_D_MODEL``; 4096 checks it before that limit moves);
  ``fine``: the fused pass with its own task table of ``FUSED_PASS_FINE_CONFIG`` (128-entry
  pieces: the skewed problem's hot neurons are split into partial rows)."""
  from pallas_kernels import twell_wgrad
  from sparse_jax.ops import pallas_backend
  k1, k2, k3 = jax.random.split(key, 3)
  d_model, d_ff = shape
  p = make_ffn_problem(k1, 4096, d_model, d_ff, active_per_token=28, distribution="skewed")
  g = jnp.maximum(jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32), 0)
  tw = twell.encode(g.astype(jnp.bfloat16), capacity=32)
  r = jax.random.normal(k2, tw.values_MxTxC.shape, jnp.float32) if gated else None
  dy = jax.random.normal(k3, p.x.shape, jnp.bfloat16)
  keep = jnp.ones((4096,), bool).at[7].set(False)
  coeff = jnp.float32(0.02)

  @jax.jit
  def run(tw, r, dy, wd):
    lists = twell_wgrad.entry_lists(tw, keep, 262144)
    wcfg = twell_wgrad.DEFAULT_CONFIG
    tasks = twell_wgrad.task_table(lists.seg_start, piece=wcfg.piece,
                                   partial_rows=wcfg.partial_rows)
    fused = twell_wgrad.neuron_major_pass_fused(
        lists, tw.values_MxTxC, r, coeff, dy, wd, out_dtype=jnp.float32,
        **(dict(config=twell_wgrad.FUSED_PASS_FINE_CONFIG) if fine else dict(tasks=tasks)))
    glue = pallas_backend._neuron_major_glue(lists, tw, r, coeff, dy, wd, jnp.float32, tasks)
    return fused, glue, lists

  (dwd, g_f, ge_f), (g_s, ge_s, dwd_s), lists = run(tw, r, dy, p.w_down)
  n = int(lists.n_entries)
  if fine:  # split neurons exercised
    assert int(jnp.max(jnp.diff(lists.seg_start))) > twell_wgrad.FUSED_PASS_FINE_CONFIG.piece
  assert rel_err(dwd, dwd_s) < 1e-5
  assert rel_err(ge_f[:, :n], ge_s[:, :n]) < 1e-5
  slots = lists.slots[:n]
  k = g_f.shape[-1]
  assert rel_err(g_f.reshape(-1, k)[slots], g_s.reshape(-1, k)[slots]) < 1e-5


@pytest.mark.parametrize("gated", [True, False])
def test_dx_kernel_paper_shape(key, gated):
  """dx_i = sum_j dR_ij Wu[j] + dU_ij Wg[j] over the TwELL entries, slot values random, against
  float32 products; rows with an overflowed tile stay 0."""
  from pallas_kernels import twell_backward
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 4096, 2048, 5632, active_per_token=28, distribution="skewed")
  g = jnp.maximum(jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32), 0)
  tw = twell.encode(g.astype(jnp.bfloat16), capacity=32)
  slots = jax.random.normal(k2, tw.values_MxTxC.shape + (2 if gated else 1,), jnp.float32)
  wu = p.w_up if gated else None
  dx = jax.jit(lambda *a: twell_backward.dx_kernel(*a, out_dtype=jnp.float32))(
      p.w_gate, wu, tw, slots)
  ok = ~tw.row_overflow()
  with jax.default_matmul_precision("highest"):
    dense = lambda v: twell.densify(tw, v, keep_rows=ok).astype(jnp.float32)
    ref = dense(slots[..., 0]) @ p.w_gate.astype(jnp.float32)
    if gated:
      ref = ref + dense(slots[..., 1]) @ p.w_up.astype(jnp.float32)
  assert rel_err(dx[ok], ref[ok]) < 1e-5
  assert float(jnp.abs(dx[~ok]).max(initial=0.0)) == 0.0


@pytest.mark.parametrize("dist", ["heavy_tail", "uniform"])
def test_balanced_token_ranges_change_no_bit(key, dist):
  """Work-balanced CTA token ranges (FusedConfig / BackwardConfig.balanced) only change which
  warp runs a token: the fused forward (y, L1 per row, R at the slots), the token-major backward
  kernel (dx, dU, dR) and dx_kernel give bit-identical results, every token done exactly once
  (heavy-tailed activity with overflowed rows: the forward recomputes them, the backward skips)."""
  from pallas_kernels import twell_backward
  k1, k2, k3 = jax.random.split(key, 3)
  p = make_ffn_problem(k1, 4096, 2048, 5632, active_per_token=28, distribution=dist)
  dy = jax.random.normal(k2, p.x.shape, jnp.bfloat16)
  tw = jax.jit(lambda x, w: twell_gate.gate_twell(x, w, capacity=32))(p.x, p.w_gate)
  ok = np.asarray(~tw.row_overflow())
  fwd = jax.jit(lambda cfg, *a: twell_ffn.fused_up_down(*a, return_r=True, config=cfg),
                static_argnums=0)
  plain = fwd(twell_ffn.FusedConfig(), p.x, p.w_gate, p.w_up, p.w_down, tw)
  bal = fwd(twell_ffn.FusedConfig(balanced=True), p.x, p.w_gate, p.w_up, p.w_down, tw)
  valid = np.asarray(tw.valid_mask()) & ok[:, None, None]
  np.testing.assert_array_equal(np.asarray(bal[0]), np.asarray(plain[0]))
  np.testing.assert_array_equal(np.asarray(bal[1]), np.asarray(plain[1]))
  np.testing.assert_array_equal(np.asarray(bal[2])[valid], np.asarray(plain[2])[valid])
  r = plain[2]
  bwd = jax.jit(lambda cfg, *a: twell_backward.backward_kernel(*a, jnp.float32(0.01), config=cfg),
                static_argnums=0)
  args = (p.x, dy, p.w_gate, p.w_up, p.w_down, tw, r)
  (dx0, du0, dr0), (dx1, du1, dr1) = (bwd(twell_backward.BackwardConfig(balanced=b), *args)
                                      for b in (False, True))
  np.testing.assert_array_equal(np.asarray(dx1), np.asarray(dx0))
  for a0, a1 in ((du0, du1), (dr0, dr1)):
    np.testing.assert_array_equal(np.asarray(a1)[valid], np.asarray(a0)[valid])
  slots = jax.random.normal(k3, tw.values_MxTxC.shape + (2,), jnp.float32)
  dxk = jax.jit(lambda cfg, *a: twell_backward.dx_kernel(*a, out_dtype=jnp.float32, config=cfg),
                static_argnums=0)
  np.testing.assert_array_equal(
      np.asarray(dxk(twell_backward.BackwardConfig(balanced=True), p.w_gate, p.w_up, tw, slots)),
      np.asarray(dxk(twell_backward.BackwardConfig(), p.w_gate, p.w_up, tw, slots)))


def _tie_free_cotangent(key, p):
  """A random cotangent, zero on rows with a gate pre-activation at a ReLU tie (within the tensor
  cores' accumulation noise): there either side of the ReLU is right (synthetic.GATE_TIE_TOL)."""
  cot, tied = tie_free_cotangent(jax.random.normal(key, p.x.shape, jnp.float32), p.x, p.w_gate)
  assert tied < p.x.shape[0] // 4, tied  # ~3-10% of rows at these sizes
  return cot


@pytest.mark.parametrize("entries_per_step", [1, 2])
def test_backward_kernel_entries_per_step_agree_at_paper_shape(key, entries_per_step):
  """The backward kernel with 1 or 2 entries' Wd rows in flight per step equals the default (4):
  dX, dU and dR from the same TwELL pattern and residuals (within f32 summation order; dX is
  rounded to bf16)."""
  from pallas_kernels import twell_backward
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 4096, 2048, 5632, active_per_token=28, distribution="skewed")
  dy = jax.random.normal(k2, p.x.shape, jnp.bfloat16)
  pre = jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32)
  tw = twell.encode(jnp.maximum(pre, 0).astype(jnp.bfloat16), capacity=32)
  u = jnp.dot(p.x, p.w_up.T, preferred_element_type=jnp.float32)
  r = jnp.take_along_axis(u, tw.global_indices().reshape(4096, -1), axis=1).reshape(
      tw.values_MxTxC.shape)
  run = lambda n: jax.jit(lambda *a: twell_backward.backward_kernel(
      *a, config=twell_backward.BackwardConfig(entries_per_step=n)))(
          p.x, dy, p.w_gate, p.w_up, p.w_down, tw, r, jnp.float32(1e-3))
  want, got = run(twell_backward.DEFAULT_CONFIG.entries_per_step), run(entries_per_step)
  ok = ~tw.row_overflow()  # rows with an overflowed tile belong to the dense row path
  valid = tw.valid_mask() & ok[:, None, None]  # slots past a tile's count are never written
  assert rel_err(got[0][ok], want[0][ok]) < 2e-3  # dx: rounded to bf16
  for name, a, b in zip(("du", "dr"), got[1:], want[1:]):
    assert rel_err(a[valid], b[valid]) < 1e-5, (name, rel_err(a[valid], b[valid]))


@pytest.mark.parametrize("dist,order", [("uniform", "token_major"), ("skewed", "token_major"),
                                        ("uniform", "neuron_major"), ("skewed", "neuron_major"),
                                        ("uniform", "neuron_major_fused"),
                                        ("skewed", "neuron_major_fused")])
def test_training_gradients_paper_shape_against_float32(key, dist, order):
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 4096, 2048, 5632, active_per_token=28, distribution=dist)
  cot = _tie_free_cotangent(k2, p)
  cfg = ops.SparseFFNConfig(max_active_fraction=None, train_backward=order)

  def loss(x, wg, wu, wd):
    y, st = ops.gated_sparse_ffn(x, wg, wu, wd, implementation="pallas", config=cfg)
    return jnp.sum(y.astype(jnp.float32) * cot) + 0.5 * st.l1, st

  def loss_ref(x, wg, wu, wd):
    from sparse_jax.ops.dense import ffn_with_l1
    y, l1 = ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y * cot) + 0.5 * l1

  args = (p.x, p.w_gate, p.w_up, p.w_down)
  grads, st = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
  with jax.default_matmul_precision("highest"):  # a float32 reference, not TF32
    ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2, 3)))(*(a.astype(jnp.float32) for a in args))
  assert not bool(st.dense_fallback)
  for name, g, r in zip(["dx", "dw_gate", "dw_up", "dw_down"], grads, ref):
    assert rel_err(g, r) < 1e-2, (name, rel_err(g, r))


@pytest.mark.parametrize("mode,entry_capacity", [("sparse", None), ("sparse", 4096),
                                                 ("dense", None)])
def test_static_modes_paper_shape_against_float32(key, mode, entry_capacity):
  """SparseFFNConfig.mode on the GPU: "sparse" (kernels outside conditionals; with 4096 entries
  of ~115k the lists overflow and the XLA-only correction must make it exact) and "dense" (the
  plain XLA FFN under jax.grad), against jax.grad of the float32 dense FFN."""
  from sparse_jax.ops.dense import ffn_with_l1
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 4096, 2048, 5632, active_per_token=28, distribution="skewed")
  cot = _tie_free_cotangent(k2, p)
  cfg = ops.SparseFFNConfig(mode=mode, entry_capacity=entry_capacity)

  def loss(x, wg, wu, wd):
    y, st = ops.gated_sparse_ffn(x, wg, wu, wd, implementation="pallas", config=cfg)
    return jnp.sum(y.astype(jnp.float32) * cot) + 0.5 * st.l1, st

  def loss_ref(x, wg, wu, wd):
    y, l1 = ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y * cot) + 0.5 * l1

  args = (p.x, p.w_gate, p.w_up, p.w_down)
  grads, st = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2, 3)))(*(a.astype(jnp.float32) for a in args))
  assert bool(st.dense_fallback) == (mode == "dense" or entry_capacity is not None)
  for name, g, r in zip(["dx", "dw_gate", "dw_up", "dw_down"], grads, ref):
    assert rel_err(g, r) < 1e-2, (name, rel_err(g, r))


@pytest.mark.parametrize("dist,capacity", [("dense_starts", 32), ("skewed", 8)])
def test_deferred_overflow_paper_shape_matches_cond(key, dist, capacity):
  """overflow_fallback="defer" on the GPU (no conditional in the call): rows with an overflowed
  tile (sequence starts; capacity 8 overflows many) are corrected on the fixed-size row path, and
  the gradients match the "cond" path's and float32; a call over the row budget flags itself."""
  from sparse_jax.ops.dense import ffn_with_l1
  k1, k2 = jax.random.split(key)
  p = make_ffn_problem(k1, 4096, 2048, 5632, active_per_token=11, distribution=dist)
  cot = _tie_free_cotangent(k2, p)
  args = (p.x, p.w_gate, p.w_up, p.w_down)

  def run(fallback):
    cfg = ops.SparseFFNConfig(mode="sparse", overflow_fallback=fallback, twell_capacity=capacity)

    def loss(x, wg, wu, wd):
      y, st = ops.gated_sparse_ffn(x, wg, wu, wd, implementation="pallas", config=cfg)
      return jnp.sum(y.astype(jnp.float32) * cot) + 0.5 * st.l1, st
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)

  def loss_ref(x, wg, wu, wd):
    y, l1 = ffn_with_l1(x, wg, wu, wd)
    return jnp.sum(y * cot) + 0.5 * l1

  (v_def, st_def), g_def = run("defer")
  (v_cond, st_cond), g_cond = run("cond")
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2, 3)))(*(a.astype(jnp.float32) for a in args))
  assert int(st_def.overflow_rows) == int(st_cond.overflow_rows) > 0
  assert bool(st_def.dense_fallback) == bool(st_cond.dense_fallback)
  np.testing.assert_allclose(float(v_def), float(v_cond), rtol=1e-6)
  if not bool(st_def.dense_fallback):
    for name, a, b, r in zip(["dx", "dw_gate", "dw_up", "dw_down"], g_def, g_cond, ref):
      assert rel_err(a, b) < 1e-3, (name, rel_err(a, b))
      assert rel_err(a, r) < 1e-2, (name, rel_err(a, r))
