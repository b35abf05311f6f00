"""Decode-regime sparse FFN kernels: few tokens per call, every SM streaming the gate (Mosaic GPU).

At M <= ~64 tokens per call (generation) the FFN is bound by reading its weights once, and the
batched kernels do not fit it (the gate pads M to 128-row tiles and ~22 CTAs stream Wg; a warp per
token neither spreads one token over the GPU nor shares a row between the batch's tokens). Here
the batch is processed neuron-major, so one CTA per 64-neuron tile streams its slice of the
weights once for all M tokens, and the work skips whole tiles where no token of the batch fires:

Kernel 1, gate + up (grid: one CTA per 64-neuron tile, d_ff / 64 CTAs):
  ``g^T [64, Mp] = Wg[tile] x^T`` on wgmma (the tile's 64 gate rows are the A operand, the Mp
  tokens the N side; a TMA pipeline over d_model), then the activity of the tile
  (``act = not (g <= threshold)``: NaN and +Inf fire; -Inf fires too, see below). Only if some
  token fires in the tile does the CTA stream the tile's Wu rows the same way and form
  ``h = where(act, relu(g) * u, 0)``; a silent tile writes zeros and reads no Wu byte. Outputs:
  h^T [d_ff, Mp] bf16, the fired gate values p^T [d_ff, Mp] bf16 (the statistics are computed
  from it outside, where XLA drops them if unused) and one flag per tile.
Kernel 2, down (grid: d_model / 64 row blocks x neuron-tile groups):
  for every tile of its group whose flag is set, a CTA loads Wd[tile, its 64 columns] and
  h^T[tile] (all loads issued up front, one barrier each) and accumulates
  ``y^T [64, Mp] += Wd[tile]^T h^T[tile]`` on wgmma; silent tiles cost nothing. Each group writes
  f32 partial sums ``[groups, d_model, Mp]`` that XLA adds (one small fusion that also casts).

Bytes: ``|Wg| + f_tile (|Wu| + |Wd|)`` where ``f_tile`` is the fraction of 64-neuron tiles with an
active token, instead of ``3 |W|``. Exact on every input, with no capacity and no conditional
outside the kernels: work follows the activity inside them.

Non-finite inputs: a token row of x holding +-Inf or NaN makes every gate pre-activation of that
token non-finite. The kernel treats a non-finite g as active, so such a token runs every neuron
with the dense FFN's own arithmetic (``relu(-Inf) * u`` = 0 * +-Inf = NaN, as the dense FFN has
it): its output row is the dense row, with no branch. A NaN or Inf in an *inactive* neuron's up
row (finite gate) does not reach the output, the op's rule.

Non-gated FFN (``relu(x Wu^T) Wd``): kernel 1 skips the up projection (h = relu(g)).

Split gate (``DecodeConfig.gate_split = S > 1``, measured next): kernel 1 runs as two. Kernel 1a
streams the gate with S CTAs per tile, each over 1/S of d_model (S x d_ff / 64 CTAs, so every SM
streams Wg where d_ff / 64 = 88 CTAs leave 44 of 132 idle), writing f32 partial sums
``[S, d_ff, Mp]``; kernel 1b reads a tile's S partials, sums them in f32 and continues as kernel 1
(activity, fired values, the up projection of a live tile). Same results up to the f32 summation
order of the gate.

Interpret mode (``common.pallas_interpret()``) runs these same kernels on the CPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common

NEURON_TILE = 64   # neurons per CTA of the gate/up kernel and per step of the down kernel (wgmma M)
DOWN_ROWS = 64     # d_model rows of y^T per CTA of the down kernel (wgmma M)
TOKEN_ALIGN = 16   # Mp: the token count is padded to a multiple of this (wgmma N)
DOWN_ALIGN = 64    # the down kernel's h^T tiles are [64, Mp rounded up to this] (128-byte rows:
                   # an N-major wgmma operand with a narrower swizzle does not lower)
MAX_TOKENS = 256   # wgmma's widest N


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """tile_k: d_model slice per pipeline stage of the gate/up kernel; max_concurrent_steps: its
  stages in flight; down_tiles_per_cta: neuron tiles one down CTA handles (all its loads are
  issued at once, so this is bounded by shared memory: see ``down_smem_bytes``);
  narrow_partials: the down kernel stores its f32 partial sums at Mp columns instead of the
  operand's 64 (at 1-16 tokens a quarter of the bytes written and summed; H200, 4 layers: 23.0
  vs 23.0 us at 1 token, 28.4 vs 30.4 us at 8, ``tune_decode_narrow_h200.json``)."""
  tile_k: int = 128
  max_concurrent_steps: int = 4
  down_tiles_per_cta: int = 11
  narrow_partials: bool = True
  gate_split: int = 1

  def gate_smem_bytes(self, m_pad: int) -> int:
    """Kernel 1 (1b with ``gate_split``: plus the partial sums)."""
    stream = self.max_concurrent_steps * (NEURON_TILE + m_pad) * self.tile_k * 2
    if self.gate_split > 1:
      stream += self.gate_split * NEURON_TILE * m_pad * 4
    return stream

  def down_smem_bytes(self, m_pad: int) -> int:
    return self.down_tiles_per_cta * (NEURON_TILE * DOWN_ROWS + NEURON_TILE * down_pad(m_pad)) * 2


SMEM_BUDGET = 200 * 1024   # default_config shrinks to this
SMEM_LIMIT = 227 * 1024    # a Hopper CTA's shared memory


def default_config(m_pad: int, d_model: int, d_ff: int, gate_split: int = 1) -> DecodeConfig:
  """Tuned for the H200 at d_model 2048 / d_ff 5632 (NOTES_decode.md: tile_k 256 measured 21.9 /
  30.3 us per layer at 1 / 8 tokens against 23.2 / 31.0 with 128; the number of stages made no
  difference); shrunk to fit SMEM. ``gate_split`` (not yet measured: 1) is taken as given."""
  cfg = DecodeConfig(gate_split=gate_split)
  if m_pad <= 16 and d_model % 256 == 0:  # the measured cases (1 and 8 tokens)
    cfg = dataclasses.replace(cfg, tile_k=256)
  if d_model % cfg.tile_k:
    cfg = dataclasses.replace(cfg, tile_k=64)
  while cfg.gate_smem_bytes(m_pad) > SMEM_BUDGET and cfg.max_concurrent_steps > 2:
    cfg = dataclasses.replace(cfg, max_concurrent_steps=cfg.max_concurrent_steps - 1)
  n_tiles = d_ff // NEURON_TILE
  per = min(cfg.down_tiles_per_cta, n_tiles)
  while per > 1 and dataclasses.replace(cfg, down_tiles_per_cta=per).down_smem_bytes(
      m_pad) > SMEM_BUDGET:
    per -= 1
  return dataclasses.replace(cfg, down_tiles_per_cta=per)


def down_pad(m_pad: int) -> int:
  return common.cdiv(m_pad, DOWN_ALIGN) * DOWN_ALIGN


def pad_tokens(m: int) -> int:
  """Mp: M rounded up to the wgmma N granularity used here."""
  return max(TOKEN_ALIGN, common.cdiv(m, TOKEN_ALIGN) * TOKEN_ALIGN)


def check_shapes(x_MxD, w_gate, w_up, w_down, config: DecodeConfig) -> None:
  m, d = x_MxD.shape
  n = w_gate.shape[0]
  for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
    if w is None:
      continue
    if w.shape != (n, d):
      raise ValueError(f"{name} must be [d_ff={n}, d_model={d}], got {w.shape}")
    if w.dtype != jnp.bfloat16:
      raise NotImplementedError(f"the decode kernels take bf16 weights, got {name} {w.dtype}")
  if x_MxD.dtype != jnp.bfloat16:
    raise NotImplementedError(f"the decode kernels take bf16 activations, got {x_MxD.dtype}")
  if m % TOKEN_ALIGN or not 0 < m <= MAX_TOKENS:
    raise ValueError(f"M={m} must be a multiple of {TOKEN_ALIGN} in [16, {MAX_TOKENS}] (the op "
                     "pads)")
  if n % NEURON_TILE:
    raise ValueError(f"d_ff={n} must be a multiple of {NEURON_TILE}")
  if d % DOWN_ROWS or d % config.tile_k:
    raise ValueError(f"d_model={d} must be a multiple of {DOWN_ROWS} and of tile_k="
                     f"{config.tile_k}")
  if config.gate_split < 1 or d % (config.tile_k * config.gate_split):
    raise ValueError(f"gate_split={config.gate_split} must be >= 1 and divide d_model / tile_k "
                     f"= {d // config.tile_k}")
  for kernel, need in (("gate/up", config.gate_smem_bytes(m)), ("down", config.down_smem_bytes(m))):
    if need > SMEM_LIMIT:
      raise ValueError(f"the {kernel} kernel needs {need // 1024} KiB of shared memory at M={m} "
                       f"with {config} (at most {SMEM_LIMIT // 1024} KiB): fewer stages, a "
                       "smaller tile_k, gate_split or down_tiles_per_cta")


def _transforms(row_bytes: int):
  swizzle = plgpu.find_swizzle(row_bytes * 8)
  return (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))


# --------------------------------------------------------------------------- kernel 1: gate + up


def _any(mask_f32):
  """Scalar: whether the [64, Mp] 0/1 tile (WGMMA layout) holds a 1. A full reduction of the
  WGMMA layout does not lower in jax 0.11.2; through shared memory, reloaded in the strided layout,
  it does."""
  def scope(scratch):
    scratch[...] = mask_f32
    plgpu.commit_smem()
    v = plgpu.load(scratch, layout=plgpu.Layout.WG_STRIDED(mask_f32.shape, vec_size=2))
    return jnp.max(v) > 0.0
  return pl.run_scoped(scope, plgpu.SMEM(mask_f32.shape, jnp.float32))


def _project(w_gmem, x_gmem, config: DecodeConfig):
  """[64, Mp] f32 = w [64, K] @ x [Mp, K]^T on wgmma, streamed over K by a TMA pipeline."""
  m_pad, k = x_gmem.shape
  tile_k = config.tile_k
  transforms = _transforms(tile_k * 2)

  def acc_scope(acc_ref):
    def body(_, w_smem, x_smem):
      plgpu.wgmma(acc_ref, w_smem, x_smem.transpose((1, 0)))
      plgpu.wgmma_wait(0)

    plgpu.emit_pipeline(
        body, grid=(k // tile_k,),
        in_specs=[plgpu.BlockSpec((NEURON_TILE, tile_k), lambda kk: (0, kk),
                                  transforms=transforms),
                  plgpu.BlockSpec((m_pad, tile_k), lambda kk: (0, kk), transforms=transforms)],
        max_concurrent_steps=config.max_concurrent_steps,
    )(w_gmem, x_gmem)
    return acc_ref[...]

  return pl.run_scoped(acc_scope, plgpu.ACC((NEURON_TILE, m_pad), jnp.float32))


def _gate_up_kernel(*refs, gated: bool, threshold: float, config: DecodeConfig):
  """Kernel 1: the tile's gate, its activity and, when live, its up projection. With
  ``gate_split = S > 1`` (kernel 1b) the gate input is kernel 1a's f32 partial sums
  ``[S, d_ff, Mp]``, loaded in the accumulator's layout and summed in f32 (part 0 first),
  instead of ``Wg``."""
  if gated:
    x_gmem, gate_gmem, wu_gmem, h_gmem, p_gmem, flag_gmem = refs
  else:
    x_gmem, gate_gmem, h_gmem, p_gmem, flag_gmem = refs
    wu_gmem = None
  m_pad, d = x_gmem.shape
  t = lax.axis_index("tile")
  rows = pl.ds(pl.multiple_of(t * NEURON_TILE, NEURON_TILE), NEURON_TILE)

  if config.gate_split > 1:
    g = _partial_sum(gate_gmem.at[:, rows, :])
  else:
    g = _project(gate_gmem.at[rows, :], x_gmem, config)
  fired = (g > threshold) | (g != g)                    # NaN and +Inf fire
  compute = fired | (g == -jnp.inf)                     # -Inf: the dense 0 * Inf (module doc)
  p = jnp.where(fired, g, 0.0)
  p_gmem[rows, :] = p.astype(p_gmem.dtype)
  any_active = _any(jnp.where(compute, 1.0, 0.0))
  flag_gmem[t] = jnp.where(any_active, 1, 0).astype(jnp.int32)

  @pl.when(any_active)
  def _():
    # p is gate_activation(g) (0 where not fired); a -Inf gate gives 0 * u, the dense product.
    h = p * _project(wu_gmem.at[rows, :], x_gmem, config) if gated else p
    h_gmem[rows, :m_pad] = jnp.where(compute, h, 0.0).astype(h_gmem.dtype)

  @pl.when(jnp.logical_not(any_active))
  def _():
    h_gmem[rows, :m_pad] = jnp.zeros((NEURON_TILE, m_pad), h_gmem.dtype)

  if h_gmem.shape[1] > m_pad:  # the down kernel's 64-column granularity
    h_gmem[rows, m_pad:] = jnp.zeros((NEURON_TILE, h_gmem.shape[1] - m_pad), h_gmem.dtype)


def _partial_sum(parts_gmem):
  """[64, Mp] f32 in the WGMMA layout: the sum over the leading axis of ``parts_gmem``
  [S, 64, Mp] f32 (one TMA copy to SMEM, then part 0 + part 1 + ...)."""
  split, rows, m_pad = parts_gmem.shape

  def scope(parts_smem, bar):
    plgpu.copy_gmem_to_smem(parts_gmem, parts_smem, bar)
    plgpu.barrier_wait(bar)
    g = plgpu.load(parts_smem.at[0], layout=plgpu.Layout.WGMMA)
    for k in range(1, split):
      g = g + plgpu.load(parts_smem.at[k], layout=plgpu.Layout.WGMMA)
    return g

  return pl.run_scoped(scope, plgpu.SMEM((split, rows, m_pad), jnp.float32),
                       plgpu.Barrier(num_arrivals=1))


def _gate_part_kernel(x_gmem, wg_gmem, gp_gmem, *, config: DecodeConfig):
  """Kernel 1a (``gate_split = S > 1``): CTA (tile, part) writes the tile's gate over d_model
  columns [part d / S, (part + 1) d / S) as f32 partial sums ``gp[part, tile rows, :]``."""
  d = x_gmem.shape[1]
  dk = d // config.gate_split
  t = lax.axis_index("tile")
  kp = lax.axis_index("part")
  rows = pl.ds(pl.multiple_of(t * NEURON_TILE, NEURON_TILE), NEURON_TILE)
  cols = pl.ds(pl.multiple_of(kp * dk, dk), dk)
  gp_gmem[kp, rows, :] = _project(wg_gmem.at[rows, cols], x_gmem.at[:, cols], config)


# --------------------------------------------------------------------------- kernel 2: down


def _down_kernel(h_gmem, wd_gmem, flag_gmem, out_gmem, *, config: DecodeConfig):
  n, m_pad = h_gmem.shape
  n_tiles = n // NEURON_TILE
  per = config.down_tiles_per_cta
  dc = lax.axis_index("d")
  grp = lax.axis_index("group")
  cols = pl.ds(pl.multiple_of(dc * DOWN_ROWS, DOWN_ROWS), DOWN_ROWS)

  @functools.partial(
      pl.run_scoped,
      wd_smem=plgpu.SMEM((per, NEURON_TILE, DOWN_ROWS), wd_gmem.dtype,
                         transforms=_transforms(DOWN_ROWS * 2)),
      h_smem=plgpu.SMEM((per, NEURON_TILE, m_pad), h_gmem.dtype,
                        transforms=_transforms(m_pad * 2)),
      bars=plgpu.Barrier(num_arrivals=2, num_barriers=per))
  def _(wd_smem, h_smem, bars):
    flags = []
    for s in range(per):
      t = grp * per + s
      tc = jnp.minimum(t, n_tiles - 1)
      live = jnp.logical_and(t < n_tiles, flag_gmem[tc] != 0)
      flags.append(live)
      trows = pl.ds(pl.multiple_of(tc * NEURON_TILE, NEURON_TILE), NEURON_TILE)

      @pl.when(live)
      def _():
        plgpu.copy_gmem_to_smem(wd_gmem.at[trows, cols], wd_smem.at[s], bars.at[s])
        plgpu.copy_gmem_to_smem(h_gmem.at[trows, :], h_smem.at[s], bars.at[s])

    def acc_scope(acc_ref):
      for s in range(per):
        @pl.when(flags[s])
        def _():
          plgpu.barrier_wait(bars.at[s])
          plgpu.wgmma(acc_ref, wd_smem.at[s].transpose((1, 0)), h_smem.at[s])
          plgpu.wgmma_wait(0)
      return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((DOWN_ROWS, m_pad), jnp.float32))
    out_gmem[grp, cols, :] = acc[:, :out_gmem.shape[2]]


# --------------------------------------------------------------------------- entry point


@common.shared_lowering(static_argnames=("threshold", "config"))
def decode_ffn(x_MxD: jax.Array, w_gate: jax.Array, w_up: jax.Array | None, w_down: jax.Array, *,
               threshold: float = 0.0, config: DecodeConfig | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The decode kernels on x [Mp, d_model] (Mp a multiple of 16, at most 256; the op pads).

  Returns ``(y [Mp, d_model] x.dtype, h^T [d_ff, Mp] bf16, p^T [d_ff, Mp] bf16, tile_flags
  [d_ff / 64] int32)``: the FFN output, the hidden activations and fired gate values
  (neuron-major; zero where silent) and which 64-neuron tiles ran. ``w_up=None``: non-gated
  (``relu(x Wu^T) Wd`` with the up projection passed as ``w_gate``)."""
  m_pad, d = x_MxD.shape
  n = w_gate.shape[0]
  config = config or default_config(m_pad, d, n)
  check_shapes(x_MxD, w_gate, w_up, w_down, config)
  n_tiles = n // NEURON_TILE
  gated = w_up is not None
  interpret = common.interpret_params()
  params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
  gate_in = w_gate
  if config.gate_split > 1:
    gate_parts = plgpu.kernel(
        functools.partial(_gate_part_kernel, config=config),
        out_type=jax.ShapeDtypeStruct((config.gate_split, n, m_pad), jnp.float32),
        grid=(n_tiles, config.gate_split), grid_names=("tile", "part"), compiler_params=params,
        interpret=interpret)
    gate_in = gate_parts(x_MxD, w_gate)
  gate_up = plgpu.kernel(
      functools.partial(_gate_up_kernel, gated=gated, threshold=float(threshold), config=config),
      out_type=(jax.ShapeDtypeStruct((n, down_pad(m_pad)), jnp.bfloat16),
                jax.ShapeDtypeStruct((n, m_pad), jnp.bfloat16),
                jax.ShapeDtypeStruct((n_tiles,), jnp.int32)),
      grid=(n_tiles,), grid_names=("tile",), compiler_params=params, interpret=interpret)
  ws = (gate_in, w_up) if gated else (gate_in,)
  h_NxM, p_NxM, flags = gate_up(x_MxD, *ws)
  groups = common.cdiv(n_tiles, config.down_tiles_per_cta)
  down = plgpu.kernel(
      functools.partial(_down_kernel, config=config),
      out_type=jax.ShapeDtypeStruct(
          (groups, d, m_pad if config.narrow_partials else down_pad(m_pad)), jnp.float32),
      grid=(d // DOWN_ROWS, groups), grid_names=("d", "group"), compiler_params=params,
      interpret=interpret)
  partial_GxDxM = down(h_NxM, w_down, flags)
  y_MxD = jnp.sum(partial_GxDxM[:, :, :m_pad], axis=0).T.astype(x_MxD.dtype)  # XLA: one fusion
  return y_MxD, h_NxM[:, :m_pad], p_NxM, flags
