#!/usr/bin/env bash
# Runs on the GPU machine (device tool): GPU tests and benchmarks, results under $OUT.
#   bash scripts/gpu_job.sh tests|bench-quick|train-quick|bench-full|train-full|bench-shapes [extra args]
#   (or a script path: bash scripts/gpu_job.sh experiments/bench_model.py --configs 2b ...)
# bench-quick / train-quick: the whole distribution x density grid at M=16384, paper shape, ~2-3 min
# each; *-full: more rounds and CUPTI iterations (~5 min); bench-shapes: the other model families.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
if ! python3 -m pytest --version >/dev/null 2>&1 && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import jax; d=jax.devices()[0]; print(jax.__version__, d.device_kind, d.compute_capability)"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader
stage="${1:-tests}"; shift || true
case "$stage" in
  tests)
    python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py "$@" 2>&1 | tee "$OUT/gpu_tests.log" ;;
  bench-quick)
    python3 experiments/bench_ffn.py --quick --breakdown --out "$OUT/bench_ffn_quick.json" "$@" 2>&1 | tee "$OUT/bench_quick.log" ;;
  train-quick)
    python3 experiments/bench_ffn_train.py --quick --out "$OUT/bench_ffn_train_quick.json" "$@" 2>&1 | tee "$OUT/train_quick.log" ;;
  bench-full)
    python3 experiments/bench_ffn.py --out "$OUT/bench_ffn.json" "$@" 2>&1 | tee "$OUT/bench_full.log" ;;
  train-full)
    python3 experiments/bench_ffn_train.py --out "$OUT/bench_ffn_train.json" "$@" 2>&1 | tee "$OUT/train_full.log" ;;
  bench-shapes)
    python3 experiments/bench_ffn.py --quick --shape 1024x8192 4096x11008 4096x14336 --out "$OUT/bench_ffn_shapes.json" "$@" 2>&1 | tee "$OUT/bench_shapes.log" ;;
  *)
    python3 "$stage" "$@" 2>&1 | tee "$OUT/run.log" ;;
esac
