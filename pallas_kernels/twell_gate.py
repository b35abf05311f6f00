"""Gate matmul with TwELL packing in its epilogue (Mosaic GPU, Hopper).

``relu(x @ w_gate.T)`` on wgmma, fed by a TMA, warp-specialised pipeline (one memory warpgroup,
two consumer warpgroups, each owning a 64 x ``tile_n`` accumulator: a CTA tile is 128 tokens x
one TwELL column tile of ``GateConfig.tile_n`` neurons), persistent over the output tiles in a
planar-snake order, after jax's ``hopper_matmul_mgpu``. The epilogue applies the ReLU to the f32 accumulator and compacts every row
of the tile into TwELL (count + up to ``capacity`` (local column, value) entries) straight from the
registers: the dense hidden matrix never reaches HBM.

Compaction (per row of the 64 x tile_n accumulator, whose row is spread over the 4 lanes of a quad):
a per-thread count, an exclusive scan over the quad with ``shfl.idx``, then predicated stores of
the entries into a shared-memory staging tile that one TMA store per tile writes out; the exact
count goes straight to GMEM. This needs per-lane code, written with ``plgpu.inline_mgpu``
(``compaction="mgpu"``). GPU interpret mode (``common.pallas_interpret()``) cannot run
``inline_mgpu``, so interpret runs use ``compaction="jnp"``: the same per-tile result computed with array ops (cumsum + scatter) that only
the interpreter accepts. Everything else (pipeline, TMA, wgmma, staging, stores) is shared.

Output: ``sparse_jax.formats.TwELL`` (values bf16 [M, N/tile_n, C], tile-local int16 indices,
counts int32 [M, N/tile_n]); entries inside a tile row come out lane-interleaved (any order is
valid).
Active means ``not (h <= 0)``, so a NaN pre-activation is kept active, never dropped.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import common
from pallas_kernels.common import TWELL_TILE
from sparse_jax.formats.twell import TwELL


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """Tile sizes and pipeline depth of the gate kernel.

  tile_n: the TwELL tile width (neurons per column tile; one consumer warpgroup owns 64 rows x
    one tile). A multiple of 64 up to 256 (a wgmma's widest N); 256 is the tuned value.
  tile_k: d_model slice per pipeline stage; max_concurrent_steps: stages in flight.
  Defaults from experiments/tune_twell.py on an H200 (NOTES_twell.md): tile_k 128 with two
  stages was fastest (0.4956 ms at M=16384, d_model 2048, d_ff 5632); 2-CTA clusters with the
  weight tile multicast did not help (0.497-0.511 ms)."""
  tile_n: int = TWELL_TILE
  tile_k: int = 128
  max_concurrent_steps: int = 2
  grid_minor_dim: int = 1          # planar-snake order: 0 = M minor, 1 = N minor
  grid_tile_width: int = 8
  cluster_m: bool = False          # 2-CTA clusters along M: the weight tile is TMA-multicast
  compaction: Literal["mgpu", "jnp", "auto"] = "auto"

  def smem_bytes(self, capacity: int) -> int:
    stage = (128 * self.tile_k + self.tile_n * self.tile_k) * 2
    return self.max_concurrent_steps * stage + 2 * 64 * capacity * 4


def default_config(capacity: int, d_model: int | None = None,
                   tile_n: int = TWELL_TILE) -> GateConfig:
  cfg = GateConfig(tile_n=tile_n)
  if d_model is not None and d_model % cfg.tile_k:
    cfg = dataclasses.replace(cfg, tile_k=64, max_concurrent_steps=4)
  while cfg.smem_bytes(capacity) > 220 * 1024 and cfg.max_concurrent_steps > 2:
    cfg = dataclasses.replace(cfg, max_concurrent_steps=cfg.max_concurrent_steps - 1)
  if cfg.smem_bytes(capacity) > 220 * 1024:
    cfg = dataclasses.replace(cfg, tile_k=64, max_concurrent_steps=2)
  return cfg


# --------------------------------------------------------------------------- epilogues


def _compact_jnp(acc, cnt_ref, idx_smem, val_smem, capacity):
  """Interpret-mode compaction (array ops only the interpreter accepts); column-sorted order."""
  act = jnp.logical_not(acc <= 0.0)
  pos = jnp.cumsum(act.astype(jnp.int32), axis=1) - 1
  slot = jnp.where(act & (pos < capacity), pos, capacity)
  rows = lax.broadcasted_iota(jnp.int32, acc.shape, 0)
  cols = lax.broadcasted_iota(jnp.int32, acc.shape, 1)
  vals = jnp.where(act, acc, 0.0).astype(val_smem.dtype)
  val_smem[...] = jnp.zeros(val_smem.shape, val_smem.dtype).at[rows, slot].set(vals, mode="drop")
  idx_smem[...] = jnp.zeros(idx_smem.shape, idx_smem.dtype).at[rows, slot].set(
      cols.astype(idx_smem.dtype), mode="drop")
  cnt_ref[...] = jnp.sum(act.astype(jnp.int32), axis=1)


def _compact_mgpu(acc, cnt_ref, idx_smem, val_smem, capacity):
  """Per-row compaction from the WGMMA register layout (checked on an H200, see
  ../shared/MOSAIC_GPU_NOTES.md section 3). Entries past ``capacity`` are not stored; the count is
  exact."""
  import jax.experimental.mosaic.gpu as mgpu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, memref, nvvm, vector

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(), plgpu.RefType(),
                                plgpu.RefType()))
  def _(ctx, h, cnt_ref, idx_ref, val_ref):
    del ctx
    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    c = lambda v: mgpu.c(v, i32)
    vty, ity = (ir.MemRefType(r.type).element_type for r in (val_ref, idx_ref))
    lane = arith.remui(mgpu.thread_idx(), c(32))
    q = arith.andi(lane, c(3))
    qb = arith.subi(lane, q)
    zero = mgpu.c(0.0, ir.F32Type.get())
    groups = {}
    for (row, col), ri in zip(h.layout.thread_idxs(h.shape), np.ndindex(h.registers.shape)):
      groups.setdefault(ri[:1] + ri[2:], []).append((h.registers[ri], row, col))
    for items in groups.values():
      row, elems, cnt = items[0][1], [], c(0)
      for reg, _, col in items:
        for e in range(2):
          x = vector.extract(reg, dynamic_position=[],
                             static_position=ir.DenseI64ArrayAttr.get([e]))
          p = arith.cmpf(arith.CmpFPredicate.UGT, x, zero)  # unordered: NaN stays active
          elems.append((x, p, arith.addi(col, mgpu.c(e, index))))
          cnt = arith.addi(cnt, arith.extui(i32, p))
      excl, total = c(0), c(0)
      for k in range(4):
        ck = nvvm.shfl_sync(c(0xFFFFFFFF), cnt, arith.addi(qb, c(k)), c(0x1F), nvvm.ShflKind.idx)
        total = arith.addi(total, ck)
        excl = arith.addi(excl, arith.select(arith.cmpi(arith.CmpIPredicate.ult, c(k), q), ck, c(0)))
      pos = excl
      for x, p, col in elems:
        with mgpu.when(arith.andi(p, arith.cmpi(arith.CmpIPredicate.ult, pos, c(capacity)))):
          s = arith.index_cast(index, pos)
          memref.store(arith.index_cast(ity, col), idx_ref, [row, s])
          memref.store(arith.truncf(vty, x), val_ref, [row, s])
        pos = arith.addi(pos, arith.extui(i32, p))
      with mgpu.when(arith.cmpi(arith.CmpIPredicate.eq, q, c(0))):
        memref.store(total, cnt_ref, [row])

  _(acc, cnt_ref, idx_smem, val_smem)


# --------------------------------------------------------------------------- kernel


def _kernel(x_gmem, w_gmem, cnt_gmem, idx_gmem, val_gmem, *, capacity, config: GateConfig,
            compaction):
  m, k = x_gmem.shape
  n = w_gmem.shape[0]
  tile_k = config.tile_k
  swizzle = plgpu.find_swizzle(tile_k * 16)
  transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))
  cluster = 2 if config.cluster_m else 1
  tile_n = config.tile_n
  m_iters, n_iters, k_iters = m // (128 * cluster), n // tile_n, k // tile_k
  compact = _compact_mgpu if compaction == "mgpu" else _compact_jnp

  def get_pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_iters,), memory_registers=40,
        in_specs=[plgpu.BlockSpec((128, tile_k), lambda kk: (0, kk), transforms=transforms),
                  plgpu.BlockSpec((tile_n, tile_k), lambda kk: (0, kk), transforms=transforms,
                                  collective_axes=("cluster",) if config.cluster_m else ())],
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=config.max_concurrent_steps,
        compute_context=compute_context)

  ignore = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped,
      pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
      idx_smem=plgpu.SMEM((2, 64, capacity), idx_gmem.dtype),
      val_smem=plgpu.SMEM((2, 64, capacity), val_gmem.dtype),
      collective_axes="wg")
  def _scope(pipeline_allocs, idx_smem, val_smem):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _tile_loop(loop_info: plgpu.NDLoopInfo):
      (lin,) = loop_info.index
      m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), config.grid_minor_dim,
                                        config.grid_tile_width)
      if config.cluster_m:
        m_idx = m_idx * 2 + lax.axis_index("cluster")
      rows = pl.ds(m_idx * 128 + wg * 64, 64)

      def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((64, tile_n), jnp.float32))
        def _acc_scope(acc_ref):
          eval_pipeline(acc_ref)
          acc = acc_ref[...]
          # The staging tiles of this warpgroup may still be read by the previous TMA store.
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          compact(acc, cnt_gmem.at[rows, n_idx], idx_smem.at[wg], val_smem.at[wg], capacity)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(idx_smem.at[wg], idx_gmem.at[rows, n_idx])
          plgpu.copy_smem_to_gmem(val_smem.at[wg], val_gmem.at[rows, n_idx])

      def mma_body(_, a_smem, b_smem, acc_ref):
        plgpu.wgmma(acc_ref, a_smem.at[pl.ds(wg * 64, 64)], b_smem.transpose((1, 0)))
        plgpu.wgmma_wait(0)
        return acc_ref

      get_pipeline(mma_body, compute_context)(
          x_gmem.at[pl.ds(m_idx * 128, 128), :], w_gmem.at[pl.ds(n_idx * tile_n, tile_n), :],
          allocations=pipeline_allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def check_tile(tile_n: int) -> None:
  """The TwELL tile the gate kernel can produce: one consumer warpgroup's wgmma N."""
  if tile_n % 64 or not 64 <= tile_n <= 256:
    raise NotImplementedError(f"GateConfig.tile_n={tile_n}: the gate kernel takes a TwELL tile "
                              "that is a multiple of 64 up to 256 (one wgmma's N)")


def check_shapes(x_MxK, w_NxK, capacity, config: GateConfig) -> None:
  m, k = x_MxK.shape
  n, k2 = w_NxK.shape
  if k != k2:
    raise ValueError(f"x has d_model={k} but w_gate rows have {k2}")
  if m % (256 if config.cluster_m else 128):
    raise ValueError(f"M={m} must be a multiple of {256 if config.cluster_m else 128} (the public "
                     "op pads)")
  check_tile(config.tile_n)
  if n % config.tile_n:
    raise ValueError(f"d_ff={n} must be a multiple of tile_n={config.tile_n}")
  if k % config.tile_k:
    raise ValueError(f"d_model={k} must be a multiple of tile_k={config.tile_k}")
  if x_MxK.dtype != jnp.bfloat16 or w_NxK.dtype != jnp.bfloat16:
    raise NotImplementedError(f"the gate kernel takes bf16 operands, got {x_MxK.dtype}, {w_NxK.dtype}")
  if not 8 <= capacity <= config.tile_n or capacity % 8:
    raise ValueError(f"capacity must be a multiple of 8 in [8, tile_n={config.tile_n}], got "
                     f"{capacity}")


@common.shared_lowering(static_argnames=("capacity", "config"))
def gate_twell(x_MxK: jax.Array, w_gate_NxK: jax.Array, *, capacity: int,
               config: GateConfig | None = None) -> TwELL:
  """TwELL of ``relu(x @ w_gate.T)``; x [M, d_model] (M % 128 == 0), w_gate [d_ff, d_model]."""
  config = config or default_config(capacity, x_MxK.shape[1])
  check_shapes(x_MxK, w_gate_NxK, capacity, config)
  m = x_MxK.shape[0]
  n_tiles = w_gate_NxK.shape[0] // config.tile_n
  interpret = common.pallas_interpret()
  compaction = config.compaction
  if compaction == "auto":
    compaction = "jnp" if interpret else "mgpu"
  out_type = (jax.ShapeDtypeStruct((m, n_tiles), jnp.int32),
              jax.ShapeDtypeStruct((m, n_tiles, capacity), jnp.int16),
              jax.ShapeDtypeStruct((m, n_tiles, capacity), jnp.bfloat16))
  cluster = 2 if config.cluster_m else 1
  f = plgpu.kernel(
      functools.partial(_kernel, capacity=capacity, config=config, compaction=compaction),
      out_type=out_type, grid=(2 if interpret else common.num_sms() // cluster,),
      grid_names=("sm",), cluster=(cluster,), cluster_names=("cluster",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=common.interpret_params())
  cnt, idx, val = f(x_MxK, w_gate_NxK)
  return TwELL(values_MxTxC=val, indices_MxTxC=idx, counts_MxT=cnt,
               n_cols=n_tiles * config.tile_n, tile=config.tile_n)
