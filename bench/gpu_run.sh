#!/usr/bin/env bash
# The GPU run for a lent H100/H200, in stages that fit one 10-minute device command (the
# whole device budget is 15 minutes, the machine's start included):
#
#   bash bench/gpu_run.sh [--dry-run] [results folder]     (default: $OUT, else bench/results)
#   (the Python is $PYTHON, else python3)
#
# Stages run in order, correctness first, then the benchmarks fastest first; each has its
# own time cap (seconds, below) and writes its log under the results folder as it
# finishes, with a line in stages.tsv (stage, status, seconds), so that a run cut short
# still returns what it measured. A stage that fails or runs over its cap is recorded and
# the next one runs. --dry-run checks the plumbing on CPU in seconds: the same stages with
# caps of 60 s, the build and the GPU tests replaced by imports of spkern, each benchmark
# script run with --help (it imports and parses its options).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=cuda

printf 'stage\tstatus\tseconds\n' > "$out/stages.tsv"
total_start=$SECONDS

# stage NAME CAP COMMAND...: runs COMMAND with a cap of CAP seconds (60 in a dry run), its
# output in $out/NAME.log; status ok, failed (exit status) or timeout.
stage() {
  local name=$1 cap=$2
  shift 2
  [ $dry = 1 ] && cap=60
  local start=$SECONDS status
  echo "== $name (cap ${cap}s): $*"
  # (through bash -c, so that COMMAND may be the bench function, exported below)
  timeout --signal=TERM --kill-after=10 "$cap" bash -c '"$@"' _ "$@" > "$out/$name.log" 2>&1
  local rc=$?
  if [ $rc = 0 ]; then status=ok; elif [ $rc = 124 ] || [ $rc = 137 ]; then status=timeout; else status="failed($rc)"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" $((SECONDS - start)) >> "$out/stages.tsv"
  tail -3 "$out/$name.log"
  echo "-- $name: $status in $((SECONDS - start)) s (run so far: $((SECONDS - total_start)) s)"
}

bench() {  # a benchmark script on the run's device (in a dry run: --help)
  local script=$1
  shift
  if [ $dry = 1 ]; then
    "$py" "bench/$script" --help > /dev/null && echo "bench/$script parses its options"
    return
  fi
  "$py" "bench/$script" --device "$device" --out "$out" "$@"
}

export -f bench
export dry py device out

if [ $dry = 1 ]; then
  stage device 60 "$py" -c 'import torch; print("dry run on", torch.__version__, "cpu")'
  stage build 60 "$py" -c 'import spkern._C as C; print("spkern._C (CPU build):", C.compiled_isa())'
  stage gpu_tests 60 "$py" -c 'import spkern; print("spkern", spkern.__version__, "imports")'
else
  stage device 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  # the CUDA extension, built in place (16 cores: about 2 minutes from scratch)
  stage build 180 env MAX_JOBS=16 "$py" setup.py -q build_ext --inplace
  stage gpu_tests 110 "$py" -m pytest -q -x tests/test_gpu.py
fi
# benchmarks, fastest first (caps guessed for --device cuda on an H200, no GPU has run them yet;
# with the stages above 590 s: one device command, 12 minutes of budget with the start)
stage bench_norms 30 bench bench_norms.py
stage bench_optim 40 bench bench_optim.py
stage bench_ce_float32 50 bench bench_cross_entropy.py
stage bench_ce_bfloat16 50 bench bench_cross_entropy.py --dtype bfloat16
stage bench_lce_bfloat16 60 bench bench_linear_cross_entropy.py --dtype bfloat16
stage bench_tracker 50 bench bench_tracker.py --widths 2048,8192
echo "gpu_run.sh: done in $((SECONDS - total_start)) s; stages in $out/stages.tsv"
cat "$out/stages.tsv"
