#!/usr/bin/env bash
# One-shot check on a machine with a GPU: build the CUDA kernels, run the GPU tests and the CUDA cases
# of the test suite, a short training run, then the CUDA benchmarks. Run from the repository root;
# logs and results go to $OUT (default ./gpu-out). Every stage is bounded so that the whole script
# ends within IIC_DEADLINE_S seconds (default 540) and leaves what it measured behind.
#   IIC_GPU_TESTS_ONLY=1   a short check: tests/gpu and tests/test_views.py, no benchmarks
#   IIC_SUITE=cuda|all|0   the suite's CUDA cases (default), the whole suite, or none
#   IIC_EXT_LARGE_TESTS=0  skip the >2^31-element tests (default on; they skip themselves below
#                          ~48 GiB of free GPU memory)
#   IIC_BENCH_VIEWS_FULL=0 skip the last stage, the full clip-op benchmark (it runs in the time left)
#   IIC_BENCH_VIEWS_QUICK=1 also the clip ops in --quick before it
#   IIC_BENCH_VIEWS_FIRST=1 the full clip-op benchmark first (at most 150 s), then NCE and the step
#   IIC_PROFILE_NCE=1      after the NCE and step benchmarks, python -m benchmarks.profile_nce (60 s at most)
set -uo pipefail
export PYTHONUNBUFFERED=1 IIC_EXT_LARGE_TESTS=${IIC_EXT_LARGE_TESTS:-1}
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
t0=$(date +%s)
DEADLINE=$(( t0 + ${IIC_DEADLINE_S:-540} ))
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }
# seconds for a stage: its cap, or what is left before the deadline (minus a margin), if less
budget() { local left=$(( DEADLINE - $(date +%s) - 10 )); [ "$left" -lt "$1" ] && echo "$(( left > 1 ? left : 1 ))" || echo "$1"; }
status=0

stamp "machine"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
cmake --version | head -1
echo "nvcc: $(command -v nvcc || echo none)"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
"$PY" -c "import pytest, hypothesis, setuptools" || echo "pytest, hypothesis or setuptools is missing: later stages will fail"

# The toolkit root: the first candidate holding both nvcc and the runtime headers (nvcc on PATH may
# be a wrapper script outside the toolkit, which CMake's FindCUDA would mistake for the root).
pick_cuda_home() {
  local nvcc cand
  nvcc=$(command -v nvcc || true)
  for cand in "${CUDA_HOME:-}" "${CUDA_PATH:-}" \
      "$( [ -n "$nvcc" ] && dirname "$(dirname "$(readlink -f "$nvcc")")")" \
      "$( [ -n "$nvcc" ] && sed -n 's|^exec \(/[^ ]*\)/bin/nvcc.*|\1|p' "$nvcc" 2>/dev/null)" \
      /usr/local/cuda /usr/local/cuda-13.0; do
    if [ -n "$cand" ] && [ -x "$cand/bin/nvcc" ] && [ -f "$cand/include/cuda_runtime.h" ]; then
      (cd "$cand" && pwd)
      return
    fi
  done
}
CUDA_HOME=$(pick_cuda_home)
echo "CUDA_HOME=${CUDA_HOME:-not found}"
if [ -z "$CUDA_HOME" ]; then
  echo "no CUDA toolkit found: cannot build the CUDA kernels"
  exit 1
