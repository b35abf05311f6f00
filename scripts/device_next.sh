#!/usr/bin/env bash
# The next device call's measurements, in priority order, each under its own time limit so one
# slow step cannot take the others' results with it (results and logs under $OUT):
#   bash scripts/device_next.sh generation|train|decode|scan|lowering|unrolled|all
# generation (~9.5 min): the Generator's defaults at batch 1 / 8 / 64 and 2048-token prompts (2b);
#   generation05 (~3 min): the same for the 0.5b.
# Next: session18, then session18b (session14-17b ran in the fifteenth session, 2026-12-03).
# session16 (~12 min): the remat policy's 2b step and peak; the chunked cross-entropy alone
#   (bench_loss) and its memory (1b, no remat).
# session14 (~8 min): FIRST. GPU tests of the weight-gradient / neuron-major kernels as refactored
#   after the last GPU run and of the fused pass (train_backward=neuron_major_fused: the per-entry
#   math in the pass, no XLA glue), then bench_ffn_train comparing it with neuron_major at ~28.
# session15 (~7 min): after session14: bench_train_parts' per-kernel breakdown of the three orders
#   (the entry lists' CUB sort), and with 2 entries per step in dx_kernel.
# session13 (~8 min, ran 2026-12-03 thirteenth session): GPU tests of the neuron-major backward,
#   bench_ffn_train --compare-backward (token- vs neuron-major side by side) at ~28.
# session12 (~9 min, ran in part 2026-12-03: the probe; the 2b step ran with neuron_major). The 2b sparse step's compiled peak after entry_lists' fill change.
# session10 (~7 min, ran): Command buffers with CONDITIONAL/WHILE vs the default (inference
#   dispatcher, training step gaps); then train_host (the training grid with the 4-entry backward).
# session9, session9b, session9c (ran 2026-12-02, ninth session): tie-free gradient checks,
#   backward entries per step, the inference grid and other model families, the dispatch line.
# grad_errors (~9 min, ran 2026-12-02 ninth session). Per-gradient errors of the ~11 grid rows, the static-modes GPU tests,
#   then generation05.
# session8 (~10 min, ran 2026-12-02 in parts): glue_check (~2 min: GPU tests of the training path), train_host, generation05.
# train_host (~5 min): bench_ffn_train's grid with auto_host's pick as the headline.
# ffn_grid (~4 min): bench_ffn's inference grid on the wall clock.
# train (~8 min): the training hot/cold split at FFN level, the 2b step with plain auto_host.
# Ran on 2026-12-02 (kept to reproduce their results): decode (~5 min): GPU tests of the decode kernels (incl. DecodeConfig.gate_split), tune_decode
#   with the split gate and longer TMA bursts (CUPTI breakdown), generation with the split gate.
# scan (~6 min): scanned layers with cuBLAS GEMMs and XLA's dynamic-slice fusion (weights in place?).
# lowering (~10 min): GPU tests through the shared kernel lowerings, unrolled 2b generation, 0.5b
#   training compile times. unrolled (~5 min): the decode kernels vs dense, unrolled, batch 2-64.
# Written down in pallas_kernels/NOTES_decode.md and NOTES_train.md ("Next device call").
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
run() {  # run SECONDS NAME CMD...: the command's output to $OUT/NAME.log, its tail here
  local limit="$1" name="$2"; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $?"; grep -v "^W[0-9]\|Warning" "$OUT/$name.log" | tail -12
}
decode() {
  run 200 gpu_decode_tests python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_decode.py \
      -k match_float32
  run 240 tune_decode_split python3 experiments/tune_decode.py --batches 1,8,64 --layers 4 \
      --rounds 3 --cupti --configs 256:4:11:narrow 512:2:11:narrow 128:8:11:narrow \
      256:4:11:narrow:s2 256:2:11:narrow:s4 128:2:11:narrow:s4 128:2:11:narrow:s8 \
      --out "$OUT/tune_decode_split_h200.json"
  run 200 bench_decode_split4 python3 experiments/bench_decode.py --configs 2b --batches 1,8 \
      --new-tokens 64 --long-batches "" --set model.sparse.decode_gate_split=4 \
      --out "$OUT/bench_decode_2b_split4_h200.json"
}
scan() {  # do cuBLAS GEMMs with XLA's dynamic-slice fusion read a scanned layer's weights in place?
  XLA_FLAGS="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=true" \
  run 150 decode_ffn_scan_cublas_dsf python3 experiments/bench_decode_ffn.py --layout scan \
      --batches 1,8 --dist skewed --rounds 5 --out "$OUT/bench_decode_ffn_scan_cublas_dsf_h200.json"
  run 260 bench_decode_cublas_dsf python3 experiments/bench_decode.py --configs 2b --batches 1,8 \
      --new-tokens 64 --long-batches "" --cublas \
      --xla-option xla_gpu_enable_dynamic_slice_fusion=true \
      --out "$OUT/bench_decode_2b_cublas_dsf_h200.json"
}
lowering() {  # kernels shared per shape (common.shared_lowering): correct, and how much compile is saved
  run 200 gpu_tests_shared_lowering python3 -m pytest -q -x -p no:cacheprovider \
      tests/test_gpu_decode.py tests/test_gpu_kernels.py -k "match_float32 or full_op or training_gradients"
  run 260 bench_decode_unrolled python3 experiments/bench_decode.py --configs 2b --batches 1,8 \
      --new-tokens 64 --long-batches "" --unrolled --out "$OUT/bench_decode_2b_unrolled_shared_h200.json"
  run 170 bench_model_05b_compile python3 experiments/bench_model.py --configs 0.5b --modes train \
      --sparsity 0.995 --settle-steps 2 --windows 1 --min-seconds 2 --warmup 1 --max-minutes 2.5 \
      --set train.dispatch=auto_host --out "$OUT/bench_model_05b_train_shared_lowering_h200.json"
}
unrolled() {  # the Generator's unrolled default: where do the decode kernels stop paying?
  run 190 bench_decode_unrolled_kernel python3 experiments/bench_decode.py --configs 2b \
      --batches 2,4 --new-tokens 64 --long-batches "" --decode-path kernel --rounds 3 \
      --out "$OUT/bench_decode_2b_unrolled_kernel_b2_b4_h200.json"
  run 230 bench_decode_unrolled_auto python3 experiments/bench_decode.py --configs 2b \
      --batches 8,64 --new-tokens 64 --long-batches "" --rounds 3 \
      --out "$OUT/bench_decode_2b_unrolled_auto_b8_b64_h200.json"
}
generation() {  # issue 16's closing measurement: the Generator's defaults (unrolled, auto paths,
  # dense prefill up to 1024 tokens), prompt 128 + 128 new tokens at batch 1 / 8 / 64 and the
  # 2048-token context at batch 1 / 8, side by side (2b); the 0.5b is stage generation05
  run 330 bench_decode_2b_defaults python3 experiments/bench_decode.py --configs 2b \
      --batches 1,8,64 --new-tokens 128 --long-batches "" --rounds 3 \
      --out "$OUT/bench_decode_2b_defaults_h200.json"
  run 250 bench_decode_2b_long_defaults python3 experiments/bench_decode.py --configs 2b \
      --batches "" --new-tokens 128 --long-batches 1,8 --rounds 3 \
      --out "$OUT/bench_decode_2b_long_defaults_h200.json"
}
generation05() {
  run 200 bench_decode_05b_defaults python3 experiments/bench_decode.py --configs 0.5b \
      --batches 1,8,64 --new-tokens 128 --long-batches "" --rounds 3 \
      --out "$OUT/bench_decode_05b_defaults_h200.json"
}
grad_errors() {  # next: the Zipf ~11 gradient error (1.7e-2) per gradient, and the static-modes GPU
  # test that failed once on dx (2.2e-2), repeated over fresh seeds; then the 0.5b generation
  run 120 bench_ffn_train_zipf11 python3 experiments/bench_ffn_train.py --quick --no-cupti \
      --dist zipf heavy_tail uniform --active 11 --out "$OUT/bench_ffn_train_errors_h200.json"
  run 200 gpu_tests_static_modes python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
      -k "static_modes or training_gradients"
  generation05
}
session9() {  # the gradient checks with ReLU-tie rows' cotangent zeroed (synthetic.GATE_TIE_TOL),
  # the backward kernel with 1/4 entries per step (equal to 2? faster?), the training errors
  run 220 gpu_tests_ties python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
      -k "static_modes or training_gradients or entries_per_step"
  run 200 bench_ffn_train_errors python3 experiments/bench_ffn_train.py --quick --no-cupti \
      --dist zipf heavy_tail uniform skewed --active 11 28 \
      --out "$OUT/bench_ffn_train_tie_free_errors_h200.json"
  for n in 2 4; do
    run 120 train_parts_bwd$n python3 experiments/bench_train_parts.py --active 28 \
        --dist uniform skewed --bwd-steps $n --out "$OUT/train_parts_bwd${n}_h200.json"
  done
}
session9b() {  # the backward kernel's new default (4 entries per step) through the training-path
  # GPU tests, then issue 14's inference grid with mode dense and the host-decided pick beside it
  run 180 gpu_tests_bwd4 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
      -k "static_modes or training_gradients or entries_per_step"
  run 290 bench_ffn_grid python3 experiments/bench_ffn.py --quick --no-cupti \
      --out "$OUT/bench_ffn_wall_grid_h200.json"
  run 115 bench_ffn_shapes python3 experiments/bench_ffn.py --quick --no-cupti \
      --shape 4096x14336 4096x11008 1024x8192 --dist clustered skewed zipf --active 28 560 \
      --out "$OUT/bench_ffn_wall_shapes_h200.json"
}
session9c() {  # the dispatcher's new line (0.009: ~56 active of 5632 dense) and the static dense
  # FFN of wider models (d_model > 2048: auto_runs_dense), with two more model families
  run 120 bench_ffn_line56 python3 experiments/bench_ffn.py --quick --no-cupti \
      --dist skewed zipf uniform --active 56 --out "$OUT/bench_ffn_line56_h200.json"
  run 240 bench_ffn_shapes2 python3 experiments/bench_ffn.py --quick --no-cupti \
      --shape 1024x8192 4096x11008 --dist skewed clustered --active 11 28 \
      --out "$OUT/bench_ffn_wall_shapes2_h200.json"
}
session10() {  # NEXT. Where the wall clock goes beyond the kernels: the on-device dispatcher lost
  # 0.27 ms to the forced op at 1024/8192 skewed ~28 (1.10x vs 1.43x) and the sparse training step
  # is 0.4-0.6 ms above its CUPTI sum; XLA's default command buffers do not list CONDITIONAL or
  # WHILE (a ConditionalThunk outside one copies its predicate and blocks the host). Same runs with
  # them enabled; then the training grid with the 4-entry backward and the 2b forward (issue 14).
  local cb="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONDITIONAL,WHILE"
  run 100 bench_ffn_cb_default python3 experiments/bench_ffn.py --quick --no-cupti \
      --shape 1024x8192 2048x5632 --dist skewed --active 28 168 --out "$OUT/bench_ffn_cb_default_h200.json"
  XLA_FLAGS="$cb" run 100 bench_ffn_cb_cond python3 experiments/bench_ffn.py --quick --no-cupti \
      --shape 1024x8192 2048x5632 --dist skewed --active 28 168 --out "$OUT/bench_ffn_cb_cond_h200.json"
  run 120 train_parts_cb_default python3 experiments/bench_train_parts.py --active 28 \
      --dist uniform skewed --out "$OUT/train_parts_cb_default_h200.json"
  XLA_FLAGS="$cb" run 120 train_parts_cb_cond python3 experiments/bench_train_parts.py --active 28 \
      --dist uniform skewed --out "$OUT/train_parts_cb_cond_h200.json"
}
session11() {  # the conditional-free training call (overflow_fallback="defer") on the timeline and
  # on the training grid (value_and_grad steps: the forward's conditionals stay live)
  run 150 trace_train_step python3 experiments/trace_train_step.py \
      --out "$OUT/trace_train_step_defer_h200.json"
  run 420 bench_ffn_train_defer python3 experiments/bench_ffn_train.py --quick --no-cupti \
      --out "$OUT/bench_ffn_train_defer_h200.json"
}
session11b() {  # GPU tests of the deferred overflow; the 0.5b training step, every layer sparse, with
  # overflow_fallback cond vs defer (each side by side with the dense model in its own process)
  run 150 gpu_tests_defer python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py \
      -k "deferred or static_modes"
  for fb in cond defer; do
    run 200 bench_model_05b_sparse_$fb python3 experiments/bench_model.py --configs 0.5b \
        --modes train --sparsity 0.995 --settle-steps 2 --windows 2 --min-seconds 3 --warmup 1 \
        --max-minutes 2.8 --set train.dispatch=sparse model.sparse.overflow_fallback=$fb \
        --out "$OUT/bench_model_05b_train_sparse_${fb}_h200.json"
  done
}
glue_check() {  # the loop-free glue of the weight gradients (segment starts, task neurons, CTA
  # bounds without searchsorted loops) through the GPU tests of the training path
  run 150 gpu_tests_glue python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py \
      -k "weight_gradient or training_gradients or static_modes"
}
train_host() {  # issue 15: every distribution x density in training, with auto_host's pick as the
  # headline (and the on-device dispatcher, mode sparse, mode dense beside it)
  run 330 bench_ffn_train_host python3 experiments/bench_ffn_train.py --quick --no-cupti \
      --out "$OUT/bench_ffn_train_host_h200.json"
}
ffn_grid() {  # issue 14: the inference grid on the wall clock, re-measured
  run 330 bench_ffn_grid python3 experiments/bench_ffn.py --quick --no-cupti \
      --out "$OUT/bench_ffn_wall_grid_h200.json"
}
train() {
  run 200 bench_ffn_modes_hot_cold python3 experiments/bench_ffn_modes.py --dist skewed zipf \
      --active 28 --windows 3 --hot-cold --out "$OUT/bench_ffn_modes_hot_cold_h200.json"
  run 330 bench_model_2b_auto_host python3 experiments/bench_model.py --configs 2b --modes train \
      --sparsity 0.995 --settle-steps 2 --windows 2 --min-seconds 3 --warmup 1 --max-minutes 5.3 \
      --set train.dispatch=auto_host --out "$OUT/bench_model_2b_train_auto_host_h200.json"
}
session12() {  # NEXT (~9 min): the 2b sparse step's peak with remat after entry_lists' fill
  # change (the 0.31 GB of hoisted copies should be gone), then the allocator's view at 2b.
  run 200 probe_train_memory_2b_38 python3 experiments/probe_train_memory.py --config 2b \
      --layers 38 --models sparse --out "$OUT/probe_train_memory_2b_38_fill_h200.json"
  run 330 bench_model_2b_train_fill python3 experiments/bench_model.py --configs 2b --modes train \
      --sparsity 0.995 --settle-steps 2 --windows 2 --min-seconds 3 --warmup 1 --max-minutes 5 \
      --out "$OUT/bench_model_2b_train_fill_h200.json"
}
session13() {  # NEXT (~8 min): is the neuron-major backward right on the GPU, and faster?
  run 240 gpu_tests_neuron_major python3 -m pytest -q -x -p no:cacheprovider \
      tests/test_gpu_kernels.py -k "neuron_major or dx_kernel or training_gradients"
  run 300 bench_ffn_train_neuron python3 experiments/bench_ffn_train.py --quick --no-cupti \
      --dist uniform skewed heavy_tail --active 28 --compare-backward \
      --out "$OUT/bench_ffn_train_neuron_major_h200.json"
}
session14() {  # NEXT (~8 min): the kernels as refactored after the thirteenth session's GPU runs
  # (refs by name; the default neuron-major path included), the fused pass, and whether it pays
  run 270 gpu_tests_neuron_major python3 -m pytest -q -x -p no:cacheprovider \
      tests/test_gpu_kernels.py \
      -k "neuron_major or fused or dx_kernel or weight_gradient or training_gradients"
  run 170 bench_ffn_train_fused python3 experiments/bench_ffn_train.py --quick --no-cupti \
      --dist uniform skewed heavy_tail --active 28 --compare-backward neuron_major_fused \
      --out "$OUT/bench_ffn_train_fused_h200.json"
}
session15() {  # after session14 (~7 min): the per-kernel breakdown of the three orders (the entry
  # lists' CUB sort shows in entry_lists_kernels), then the per-token kernels with 2 entries in
  # flight (dx_kernel inherited the token-major kernel's 4, untuned)
  run 200 train_parts python3 experiments/bench_train_parts.py --active 28 --dist uniform skewed \
      --out "$OUT/train_parts_neuron_major_h200.json"
  run 200 train_parts_bwd2 python3 experiments/bench_train_parts.py --active 28 \
      --dist uniform skewed --bwd-steps 2 --out "$OUT/train_parts_bwd2_h200.json"
}
session16() {  # (~12 min, compile-heavy) the fourteenth session's CPU-only changes. First the
  # remat policy (model.remat_policy=keep_sparse_ffn, now the default: a rematerialised block keeps
  # the sparse op's residuals, ~0.1 GB per layer at 16384 tokens, instead of running the gate, fused
  # and entry-list kernels again): the 2b step against +20.4% with everything recomputed
  # (results/bench_model_2b_train_neuron_major_h200.json; dense is unchanged by the policy, so its
  # tokens/ms is the control), and its compiled peak (44.36 GB before; ~48 GB predicted).
  run 330 bench_model_2b_keep python3 experiments/bench_model.py --configs 2b --modes train \
      --sparsity 0.995 --settle-steps 2 --windows 2 --min-seconds 3 --warmup 1 \
      --out "$OUT/bench_model_2b_train_keep_sparse_ffn_h200.json"
  run 200 probe_2b_keep python3 experiments/probe_train_memory.py --config 2b --layers 38 \
      --models sparse --out "$OUT/probe_train_memory_2b_38_keep_sparse_ffn_h200.json"
  # Then the chunked cross-entropy (train.loss_chunk): alone, and the 1b step's compiled peak
  # without remat, dense and sparse, against probe_train_memory_1b_noremat_h200.json (40.66 /
  # 32.55 GB).
  run 150 bench_loss python3 experiments/bench_loss.py --chunks 128 256 512 1024 \
      --out "$OUT/bench_loss_h200.json"
  run 240 probe_1b_loss_chunk python3 experiments/probe_train_memory.py --config 1b --layers 18 \
      --batch 8 --set model.remat=false train.loss_chunk=256 \
      --out "$OUT/probe_train_memory_1b_noremat_loss_chunk_h200.json"
}
session17() {  # (~6 min) T = bf16(P R) through lax.reduce_precision in the XLA paths (XLA's GPU
  # pipeline removed the astype pair, so the glue's dWd differed from the fused pass's by 1.7e-3):
  # the GPU tests of every order (no -x), then the 2b step with the fused pass and the chunked
  # loss (train.loss_chunk=256, now the default, in both models)
  run 200 gpu_tests_round python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
      -k "neuron_major or fused or dx_kernel or weight_gradient or training_gradients"
  run 330 bench_model_2b_fused python3 experiments/bench_model.py --configs 2b --modes train \
      --sparsity 0.995 --settle-steps 2 --windows 2 --min-seconds 3 --warmup 1 \
      --set model.sparse.train_backward=neuron_major_fused \
      --out "$OUT/bench_model_2b_train_fused_loss_chunk_h200.json"
}
session17b() {  # (~4 min) the same 2b step with the default backward (neuron_major)
  run 330 bench_model_2b_loss_chunk python3 experiments/bench_model.py --configs 2b --modes train \
      --sparsity 0.995 --settle-steps 2 --windows 2 --min-seconds 3 --warmup 1 \
      --out "$OUT/bench_model_2b_train_loss_chunk_h200.json"
}
session18() {  # NEXT (~9.5 min): the fused pass (train_backward="auto", the default since the
  # fifteenth session) at d_model 1024 / 2048 / 4096 (GPU tests: may "auto" go past 2048?), then the
  # training grid with the new default (six distributions x five densities: still >= 0.95x of
  # dense everywhere?), then the fused vs sliced pass at the wide shape
  run 150 gpu_tests_fused_shapes python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
      -k "fused_neuron_major or training_gradients"
  run 300 bench_ffn_train_auto python3 experiments/bench_ffn_train.py --quick --no-cupti \
      --out "$OUT/bench_ffn_train_auto_fused_h200.json"
  run 120 bench_ffn_train_fused_4096 python3 experiments/bench_ffn_train.py --quick --no-cupti \
      --shape 4096x14336 --dist uniform skewed --active 28 --train-backward neuron_major \
      --compare-backward neuron_major_fused --out "$OUT/bench_ffn_train_fused_4096_h200.json"
}
session18b() {  # (~5 min) after session18: two schedules of the sixteenth session (no device time
  # then, both off by default until this run): (1) the fused pass's task pieces (twell_wgrad.
  # FUSED_PASS_FINE_CONFIG): 1.61 ms skewed vs 1.33 uniform with 512-entry pieces; predicted with
  # 128: skewed ~1.35-1.40, uniform unchanged (+~0.01 ms: more partial rows to reduce);
  # (2) work-balanced CTA token ranges in the warp-per-token kernels (FusedConfig / BackwardConfig
  # .balanced, common.token_bounds): with equal token counts the busiest CTA holds ~4.5% (uniform),
  # ~7.5% (skewed), ~25% (heavy tail) more than the mean at ~28; predicted forward and backward
  # (auto) -2..4% uniform / skewed, -10..20% heavy tail. session18's GPU tests cover (1)'s split
  # pieces; (2)'s kernels run here first, so check backward_auto_balanced against backward_auto's
  # gradients with tests/test_gpu_kernels.py -k balanced before timing.
  run 150 gpu_tests_balanced python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
      -k "balanced"
  run 300 train_parts_pieces python3 experiments/bench_train_parts.py --active 28 \
      --dist uniform skewed heavy_tail zipf --fused-pieces 512:512 256:2048 128:4096 \
      --out "$OUT/train_parts_schedules_h200.json"
}
python3 -c "import jax; d = jax.devices()[0]; print(jax.__version__, d.device_kind)"
case "${1:-all}" in
  decode) decode ;;
  scan) scan ;;
  lowering) lowering ;;
  unrolled) unrolled ;;
  generation) generation ;;
  generation05) generation05 ;;
  train) train ;;
  train_host) train_host ;;
  glue_check) glue_check ;;
  grad_errors) grad_errors ;;
  session9) session9 ;;
  session9b) session9b ;;
  session9c) session9c ;;
  session10) session10 ;;
  session11) session11 ;;
  session11b) session11b ;;
  session12) session12 ;;
  session13) session13 ;;
  session14) session14 ;;
  session15) session15 ;;
  session16) session16 ;;
  session17) session17 ;;
  session17b) session17b ;;
  session18) session18 ;;
  session18b) session18b ;;
  session8) glue_check; train_host; generation05 ;;
  ffn_grid) ffn_grid ;;
  all) generation; generation05; train ;;
  *) echo "usage: bash scripts/device_next.sh generation|generation05|train_host|ffn_grid|train|decode|scan|lowering|unrolled|all" >&2; exit 2 ;;
esac
