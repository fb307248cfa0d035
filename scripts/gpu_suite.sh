#!/usr/bin/env bash
# GPU verification suite for dac_fast, for a machine with a CUDA GPU, torch already installed and
# no network:
#
#   scripts/gpu_suite.sh OUTDIR
#
# 1. records the environment (GPU, driver, torch, CUDA toolkit)
# 2. optionally installs wheels from $DAC_FAST_WHEELS (a directory, offline: pip --no-index)
# 3. builds dac_fast._C in place with the CUDA kernels (DAC_FAST_BUILD=cuda)
# 4. runs the whole pytest suite, CUDA tests included (tests needing soundfile/soxr/... skip)
# 5. runs compute-sanitizer memcheck and racecheck over the CUDA kernel tests
# 6. runs the kernel benchmarks and, when present, the model benchmarks
# 7. writes every log, the benchmark JSON/markdown and summary.md (a table of steps) into OUTDIR
#
# Each step has its own time limit so the suite finishes in about 10 minutes on an H100; a failing
# step is recorded and the suite goes on. Exit status: 0 when every step passed, 1 otherwise.
# Environment: PYTHON (interpreter; default .venv/bin/python if present, else python3),
# CUDA_HOME (default: /usr/local/cuda, else derived from nvcc), DAC_FAST_WHEELS, SKIP_BUILD=1.
set -u -o pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python)"
fi

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
export CUDA_HOME="${CUDA_HOME:-}"
export PATH="${CUDA_HOME:+$CUDA_HOME/bin:}$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
export PYTHONUNBUFFERED=1

SANITIZER=""
for cand in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" "$(command -v compute-sanitizer 2>/dev/null)" \
            /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then SANITIZER="$cand"; break; fi
done

SUMMARY="$OUT/summary.md"
STATUS_ROWS=()
FAILED=0
SUITE_START=$(date +%s)

# run_step NAME TIMEOUT_S CMD...: runs CMD with a time limit, log in OUT/NAME.log, records the row
run_step() {
  local name="$1" limit="$2"
  shift 2
  local log="$OUT/$name.log" start end rc status
  echo "=== [$name] $*" | tee "$log"
  start=$(date +%s)
  timeout --kill-after=20 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  end=$(date +%s)
  if [ $rc -eq 0 ]; then status="pass"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT (${limit}s)"; FAILED=1
  else status="FAIL (rc=$rc)"; FAILED=1
  fi
  local detail
  detail="$(grep -E '^(=+ )?[0-9]+ (passed|failed)|ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -n 2 | tr '\n' ' ' | tr '|' '/')"
  STATUS_ROWS+=("| $name | $status | $((end - start)) | ${detail:-} | $name.log |")
  echo "=== [$name] $status in $((end - start)) s" | tee -a "$log"
  return 0
}

skip_step() {
  STATUS_ROWS+=("| $1 | skipped | 0 | $2 | |")
  echo "=== [$1] skipped: $2"
}

# 1. environment
{
  date -u
  uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  echo "python: $PY"
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" 2>&1
  echo "CUDA_HOME=$CUDA_HOME"
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>&1 || echo "nvcc not found"
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|numpy|pytest|soundfile|soxr|safetensors|ninja) " || true
} >"$OUT/env.log" 2>&1
STATUS_ROWS+=("| env | recorded | 0 | | env.log |")

HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# 2. offline wheels (soundfile, soxr, ... when the image lacks them)
if [ -n "${DAC_FAST_WHEELS:-}" ] && [ -d "${DAC_FAST_WHEELS}" ]; then
  run_step install_wheels 300 "$PY" -m pip install --no-index --find-links "$DAC_FAST_WHEELS" --no-build-isolation \
    $(ls "$DAC_FAST_WHEELS"/*.whl 2>/dev/null)
fi

# 3. build in place with CUDA (arch list: the visible GPU; the default list when none is visible)
if [ "${SKIP_BUILD:-0}" = "1" ]; then
  skip_step build "SKIP_BUILD=1"
else
  run_step build 420 env DAC_FAST_BUILD=cuda "$PY" setup.py build_ext --inplace
fi
run_step import_check 60 "$PY" -c "
import torch
from dac_fast import ops
s = ops.extension_status()
print(s)
assert s['loaded'], s
assert (not torch.cuda.is_available()) or 'cuda' in s['devices'], 'no CUDA kernels in dac_fast._C'
"

# 4. the whole test suite (CUDA tests included)
run_step pytest_all 420 "$PY" -m pytest -q -rs --junitxml="$OUT/pytest_all.xml" tests

# 5. compute-sanitizer over the CUDA kernel tests (no torch.compile / opcheck under the sanitizer: slow)
if [ "$HAS_GPU" != "1" ]; then
  skip_step memcheck "no CUDA GPU"
  skip_step racecheck "no CUDA GPU"
elif [ -z "$SANITIZER" ]; then
  skip_step memcheck "compute-sanitizer not found"
  skip_step racecheck "compute-sanitizer not found"
else
  SAN_K="not compile and not opcheck and not int64 and not real_shape and not gradcheck"
  run_step memcheck 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 99 \
    --print-limit 50 "$PY" -m pytest -q -x tests/test_ops_cuda.py -k "$SAN_K"
  run_step racecheck 300 "$SANITIZER" --tool racecheck --error-exitcode 99 --print-limit 50 \
    "$PY" -m pytest -q -x tests/test_ops_cuda.py -k "($SAN_K) and (snake_fp32 or backward or rvq_exact_matches or fast_agreement or decode_matches)"
fi

# 6. benchmarks
if [ "$HAS_GPU" = "1" ]; then
  run_step bench_kernels 300 "$PY" benchmarks/bench_kernels.py --device cuda --repeats 10 --warmup 2 \
    --json "$OUT/bench_kernels.json" --markdown "$OUT/bench_kernels.md"
else
  run_step bench_kernels 300 "$PY" benchmarks/bench_kernels.py --tuned-allocator --small --repeats 2 --no-compile \
    --json "$OUT/bench_kernels.json" --markdown "$OUT/bench_kernels.md"
fi
if [ -f benchmarks/bench_model.py ]; then
  MODEL_ARGS=()
  MODEL_HELP="$("$PY" benchmarks/bench_model.py --help 2>/dev/null || true)"
  if grep -q -- "--quick" <<<"$MODEL_HELP"; then MODEL_ARGS+=(--quick); fi
  if grep -q -- "--out" <<<"$MODEL_HELP"; then MODEL_ARGS+=(--out "$OUT/bench_model"); fi
  if grep -q -- "--json" <<<"$MODEL_HELP"; then MODEL_ARGS+=(--json "$OUT/bench_model.json"); fi
  if [ "$HAS_GPU" = "1" ] && grep -q -- "--device" <<<"$MODEL_HELP"; then MODEL_ARGS+=(--device cuda); fi
  run_step bench_model 300 "$PY" benchmarks/bench_model.py "${MODEL_ARGS[@]}"
else
  skip_step bench_model "benchmarks/bench_model.py not present"
fi

# 7. summary
{
  echo "# dac_fast GPU suite"
  echo
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); total $(( $(date +%s) - SUITE_START )) s; root: $ROOT"
  echo "device: $("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>/dev/null)"
  echo "torch: $("$PY" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)" 2>/dev/null)"
  echo
  echo "| step | status | seconds | detail | log |"
  echo "|---|---|---|---|---|"
  for row in "${STATUS_ROWS[@]}"; do echo "$row"; done
  if [ -f "$OUT/bench_kernels.md" ]; then
    echo
    echo "## Kernel benchmarks"
    echo
    cat "$OUT/bench_kernels.md"
  fi
} >"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
