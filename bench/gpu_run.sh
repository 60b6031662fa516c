#!/usr/bin/env bash
# The whole GPU run for a lent H100/H200, in one command: build the extension with CUDA,
# check every kernel against the reference on the GPU, benchmark, write the results.
#   bash bench/gpu_run.sh [results folder]      (default: bench/results)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_device.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -c "import spkern._C as C; print('spkern._C with CUDA:', C.with_cuda)"
python3 -m pytest -q tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
python3 bench/bench_cross_entropy.py --device cuda --out "$out" 2>&1 | tee "$out/gpu_bench_cross_entropy.txt"
python3 bench/bench_cross_entropy.py --device cuda --dtype bfloat16 --out "$out" 2>&1 | tee -a "$out/gpu_bench_cross_entropy.txt"
python3 bench/bench_linear_cross_entropy.py --device cuda --dtype bfloat16 --out "$out" 2>&1 | tee "$out/gpu_bench_linear.txt"
python3 bench/bench_norms.py --device cuda --out "$out" 2>&1 | tee "$out/gpu_bench_norms.txt"
python3 bench/bench_optim.py --device cuda --out "$out" 2>&1 | tee "$out/gpu_bench_optim.txt"
python3 bench/bench_tracker.py --device cuda --widths 2048,8192 --out "$out" 2>&1 | tee "$out/gpu_bench_tracker.txt"
python3 bench/bench_gpt.py --device cuda --widths 512,1024,2048 --out "$out" 2>&1 | tee "$out/gpu_bench_gpt.txt"
