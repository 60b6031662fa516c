#!/usr/bin/env bash
# The GPU run for a lent H100/H200, in stages that fit one 10-minute device command (the
# whole device budget is 15 minutes, the machine's start included):
#
#   bash bench/gpu_run.sh [--dry-run] [results folder]     (default: $OUT, else bench/results)
#   (the Python is $PYTHON, else python3; the peers' wheels are in $PEER_WHEELS, else .whl:
#   bash bench/peer_wheels.sh saves them, and the device call carries that folder)
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
wheels=${PEER_WHEELS:-.whl}

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

peers_found() {  # the peers the benchmarks will find, with their versions
  "$py" -c 'import sys; sys.path.insert(0, "bench"); import peers; print("peers found:", peers.versions())'
}

install_peers() {  # SITE WHEEL...
  local site=$1
  shift
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$@" &&
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" peers_found
}

export -f bench peers_found install_peers
export dry py device out

if [ $dry = 1 ]; then
  stage device 60 "$py" -c 'import torch; print("dry run on", torch.__version__, "cpu")'
else
  stage device 10 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
fi
# the peers (Liger Kernel, cut-cross-entropy, quack), installed from their wheels for this run only
if compgen -G "$wheels/*.whl" > /dev/null; then
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  stage peers 15 install_peers "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  printf 'peers\tskipped (no wheels in %s)\t0\n' "$wheels" >> "$out/stages.tsv"
  echo "-- peers: no wheels in $wheels (bash bench/peer_wheels.sh saves them): the benchmarks skip them"
fi
if [ $dry = 1 ]; then
  stage build 60 "$py" -c 'import spkern._C as C; print("spkern._C CPU kernels:", [v["isa"] for v in C.cpu_variants()], "running", C.cpu_isa())'
  stage gpu_tests 60 bash -c '"$py" -c "import spkern; print(\"spkern\", spkern.__version__, \"imports\")" && peers_found'
else
  # the CUDA extension, built in place (16 cores)
  stage build 150 env MAX_JOBS=16 "$py" setup.py -q build_ext --inplace
  stage gpu_tests 100 "$py" -m pytest -q -x tests/test_gpu.py
fi
# benchmarks: the issue's targets first (cross-entropy and fused linear cross-entropy in
# bfloat16 against the peers), then float32, the optimizer step, the norms, the tracker.
# Caps are estimates for an H200 (no GPU has run them yet); the benchmarks print each row as
# it is measured, so a stage cut at its cap still logs the rows it finished. With the stages
# above: 590 s, one device command, about 12 minutes of budget with the machine's start.
ce_impls="torch eager,torch.compile,Liger Kernel,quack,spkern,spkern triton +stats,spkern cuda +stats"
stage bench_ce_bfloat16 90 bench bench_cross_entropy.py --dtype bfloat16 --impls "$ce_impls"
stage bench_lce_bfloat16 80 bench bench_linear_cross_entropy.py --dtype bfloat16
stage bench_ce_float32 60 bench bench_cross_entropy.py --impls "$ce_impls"
stage bench_optim 30 bench bench_optim.py
stage bench_norms 20 bench bench_norms.py
stage bench_tracker 35 bench bench_tracker.py --widths 2048,8192
echo "gpu_run.sh: done in $((SECONDS - total_start)) s; stages in $out/stages.tsv"
cat "$out/stages.tsv"
