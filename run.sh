#!/usr/bin/env bash
# The quick start's two commands, with their own set-up:
#   ./run.sh demo [options]    the main job: the default sweep on digits and its report
#   ./run.sh test [pytest options]   the tests (default: every test not marked slow)
#   ./run.sh setup             only the set-up
# The demo writes under the current directory (runs/demo); the tests run in the checkout.
# The set-up makes .venv (with python3, or $PYTHON), installs requirements.txt into it and
# builds the C++ extension; a later call redoes only what is out of date: the packages when
# requirements.txt changed, the extension (incrementally) when csrc/ or setup.py changed.
# SPKERN_VENV=DIR puts the environment elsewhere.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
venv=${SPKERN_VENV:-$root/.venv}

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

say() { echo "run.sh: $*" >&2; }

fingerprint() {  # of the files given, by content
  cat "$@" | sha256sum | cut -d' ' -f1
}

setup() (  # a subshell: it works in the checkout, the command after it where it was called
  cd "$root"
  if command -v flock >/dev/null; then  # a second call waits for a set-up in progress
    exec 9>"$root/.run.sh.lock"
    flock 9
  fi
  local python=${PYTHON:-python3}
  if [ ! -x "$venv/bin/python" ]; then
    command -v "$python" >/dev/null || { say "no $python on PATH (set PYTHON to a Python >= 3.10)"; exit 2; }
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
      || { say "$python is $("$python" -V 2>&1); spkern needs Python >= 3.10 (set PYTHON)"; exit 2; }
    say "creating $venv with $("$python" -V 2>&1)"
    "$python" -m venv "$venv" || { rm -rf "$venv"
      say "$python -m venv failed (on Debian or Ubuntu: apt-get install python3-venv)"; exit 2; }
  fi
  local py=$venv/bin/python stamps=$venv/.spkern
  mkdir -p "$stamps"

  local want
  want=$(fingerprint requirements.txt)
  if [ "$(cat "$stamps/requirements" 2>/dev/null)" != "$want" ]; then
    say "installing requirements.txt into $venv (first time: about a minute)"
    "$py" -m pip install -qq -r requirements.txt
    echo "$want" > "$stamps/requirements"
  fi

  # The extension: built in place (spkern/_C*.so) with ninja in build/, so that a change
  # recompiles only the files it touches; the package itself is installed editable once.
  # (one interpreter start: the torch the extension is built against, and whether it loads)
  local torch_and_ext
  torch_and_ext=$("$py" -c 'import torch; print(torch.__version__)
try:
    import spkern._C
except ImportError:
    print("missing")' 2>/dev/null || true)
  want=$(fingerprint setup.py $(find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) | sort) \
         <(echo "${SPKERN_NO_CUDA:-} ${torch_and_ext%%$'\n'*}"))
  if [ "$(cat "$stamps/extension" 2>/dev/null)" != "$want" ] || [[ $torch_and_ext == *missing ]]; then
    say "building the C++ extension (from scratch: about three minutes on 2 cores, the CPU kernels once per instruction set; after a change: seconds)"
    local log=$stamps/build.log
    # the editable install (package list, the spkern command) again whenever setup.py changed
    if ! "$py" -m pip show -q spkern >/dev/null 2>&1 || [ "$(cat "$stamps/install" 2>/dev/null)" != "$(fingerprint setup.py)" ]; then
      SPKERN_SKIP_EXTENSION=1 "$py" -m pip install -qq --no-build-isolation --no-deps -e . >"$log" 2>&1 \
        || { cat "$log" >&2; say "the build failed (log: $log)"; exit 1; }
      fingerprint setup.py > "$stamps/install"
    fi
    # (the pinned ninja of the environment, as every later build there, a wheel's included: a
    # ninja of another version discards the log of the objects built, and rebuilds them all)
    PATH="$venv/bin:$PATH" "$py" setup.py -q build_ext --inplace >"$log" 2>&1 \
      || { cat "$log" >&2; say "the build failed (log: $log)"; exit 1; }
    "$py" -c 'import spkern._C as C; print("run.sh: spkern._C built; CPU kernels", ", ".join(v["isa"] for v in C.cpu_variants()) + ";", "this CPU runs", C.cpu_isa())' >&2
    echo "$want" > "$stamps/extension"
  fi
)

verb=${1:-}
[ $# -gt 0 ] && shift
case "$verb" in
  demo)  setup; exec "$venv/bin/python" -m spkern demo "$@" ;;
  test)  setup
         if [ $# -eq 0 ]; then set -- -q -m "not slow"; fi
         cd "$root"
         exec "$venv/bin/python" -m pytest "$@" ;;
  setup) setup ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
