"""Sparse weight-gradient path on the CPU: entry lists (compaction + sort by neuron), the task
table (split hot neurons, partial rows), the kernel in GPU interpret mode against dense float32
products, and cross-lowering of the GPU path."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from pallas_kernels import common, twell_wgrad
from sparse_jax.formats import twell
from sparse_jax.synthetic import make_ffn_problem


def _problem(key, m=256, d=256, n=600, active=12.0, dist="skewed", capacity=8):
  k1, k2, k3 = jax.random.split(key, 3)
  p = make_ffn_problem(k1, m, d, n, active_per_token=active, distribution=dist)
  pre = jnp.dot(p.x, p.w_gate.T, preferred_element_type=jnp.float32)
  g = jnp.maximum(pre, 0).astype(jnp.bfloat16)
  n_pad = -(-n // 256) * 256
  g = jnp.pad(g, ((0, 0), (0, n_pad - n)))
  tw = twell.encode(g, capacity=capacity)
  vals = [jax.random.normal(k, tw.values_MxTxC.shape, jnp.float32) for k in jax.random.split(k2, 3)]
  keep = jax.random.uniform(k3, (m,)) > 0.2
  dy = jax.random.normal(k3, p.x.shape, jnp.bfloat16)
  return p, tw, vals, keep, dy


def _dense_reference(tw, vals, keep, bs):
  ok = keep & ~tw.row_overflow()
  out = []
  for v, b in zip(vals, bs):
    s = twell.densify(tw, v, keep_rows=ok).astype(jnp.float32)
    out.append(s.T @ b.astype(jnp.float32))
  return out


def test_entry_lists_are_sorted_complete_and_exact(key):
  p, tw, vals, keep, dy = _problem(key)
  counts = np.asarray(twell_wgrad.entry_counts(tw, keep))
  total = int(counts.sum())
  lists = twell_wgrad.entry_lists(tw, keep, capacity=total + 37)
  assert int(lists.n_entries) == total and not bool(lists.overflowed())
  seg = np.asarray(lists.seg_start)
  assert seg[0] == 0 and seg[-1] == total and np.all(np.diff(seg) >= 0)
  # Every (row, neuron, value) of the kept pattern appears exactly once, rows ascending per neuron.
  ok = np.asarray(keep & ~tw.row_overflow())
  valid = np.asarray(tw.valid_mask()) & ok[:, None, None]
  gi = np.asarray(tw.global_indices())
  rows_ref = np.broadcast_to(np.arange(tw.n_rows)[:, None, None], gi.shape)[valid]
  want = sorted(zip(gi[valid], rows_ref, np.asarray(vals[0])[valid]))
  rows, coefs = np.asarray(lists.rows), np.asarray(lists.gather(vals))
  got = [(j, rows[e], coefs[0, e]) for j in range(tw.n_cols) for e in range(seg[j], seg[j + 1])]
  assert got == want
  assert np.all(coefs[:, total:] == 0)
  np.testing.assert_array_equal(np.asarray(lists.active_per_neuron()),
                                np.bincount(gi[valid], minlength=tw.n_cols))


def test_entry_lists_report_overflow(key):
  _, tw, vals, keep, _ = _problem(key)
  total = int(np.asarray(twell_wgrad.entry_counts(tw, keep)).sum())
  lists = twell_wgrad.entry_lists(tw, keep, capacity=total - 1)
  assert bool(lists.overflowed()) and int(lists.n_entries) == total


@pytest.mark.parametrize("piece,partial_rows", [(512, 512), (4, 4096), (2, 8)])
def test_task_table_covers_every_entry_once(key, piece, partial_rows):
  _, tw, vals, keep, _ = _problem(key, active=30, dist="skewed", capacity=32)
  total = int(np.asarray(twell_wgrad.entry_counts(tw, keep)).sum())
  lists = twell_wgrad.entry_lists(tw, keep, capacity=total)
  tasks, pneuron = twell_wgrad.task_table(lists.seg_start, piece=piece, partial_rows=partial_rows)
  tasks, pneuron = np.asarray(tasks), np.asarray(pneuron)
  seg = np.asarray(lists.seg_start)
  n_pad = tw.n_cols
  covered = np.zeros(total, int)
  written = np.zeros(n_pad, int)
  for start, end, orow, prow, neuron in tasks:
    assert start <= end
    covered[start:end] += 1
    assert (orow >= 0) + (prow >= 0) <= 1
    if orow >= 0:
      written[orow] += 1
      assert start == seg[orow] and end == seg[orow + 1] and neuron == orow
    if prow >= 0:
      j = pneuron[prow]
      assert seg[j] <= start and end <= seg[j + 1] and neuron == j
    if orow < 0 and prow < 0:
      assert start == end
  assert np.all(covered == 1)
  split = set(pneuron[pneuron < n_pad].tolist())
  assert all(written[j] == (0 if j in split else 1) for j in range(n_pad))
  if piece == 4:  # room for every piece: each neuron with more than 4 entries is split
    counts = np.diff(seg)
    assert split == set(np.nonzero(counts > 4)[0].tolist()) and split


@pytest.mark.parametrize("piece,partial_rows", [(512, 512), (4, 4096)])
@pytest.mark.parametrize("n_x", [2, 1])
def test_weight_gradients_interpret_match_dense_products(pallas_interpret, key, piece,
                                                         partial_rows, n_x):
  p, tw, vals, keep, dy = _problem(key, active=20)
  total = int(np.asarray(twell_wgrad.entry_counts(tw, keep)).sum())
  slot_vals = vals[:n_x] + [vals[2]]
  lists = twell_wgrad.entry_lists(tw, keep, capacity=total + 64)
  wcfg = twell_wgrad.WgradConfig(piece=piece, partial_rows=partial_rows)
  outs = twell_wgrad.sparse_weight_gradients(lists, lists.gather(slot_vals), p.x, dy, n_x=n_x,
                                             out_dtype=jnp.float32, config=wcfg)
  ref = _dense_reference(tw, slot_vals, keep, [p.x] * n_x + [dy])
  assert len(outs) == n_x + 1
  for o, r in zip(outs, ref):
    assert o.shape == r.shape
    assert rel_err(o, r) < 1e-5, rel_err(o, r)


def test_weight_gradients_bf16_output(pallas_interpret, key):
  p, tw, vals, keep, dy = _problem(key, active=20)
  total = int(np.asarray(twell_wgrad.entry_counts(tw, keep)).sum())
  lists = twell_wgrad.entry_lists(tw, keep, capacity=total + 64)
  outs = twell_wgrad.sparse_weight_gradients(lists, lists.gather(vals), p.x, dy, n_x=2, out_dtype=jnp.bfloat16,
                                             config=twell_wgrad.WgradConfig(
                                                 piece=4, partial_rows=64))
  ref = _dense_reference(tw, vals, keep, [p.x, p.x, dy])
  for o, r in zip(outs, ref):
    assert o.dtype == jnp.bfloat16
    assert rel_err(o, r) < 8e-3


def test_weight_gradients_cross_lower(key):
  p, tw, vals, keep, dy = _problem(key, m=256, d=512, n=700)
  lists = twell_wgrad.entry_lists(tw, keep, capacity=8192)
  coefs = lists.gather(vals)
  f = jax.jit(lambda x, dy, lists, coefs: twell_wgrad.sparse_weight_gradients(
      lists, coefs, x, dy, n_x=2, out_dtype=jnp.bfloat16))
  assert "mosaic_gpu" in f.trace(p.x, dy, lists, coefs).lower(lowering_platforms=("cuda",)).as_text()


def test_cta_bounds_balance_skewed_work(key):
  _, tw, _, keep, _ = _problem(key, active=30, dist="skewed")
  lists = twell_wgrad.entry_lists(tw, keep, capacity=8192)
  tasks, _ = twell_wgrad.task_table(lists.seg_start, piece=16, partial_rows=256)
  n_ctas = 7
  b = np.asarray(twell_wgrad.cta_bounds(tasks, n_ctas))
  t = np.asarray(tasks)
  assert b[0] == 0 and b[-1] == len(t) and np.all(np.diff(b) >= 0)
  overhead = twell_wgrad.DEFAULT_CONFIG.task_overhead
  work = t[:, 1] - t[:, 0] + np.where((t[:, 2] >= 0) | (t[:, 3] >= 0), overhead, 0)
  per_cta = [work[b[c]:b[c + 1]].sum() for c in range(n_ctas)]
  assert max(per_cta) <= work.sum() / n_ctas + work.max()


def test_loop_free_glue_equals_the_searchsorted_definitions(key):
  """The entry lists' segment starts, the task table's neuron per task and the CTA bounds are
  computed without searchsorted loops (a scatter-add + cumsum, a scatter + running max, one fused
  comparison); each equals its searchsorted definition, on skewed activity with split neurons
  and neurons that never fire."""
  _, tw, _, keep, _ = _problem(key, active=30, dist="skewed")
  lists = twell_wgrad.entry_lists(tw, keep, capacity=8192)
  n = int(lists.n_entries)
  rows, slots = np.asarray(lists.rows)[:n], np.asarray(lists.slots)[:n]
  n_tiles, cap = tw.values_MxTxC.shape[1:]
  idx = np.asarray(tw.indices_MxTxC).reshape(-1)[slots]
  neuron = (slots // cap % n_tiles) * tw.tile + idx
  assert np.all(np.diff(neuron) >= 0)  # sorted by neuron
  seg = np.asarray(lists.seg_start)
  np.testing.assert_array_equal(seg, np.searchsorted(neuron, np.arange(tw.n_cols + 1), "left"))
  assert (np.diff(seg) == 0).any() and np.diff(seg).max() > 2  # dead and split neurons occur
  tasks, _ = twell_wgrad.task_table(lists.seg_start, piece=2, partial_rows=256)
  t = np.asarray(tasks)
  live = t[:, 2] + t[:, 3] > -2
  # each live task's entries belong to one neuron: the one whose segment holds its start
  owner = np.searchsorted(seg, t[live, 0], "right") - 1
  held = (t[live, 1] > t[live, 0])
  out = t[live, 2]
  np.testing.assert_array_equal(out[held & (out >= 0)], owner[held & (out >= 0)])
  assert (t[live, 3] >= 0).any()  # some neuron was split into pieces
  assert np.all(seg[owner[held]] <= t[live, 0][held])
  assert np.all(t[live, 1][held] <= seg[owner[held] + 1])
  overhead = twell_wgrad.DEFAULT_CONFIG.task_overhead
  work = t[:, 1] - t[:, 0] + np.where((t[:, 2] >= 0) | (t[:, 3] >= 0), overhead, 0)
  cum = np.cumsum(work).astype(np.float32)
  for n_ctas in (1, 7, 132):
    goal = np.arange(n_ctas + 1, dtype=np.float32) * np.float32(cum[-1] / np.float32(n_ctas))
    want = np.searchsorted(cum, goal, "left")
    want[0], want[-1] = 0, len(t)
    np.testing.assert_array_equal(np.asarray(twell_wgrad.cta_bounds(tasks, n_ctas, overhead)),
                                  want)


@pytest.mark.parametrize("slice_width", [256, 512])
def test_neuron_major_pass_interpret_matches_dense(pallas_interpret, key, slice_width):
  """dWd = T^T dOut over the kept entries and a = dOut_i . Wd[j] at every entry (the partial dot
  products of each d_model slice summed), on skewed activity with split neurons; 0 past the
  entries."""
  p, tw, vals, keep, dy = _problem(key, active=20, d=512)
  total = int(np.asarray(twell_wgrad.entry_counts(tw, keep)).sum())
  lists = twell_wgrad.entry_lists(tw, keep, capacity=total + 64)
  wd = jax.random.normal(key, (tw.n_cols, p.x.shape[1]), jnp.bfloat16)
  wcfg = twell_wgrad.WgradConfig(piece=4, partial_rows=4096, slice_width=slice_width)
  (t_coef,) = lists.gather([vals[0]])
  dwd, a = twell_wgrad.neuron_major_pass(lists, t_coef, dy, wd, out_dtype=jnp.float32,
                                         config=wcfg)
  (ref,) = _dense_reference(tw, [vals[0]], keep, [dy])
  assert rel_err(dwd, ref) < 1e-5, rel_err(dwd, ref)
  rows, slots = np.asarray(lists.rows)[:total], np.asarray(lists.slots)[:total]
  neuron = np.asarray(tw.global_indices()).reshape(-1)[slots]
  a_ref = np.einsum("ed,ed->e", np.asarray(dy, np.float32)[rows],
                    np.asarray(wd, np.float32)[neuron])
  np.testing.assert_allclose(np.asarray(a)[:total], a_ref, rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(a)[total:] == 0)
  assert (np.diff(np.asarray(lists.seg_start)) > 4).any()  # split neurons were exercised


@pytest.mark.parametrize("gated", [True, False])
def test_fused_neuron_major_pass_interpret_matches_entry_math(pallas_interpret, key, gated):
  """neuron_major_pass_fused: dWd = T^T dOut with T = bf16(P R) (non-gated: P) read at the
  slots, and each entry's dU, dR (twell_backward's math) by entry and at its slot."""
  p, tw, vals, keep, dy = _problem(key, active=20)
  total = int(np.asarray(twell_wgrad.entry_counts(tw, keep)).sum())
  lists = twell_wgrad.entry_lists(tw, keep, capacity=total + 64)
  wd = jax.random.normal(key, (tw.n_cols, p.x.shape[1]), jnp.bfloat16)
  r = vals[0] if gated else None
  coeff = jnp.float32(0.3)
  dwd, g, g_ke = twell_wgrad.neuron_major_pass_fused(
      lists, tw.values_MxTxC, r, coeff, dy, wd, out_dtype=jnp.float32,
      config=twell_wgrad.WgradConfig(piece=4, partial_rows=4096))
  pf = tw.values_MxTxC.astype(jnp.float32)
  t = common.round_bf16(pf * r) if gated else pf
  (ref,) = _dense_reference(tw, [t], keep, [dy])
  assert rel_err(dwd, ref) < 1e-5, rel_err(dwd, ref)
  rows, slots = np.asarray(lists.rows)[:total], np.asarray(lists.slots)[:total]
  neuron = np.asarray(tw.global_indices()).reshape(-1)[slots]
  a = np.einsum("ed,ed->e", np.asarray(dy, np.float32)[rows], np.asarray(wd, np.float32)[neuron])
  pe, te = np.asarray(pf).reshape(-1)[slots], np.asarray(t).reshape(-1)[slots]
  d_t = a + 0.3 * np.where(te >= 0, 1.0, -1.0)
  want = [np.where(pe > 0, d_t * (np.asarray(r).reshape(-1)[slots] if gated else 1.0), 0.0)]
  if gated:
    want.append(d_t * pe)
  assert g_ke.shape == (len(want), lists.capacity)
  assert g.shape == tw.values_MxTxC.shape + (len(want),)
  for k, w in enumerate(want):
    np.testing.assert_allclose(np.asarray(g_ke)[k, :total], w, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g)[..., k].reshape(-1)[slots], w, rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(g_ke)[:, total:] == 0)
  with pytest.raises(ValueError, match="task table of .* rows for .* neurons and 4096 partial"):
    twell_wgrad.neuron_major_pass_fused(  # a table built for another config's partial rows
        lists, tw.values_MxTxC, r, coeff, dy, wd, out_dtype=jnp.float32,
        config=twell_wgrad.FUSED_PASS_FINE_CONFIG, tasks=twell_wgrad.task_table(lists.seg_start))
  dy2, wd2 = jnp.concatenate([dy, dy], 1), jnp.concatenate([wd, wd], 1)  # d_model 512
  with pytest.raises(ValueError, match="whole d_model"):
    twell_wgrad.weight_grads_kernel(dy2, dy2, lists, None,
                                    twell_wgrad.task_table(lists.seg_start)[0], wd2,
                                    (tw.values_MxTxC, r, coeff), n_x=0, n_dy=1,
                                    out_dtype=jnp.float32,
                                    config=twell_wgrad.WgradConfig(slice_width=256))


def test_weight_gradients_without_dout_product(pallas_interpret, key):
  """n_dy=0 (the neuron-major backward's dWg / dWu pass): only the x products."""
  p, tw, vals, keep, dy = _problem(key, active=20)
  total = int(np.asarray(twell_wgrad.entry_counts(tw, keep)).sum())
  lists = twell_wgrad.entry_lists(tw, keep, capacity=total + 64)
  outs = twell_wgrad.sparse_weight_gradients(lists, lists.gather(vals[:2]), p.x, dy, n_x=2,
                                             n_dy=0, out_dtype=jnp.float32,
                                             config=twell_wgrad.WgradConfig(piece=4))
  ref = _dense_reference(tw, vals[:2], keep, [p.x, p.x])
  assert len(outs) == 2
  for o, r in zip(outs, ref):
    assert rel_err(o, r) < 1e-5, rel_err(o, r)


def test_neuron_major_pass_cross_lowers(key):
  p, tw, vals, keep, dy = _problem(key, m=256, d=512, n=700)
  lists = twell_wgrad.entry_lists(tw, keep, capacity=8192)
  (t_coef,) = lists.gather(vals[:1])
  wd = jnp.zeros((tw.n_cols, 512), jnp.bfloat16) + 0.5
  f = jax.jit(lambda dy, lists, t, wd: twell_wgrad.neuron_major_pass(
      lists, t, dy, wd, out_dtype=jnp.bfloat16))
  assert "mosaic_gpu" in f.trace(dy, lists, t_coef, wd).lower(
      lowering_platforms=("cuda",)).as_text()
  h = jax.jit(lambda dy, lists, v, r, wd: twell_wgrad.neuron_major_pass_fused(
      lists, v, r, jnp.float32(0.1), dy, wd, out_dtype=jnp.bfloat16))
  assert "mosaic_gpu" in h.trace(dy, lists, tw.values_MxTxC, vals[0], wd).lower(
      lowering_platforms=("cuda",)).as_text()
  g = jax.jit(lambda x, dy, lists, c: twell_wgrad.sparse_weight_gradients(
      lists, c, x, dy, n_x=2, n_dy=0, out_dtype=jnp.bfloat16))
  assert "mosaic_gpu" in g.trace(p.x, dy, lists, lists.gather(vals[:2])).lower(
      lowering_platforms=("cuda",)).as_text()


def test_entry_lists_sort_has_unsigned_keys(key):
  """The sort by neuron reaches XLA with unsigned 16-bit keys and 32-bit values: XLA's GPU
  SortRewriter gives a (key, value) sort to CUB's radix sort only for unsigned (or f32) keys, and
  16 bits are two radix passes (a signed key falls back to XLA's own, slower sort kernels)."""
  _, tw, _, keep, _ = _problem(key)
  text = jax.jit(lambda tw, keep: twell_wgrad.entry_lists(tw, keep, 4096)).trace(tw, keep).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.sort") == 1
  sig = "(tensor<4096xui16>, tensor<4096xui32>) -> (tensor<4096xui16>, tensor<4096xui32>)"
  assert sig in text
  # the comparator: a plain less-than on the key (the pattern the rewriter matches)
  assert re.search(r"stablehlo.compare\s+LT, %arg\d+, %arg\d+, UNSIGNED : \(tensor<ui16>", text)
