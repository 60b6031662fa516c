#!/usr/bin/env bash
# Saves the peers' wheels for the GPU machine, which has no package registry, under .whl/
# (ignored by git), for bench/gpu_run.sh to install from there:
#
#   bash bench/peer_wheels.sh [--with-quack] [folder]       (default folder: .whl)
#
# The wheels are for that machine's Python (3.12, x86-64); --no-deps: its torch and triton
# are used. Liger Kernel and cut-cross-entropy are pure Python (1 MB together). quack is
# left out unless asked for: it needs NVIDIA's CUTLASS DSL runtime, whose wheel is 92 MB
# (64 MB even recompressed with xz -9), more than one device call carries with the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
quack=0
if [ "${1:-}" = "--with-quack" ]; then quack=1; shift; fi
dest=${1:-.whl}
peers=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
if [ $quack = 1 ]; then
  peers+=(quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
          nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5)
fi
mkdir -p "$dest"
${PYTHON:-python3} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dest" "${peers[@]}"
ls -l "$dest"
echo "carry '$dest' in the device call; bench/gpu_run.sh installs every wheel in it"