fi
export CUDA_HOME CUDA_PATH="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH"
# torch's CMake config links nvrtc; a minimal toolkit may lack it while the torch wheel ships one.
if ! ls "$CUDA_HOME"/lib64/libnvrtc.so "$CUDA_HOME"/lib/libnvrtc.so "$CUDA_HOME"/targets/*/lib/libnvrtc.so >/dev/null 2>&1; then
  NVRTC=$("$PY" - <<'PY'
import glob, os, torch
base = os.path.dirname(os.path.dirname(torch.__file__))
hits = sorted(glob.glob(os.path.join(base, "nvidia", "**", "libnvrtc.so*"), recursive=True))
print(next((h for h in hits if "builtins" not in h and ".alt." not in h), ""))
PY
)
  if [ -n "$NVRTC" ]; then
    mkdir -p "$OUT/.nvrtc" && ln -sf "$NVRTC" "$OUT/.nvrtc/libnvrtc.so"
    export CMAKE_LIBRARY_PATH="$OUT/.nvrtc${CMAKE_LIBRARY_PATH:+:$CMAKE_LIBRARY_PATH}"
    echo "nvrtc from the torch wheel: $NVRTC"
  fi
fi

stamp "build (log: build.log)"
export IIC_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if ! timeout "$(budget 300)" "$PY" -m pip install -v --no-build-isolation --no-index --no-deps . >"$OUT/build.log" 2>&1; then
  echo "pip install failed (tail of build.log below); trying an in-place build"
  tail -40 "$OUT/build.log"
  if ! "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"
    stamp "build failed"
    exit 1
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # nothing installed: use the in-place build
fi
stamp "built"
grep -E "building|nvcc|error" "$OUT/build.log" | grep -v "^ *-" | tail -5

# Run from outside the checkout so the installed package is imported (setup.py also copies the
# library into the source iic_ext/, so either import finds the same build).
stamp "import check"
(cd "$OUT" && "$PY" - <<'PY'
import torch, iic_ext
from iic_ext import ops
print("iic_ext from", iic_ext.__file__, "HAS_C", ops.HAS_C, ops._library.LOAD_ERROR)
names = ["residual_frames", "temporal_gather", "iic_views", "bank_scores", "iic_scores", "iic_softmax_loss", "bank_update_"]
for key in ("CPU", "CUDA"):
    print(key, [n for n in names if hasattr(torch.ops.iic_ext, n) and torch._C._dispatch_has_kernel_for_dispatch_key(f"iic_ext::{n}", key)])
x = torch.randint(0, 256, (2, 3, 4, 5, 5), dtype=torch.uint8, device="cuda")
torch.testing.assert_close(ops.residual_frames(x), ops.reference.residual_frames(x))
print("CUDA residual_frames matches the reference")
PY
) 2>&1 | tee "$OUT/import.log" || status=1

# A C++ exception raised by the library (a bad argument) must reach Python as a RuntimeError. On an
# image whose process-wide libstdc++ is not the one the extension was compiled against, it kills the
# process instead; preloading the compiler's libstdc++ fixes that, so do it for the tests, loudly.
PROBE='import torch, iic_ext
try:
    torch.ops.iic_ext.residual_frames(torch.zeros(3, 5, 4, 4))
except RuntimeError:
    print("ok")'
if [ "$(cd "$OUT" && "$PY" -c "$PROBE" 2>/dev/null)" != "ok" ]; then
  LIBSTDCXX=$(g++ -print-file-name=libstdc++.so.6 2>/dev/null || true)
  if [ -f "$LIBSTDCXX" ] && [ "$(cd "$OUT" && LD_PRELOAD="$LIBSTDCXX" "$PY" -c "$PROBE" 2>/dev/null)" = "ok" ]; then
    export LD_PRELOAD="$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}"
    echo "WARNING: a C++ exception from iic_ext crashes Python here unless libstdc++ is preloaded;" \
      "running the tests with LD_PRELOAD=$LIBSTDCXX" | tee -a "$OUT/import.log"
  else
    echo "WARNING: a C++ exception from iic_ext crashes Python here: bad-input tests will crash" | tee -a "$OUT/import.log"
    status=1
  fi
fi

stamp "GPU tests (log: tests_gpu.log)"
timeout "$(budget 240)" "$PY" -m pytest -q -p no:cacheprovider -rfE --durations=10 --maxfail=30 tests/gpu 2>&1 | tee "$OUT/tests_gpu.log" || status=1

SUITE_MODE=${IIC_SUITE:-cuda}
if [ "$SUITE_MODE" != "0" ]; then
  stamp "test suite, $SUITE_MODE (log: tests.log)"
  if [ "${IIC_GPU_TESTS_ONLY:-0}" = "1" ]; then
    SUITE=(tests/test_views.py)
  elif [ "$SUITE_MODE" = "all" ]; then
    SUITE=(tests --ignore=tests/gpu)
  else
    SUITE=(tests --ignore=tests/gpu -k cuda)
  fi
  timeout "$(budget 120)" "$PY" -m pytest -q -p no:cacheprovider -rfE --maxfail=30 "${SUITE[@]}" 2>&1 | tee "$OUT/tests.log" || status=1
fi

# Benchmarks on CUDA, full runs: the NCE and whole-step groups, then the clip ops with whatever time
# is left (IIC_BENCH_VIEWS_QUICK=1: the clip ops in --quick first). Each run writes its results after
# every group, so a run cut by its timeout keeps the groups it finished.
bench() {  # bench NAME CAP ARGS...
  local name=$1 cap=$2; shift 2
  stamp "benchmarks $name (log: bench-$name.log)"
  timeout "$(budget "$cap")" "$PY" -m benchmarks --device cuda --out "$OUT/bench-$name" "$@" 2>&1 | tee "$OUT/bench-$name.log" || status=1
}
views_full() {
  if [ "${IIC_BENCH_VIEWS_FULL:-1}" = "1" ] && [ $(( DEADLINE - $(date +%s) )) -gt 60 ]; then
    bench views-full "$1" --only residual,negatives,views
  fi
}
if [ "${IIC_GPU_TESTS_ONLY:-0}" != "1" ] && [ -f benchmarks/__main__.py ]; then
  # IIC_BENCH_VIEWS_FIRST=1: the clip ops first (capped at 150 s), for a run whose NCE rows are current
  if [ "${IIC_BENCH_VIEWS_FIRST:-0}" = "1" ]; then
    views_full 150
  fi
  bench full 200 --only nce,step
  if [ "${IIC_PROFILE_NCE:-0}" = "1" ]; then
    stamp "NCE profile (log: profile-nce.txt)"
    timeout "$(budget 60)" "$PY" -m benchmarks.profile_nce --device cuda >"$OUT/profile-nce.txt" 2>&1 || status=1
    grep "^== " "$OUT/profile-nce.txt"
  fi
  if [ "${IIC_BENCH_VIEWS_QUICK:-0}" = "1" ]; then
    bench quick 100 --quick --only residual,negatives,views
  fi
  if [ "${IIC_BENCH_VIEWS_FIRST:-0}" != "1" ]; then
    views_full 600
  fi
fi

stamp "done (status $status)"
exit $status
