#!/usr/bin/env bash
# dac_fast device check: everything a lent GPU machine should verify, in one command that fits the lease
# (one H200, 15 minutes of device time including the machine's start, at most 10 minutes a command, at most
# 8 files back).
#
#   bash scripts/gpu_check.sh OUT              on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --rehearse OUT   on a CPU machine (CI): the same steps in a venv like the device's
#
# The device as lent: python3 3.12 with torch 2.11.0+cu130, transformers 5.17.0, pytest, ninja, nvcc 13.0 and
# compute-sanitizer; no soundfile, soxr, pyloudnorm or ray; no network; 16 cores. PYTHON overrides python3.
#
# Steps, in order of value. Each runs under its own `timeout` cap (seconds); the caps add up to 540 s, the
# whole run's wall-clock budget including the build, and a step never runs past what is left of it:
#
#   step           cap   what
#   env             15   card, driver, torch, transformers, nvcc, compute-sanitizer, container runtime (gVisor?)
#   build          120   dac_fast._C with CUDA kernels in place (DAC_FAST_BUILD=cuda, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)
#   op_tests        60   CUDA op tests: tests/test_ops_cuda.py (tests/test_ops.py on CUDA) + tests/test_op_devices.py
#   model_parity    75   DacModel on the GPU vs transformers on the GPU, fp32, TF32 off: codes identical, decode close;
#                        streams vs offline and padded batches vs items alone on the GPU; cuda_graphs=True equal to
#                        eager, host synchronisations of encode/decode (tests/test_cuda_graphs.py)
#   memcheck        50   compute-sanitizer memcheck over the kernel tests (--report-api-errors no)
#   racecheck       30   compute-sanitizer racecheck over the kernel tests (--report-api-errors no)
#   bench_kernels   30   benchmarks/bench_kernels.py on CUDA (no torch.compile column)
#   bench_model    150   benchmarks/bench_model.py: 44khz forward, 10 s, batch 16 then 1; transformers eager,
#                        ours fp32 and bf16, ours fp32 with cuda_graphs=True (batch 16 only), then transformers +
#                        torch.compile; code agreement beside each figure
#   (packing)     (10)   reserve for the last summary and log archive
#                 ----
#                  540
#
# OUT (best empty) gets 2 files, both rewritten after every step so that a killed run still returns what it found
# (plus, for a moment, their .part temporaries: at most 4 files, within the 8 that come back):
#   summary.md       card, driver, torch version and date at the top; one row per step; benchmark tables;
#                    the failing tests and the tail of each failing step's log
#   logs.tar.gz      every step's log, the pytest junit XML and the benchmarks' JSON/markdown
# Exit status: 0 when no step failed (skips are not failures), 1 otherwise, 2 for a usage error.
#
# --rehearse: the same steps on this CPU machine with the same commands, so the script, the build on the device's
# torch and the lazy imports are exercised in CI (`make test`). CUDA-only steps (memcheck, racecheck) are
# reported as skipped; the op and parity tests run and skip their CUDA tests; one extra step, cpu_tests, runs
# the CPU twins (transformers parity on CPU, the import test with the optional packages blocked, the device
# checks of the op front ends); the benchmarks run tiny CPU versions. Its interpreter is a venv of python 3.12
# (pyenv's, or REHEARSE_PYTHON) with torch==2.11.0, transformers==5.17.0, pytest, ninja and numpy from PyPI
# (about 4.6 GB, about 5 minutes to install once), kept at REHEARSE_VENV (default
# ~/.cache/dac_fast/rehearse-venv, outside the clone so that CI's fresh clones reuse it) and rebuilt when the
# pinned set changes. The rehearsal's own caps (2 shared cores) are in REHEARSE_CAPS below.
set -u -o pipefail

TOTAL_BUDGET=540
PACK_RESERVE=10
DEVICE_CAPS="env:15 build:120 op_tests:60 model_parity:75 memcheck:50 racecheck:30 bench_kernels:30 bench_model:150"
REHEARSE_CAPS="venv:900 env:60 build:900 op_tests:180 model_parity:120 cpu_tests:420 memcheck:0 racecheck:0 bench_kernels:180 bench_model:300"
REHEARSE_SPEC="torch==2.11.0 transformers==5.17.0 pytest ninja numpy"

usage() {
  echo "usage: $0 [--rehearse] OUT" >&2
  exit 2
}
REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then
  REHEARSE=1
  shift
fi
[ $# -eq 1 ] || usage
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dac_fast_gpu_check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
rm -f "$OUT/summary.md" "$OUT/logs.tar.gz" "$OUT/.summary.md.part" "$OUT/.logs.tar.gz.part"

RUN_START=$(date +%s)
DEADLINE=$((RUN_START + TOTAL_BUDGET))
CAPS="$DEVICE_CAPS"
[ $REHEARSE -eq 1 ] && CAPS="$REHEARSE_CAPS"

cap_of() {
  local kv
  for kv in $CAPS; do
    if [ "${kv%%:*}" = "$1" ]; then echo "${kv#*:}"; return; fi
  done
  echo 0
}

device_caps_total() {
  local kv total=0
  for kv in $DEVICE_CAPS; do total=$((total + ${kv#*:})); done
  echo $((total + PACK_RESERVE))
}
if [ "$(device_caps_total)" -gt "$TOTAL_BUDGET" ]; then
  echo "gpu_check.sh: the device step caps add up to $(device_caps_total) s, over the $TOTAL_BUDGET s budget" >&2
  exit 2
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [ $REHEARSE -eq 1 ]; then
  export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
else
  export MAX_JOBS="${MAX_JOBS:-16}"
fi
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
export CUDA_HOME="${CUDA_HOME:-}"
[ -n "$CUDA_HOME" ] && export PATH="$CUDA_HOME/bin:$PATH"

SANITIZER=""
for cand in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" "$(command -v compute-sanitizer 2>/dev/null)" \
            "${CUDA_HOME:-/nonexistent}/compute-sanitizer/compute-sanitizer"; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then SANITIZER="$cand"; break; fi
done

# ------------------------------------------------------------------------------------------ bookkeeping
ROWS=()      # "| step | cap | status | seconds | detail |" rows of summary.md
FAILED=0
HEADER=()    # summary lines under the title (filled by the env step)
CURRENT=""   # the step running now (shown in the summary while it runs)

step_detail() {  # the line that says how a step went: pytest's summary, the sanitizer's, or the last line
  local log="$1"
  local d
  d="$(grep -E '^=* ?[0-9]+ (passed|failed|skipped|error)|^=* ?no tests ran|ERROR SUMMARY|RACECHECK SUMMARY' "$log" 2>/dev/null \
       | tail -n 2 | sed -E 's/=+//g; s/^ +| +$//g' | tr '|' '/' | paste -sd ';' - | sed 's/;/; /g')"
  [ -z "$d" ] && d="$(grep -v -e '^\s*$' -e '^=== \[' "$log" 2>/dev/null | tail -n 1 | cut -c1-160 | tr '|' '/')"
  echo "$d"
}

write_summary() {
  local tmp="$OUT/.summary.md.part" now elapsed
  now=$(date +%s)
  elapsed=$((now - RUN_START))
  {
    if [ $REHEARSE -eq 1 ]; then echo "# dac_fast device check: REHEARSAL on the CPU (no GPU)"; else echo "# dac_fast device check"; fi
    echo
    for line in "${HEADER[@]}"; do echo "- $line"; done
    if [ -n "$CURRENT" ]; then
      echo "- state: RUNNING step '$CURRENT' (elapsed ${elapsed} s)"
    else
      echo "- state: finished in ${elapsed} s (budget on the device: ${TOTAL_BUDGET} s); $([ $FAILED -eq 0 ] && echo 'no step failed' || echo 'SOME STEPS FAILED')"
    fi
    echo
    echo "| step | cap s | status | s | detail |"
    echo "|---|---:|---|---:|---|"
    for row in "${ROWS[@]}"; do echo "$row"; done
    for part in bench_kernels bench_model; do
      if [ -s "$WORK/$part.md" ]; then
        echo
        echo "## $part"
        echo
        sed -E 's/^# /### /' "$WORK/$part.md"
      fi
    done
    local log name
    for log in "$WORK"/*.log; do
      [ -f "$log" ] || continue
      name="$(basename "$log" .log)"
      grep -q "^=== \[$name\] \(FAIL\|TIMEOUT\)" "$log" || continue
      echo
      echo "## $name: failures (full log in logs.tar.gz)"
      echo
      echo '```'
      grep -E '^(FAILED|ERROR) ' "$log" | head -n 30
      echo "..."
      tail -n 25 "$log" | cut -c1-300
      echo '```'
    done
  } >"$tmp"
  mv -f "$tmp" "$OUT/summary.md"
}

pack_logs() {
  (cd "$WORK" && tar -czf "$OUT/.logs.tar.gz.part" --exclude='*.d' --exclude='bench_model_out' . 2>/dev/null) \
    && mv -f "$OUT/.logs.tar.gz.part" "$OUT/logs.tar.gz"
}

record() {  # record NAME CAP STATUS SECONDS DETAIL
  ROWS+=("| $1 | $2 | $3 | $4 | $5 |")
  echo "=== [$1] $3 in $4 s${5:+: $5}"
  CURRENT=""
  write_summary
  pack_logs
}

skip_step() {  # skip_step NAME REASON
  local cap
  cap="$(cap_of "$1")"
  record "$1" "$cap" "skipped" 0 "$2"
}

# run_step NAME CMD...: CMD (a program or an exported function) under the step's cap, clamped to what is left
# of the device budget; its output goes to WORK/NAME.log. timeout signals the whole process group (benchmark
# children included).
run_step() {
  local name="$1"
  shift
  local cap left log="$WORK/$name.log" start rc status secs detail
  cap="$(cap_of "$name")"
  if [ $REHEARSE -eq 0 ]; then
    left=$((DEADLINE - $(date +%s) - PACK_RESERVE))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 5 ]; then
      record "$name" "$(cap_of "$name")" "skipped" 0 "no time left in the ${TOTAL_BUDGET} s budget"
      return 1
    fi
  fi
  CURRENT="$name"
  write_summary
  echo "=== [$name] (cap ${cap} s) $*" | tee "$log"
  start=$(date +%s)
  timeout -k 5 "$cap" bash -c '"$@"' run_step "$@" >>"$log" 2>&1
  rc=$?
  secs=$(($(date +%s) - start))
  detail="$(step_detail "$log")"
  [ -s "$WORK/$name.md" ] && detail="results in the $name table below"
  if [ $rc -eq 0 ]; then
    status="pass"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="TIMEOUT (cap ${cap} s)"
    FAILED=1
  else
    status="FAIL (rc $rc)"
    FAILED=1
  fi
  echo "=== [$name] $status in $secs s" >>"$log"
  record "$name" "$(cap_of "$name")" "$status" "$secs" "$detail"
  [ $rc -eq 0 ]
}

# ------------------------------------------------------------------------------------------ rehearsal venv
find_python312() {
  local cand root
  if [ -n "${REHEARSE_PYTHON:-}" ]; then echo "$REHEARSE_PYTHON"; return; fi
  root="${PYENV_ROOT:-$HOME/.pyenv}"
  command -v pyenv >/dev/null 2>&1 && root="$(pyenv root 2>/dev/null || echo "$root")"
  for cand in $(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r) "$(command -v python3.12 2>/dev/null)"; do
    if [ -n "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$cand"
      return
    fi
  done
  return 1
}

make_rehearse_venv() {  # (re)creates $VENV unless its stamp says it holds $REHEARSE_SPEC for this base python
  local base="$1" stamp="$2" tmp="$VENV.part.$$"
  if [ -f "$VENV/.dac_fast-stamp" ] && [ "$(cat "$VENV/.dac_fast-stamp")" = "$stamp" ] \
     && "$VENV/bin/python" -c "import torch, transformers, pytest, numpy" 2>/dev/null; then
    echo "reusing $VENV ($stamp)"
    return 0
  fi
  echo "creating $VENV: $stamp"
  rm -rf "$tmp" && mkdir -p "$(dirname "$VENV")" || return 1
  "$base" -m venv "$tmp" || return 1
  # shellcheck disable=SC2086
  "$tmp/bin/python" -m pip install --no-cache-dir --progress-bar off $REHEARSE_SPEC || return 1
  echo "$stamp" >"$tmp/.dac_fast-stamp"
  rm -rf "$VENV" && mv "$tmp" "$VENV"
  du -sh "$VENV"
}
export -f make_rehearse_venv

if [ $REHEARSE -eq 1 ]; then
  export VENV="${REHEARSE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dac_fast/rehearse-venv}" REHEARSE_SPEC
  if ! BASE_PY="$(find_python312)"; then
    record venv "$(cap_of venv)" "FAIL" 0 "no python 3.12 found (pyenv versions/3.12*, python3.12 on PATH, or set REHEARSE_PYTHON)"
    exit 1
  fi
  STAMP="$("$BASE_PY" -c 'import sys; print(sys.version.split()[0])') $REHEARSE_SPEC"
  run_step venv make_rehearse_venv "$BASE_PY" "$STAMP" || exit 1
  PY="$VENV/bin/python"
else
  PY="${PYTHON:-python3}"
fi
export PY SANITIZER WORK

# ------------------------------------------------------------------------------------------ env
container_runtime() {  # gVisor's kernel says so in dmesg and reports version 4.4.0; compute-sanitizer refuses the device there
  if dmesg 2>/dev/null | grep -qi gvisor || grep -qi gvisor /proc/version 2>/dev/null || [ "$(uname -r)" = "4.4.0" ]; then
    echo "gVisor"
  else
    echo "not gVisor (kernel $(uname -r))"
  fi
}
export -f container_runtime

env_report() {
  date -u
  uname -a
  echo "runtime: $(container_runtime)"
  echo "python: $PY"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import importlib.metadata as md
import platform

import torch

print("python_version:", platform.python_version())
print("torch:", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version(),
      "| GPU available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu:", torch.cuda.get_device_name(0), f"| sm_{p.major}{p.minor} | {p.total_memory / 2**30:.0f} GiB")
for name in ("transformers", "numpy", "pytest", "ninja", "setuptools", "soundfile", "soxr", "pyloudnorm", "ray", "tqdm"):
    try:
        print(f"package {name}:", md.version(name))
    except md.PackageNotFoundError:
        print(f"package {name}: not installed")
EOF
  echo "nvcc: $("${CUDA_HOME:-/nonexistent}/bin/nvcc" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not found')"
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  echo "MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=$CUDA_HOME nproc=$(nproc)"
}
export -f env_report

run_step env env_report
ENV_LOG="$WORK/env.log"
field() { sed -n "s/^$1: //p" "$ENV_LOG" | head -n 1; }
CARD="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
HEADER=(
  "date: $(date -u -d "@$RUN_START" '+%Y-%m-%d %H:%M:%S UTC') (start); commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  "card: ${CARD:-none}$([ -n "$CARD" ] && echo ' (name, driver, memory)')"
  "torch: $(field torch); python $(field python_version); $(field 'package transformers' | sed 's/^/transformers /')"
  "nvcc: $(field nvcc); compute-sanitizer: ${SANITIZER:-not found}; runtime: $(container_runtime); cores: $(nproc)"
)
[ $REHEARSE -eq 1 ] && HEADER+=("rehearsal venv: $VENV ($REHEARSE_SPEC; base $BASE_PY)")
write_summary
HAS_GPU="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"

# ------------------------------------------------------------------------------------------ build
export BUILD_MODE=cuda
if [ $REHEARSE -eq 1 ]; then
  # the device's build (CUDA kernels for sm_90 on the device's torch) where nvcc is; REHEARSE_BUILD=cpu saves
  # CI the nvcc time; without nvcc, the CPU kernels only
  BUILD_MODE="${REHEARSE_BUILD:-cuda}"
  [ -z "$CUDA_HOME" ] && BUILD_MODE=cpu
fi
build_ext() {
  DAC_FAST_BUILD=$BUILD_MODE "$PY" setup.py build_ext --inplace || return 1
  "$PY" -c "
from dac_fast import ops
s = ops.extension_status()
print('extension:', s)
assert s['loaded'], s
"
}
export -f build_ext
if ! run_step build build_ext; then
  for s in op_tests model_parity cpu_tests memcheck racecheck bench_kernels bench_model; do
    [ $REHEARSE -eq 0 ] && [ "$s" = cpu_tests ] && continue
    skip_step "$s" "the build failed"
  done
  exit 1
fi

# ------------------------------------------------------------------------------------------ tests
# -v: a step cut by its cap still shows which tests ran; -p no:cacheprovider: nothing written into the tree
PYTEST=("$PY" -m pytest -v -rfEs -p no:cacheprovider)
run_step op_tests "${PYTEST[@]}" --junitxml="$WORK/op_tests.xml" tests/test_ops_cuda.py tests/test_op_devices.py -k "not model_cuda"
run_step model_parity "${PYTEST[@]}" --junitxml="$WORK/model_parity.xml" tests/test_ops_cuda.py \
  tests/test_streaming.py tests/test_cuda_graphs.py -k model_cuda
if [ $REHEARSE -eq 1 ]; then
  run_step cpu_tests "${PYTEST[@]}" --junitxml="$WORK/cpu_tests.xml" tests/test_imports.py tests/test_op_devices.py \
    "tests/test_model.py::test_encode_decode_forward_match_transformers[44khz]"
fi

# compute-sanitizer: the kernel tests only (no torch.compile, opcheck, gradcheck or 64-bit indexing: slow
# under instrumentation and not kernel bodies); torch's own API probing is not counted (--report-api-errors no)
SAN_SELECT="not compile and not opcheck and not gradcheck and not int64 and not real_shape and not model_cuda and not many_seeds"
RACE_SELECT="snake_fp32 or backward or add_snake or rvq_exact_identical or fast_agreement or rvq_decode_matches"
sanitize() {  # sanitize TOOL PYTEST-COMMAND...
  local tool="$1"
  shift
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --report-api-errors no --error-exitcode 99 \
    --print-limit 20 "$@"
  local rc=$?
  if [ $rc -ne 0 ] && grep -qiE "device not supported|no supported device|unable to (find|initialize)|not supported on this platform" \
       "$WORK/$tool.log" 2>/dev/null; then
    echo "compute-sanitizer refused the device (runtime: $(container_runtime))"
  fi
  return $rc
}
export -f sanitize
for tool in memcheck racecheck; do
  select="$SAN_SELECT"
  [ $tool = racecheck ] && select="($SAN_SELECT) and ($RACE_SELECT)"
  if [ $REHEARSE -eq 1 ]; then
    skip_step $tool "CUDA only (rehearsal)"
  elif [ "$HAS_GPU" != "1" ]; then
    skip_step $tool "no CUDA GPU visible to torch"
  elif [ -z "$SANITIZER" ]; then
    skip_step $tool "compute-sanitizer not found"
  elif [ "$(container_runtime)" = "gVisor" ]; then
    skip_step $tool "gVisor runtime: compute-sanitizer refuses the device there"
  else
    run_step $tool sanitize $tool "${PYTEST[@]}" -x tests/test_ops_cuda.py -k "$select"
  fi
done

# ------------------------------------------------------------------------------------------ benchmarks
if [ $REHEARSE -eq 1 ]; then
  KERNEL_ARGS=(--device cpu --small --repeats 2 --warmup 1 --no-compile)
  MODEL_ARGS=(--device cpu --batch-sizes 1 --seconds 0.25 --warmup 0 --repeats 1 --isolation case)
else
  KERNEL_ARGS=(--device cuda --repeats 10 --warmup 2 --no-compile)
  MODEL_ARGS=(--device cuda --batch-sizes 16 1 --seconds 10 --warmup 1 --repeats 3 --compile --timeout 120
              --cuda-graphs-batches 16)
fi
run_step bench_kernels "$PY" benchmarks/bench_kernels.py "${KERNEL_ARGS[@]}" --json "$WORK/bench_kernels.json" \
  --markdown "$WORK/bench_kernels.md"
# forward = encode + decode, so every figure has its code agreement (and decode SNR) beside it; --out/--tag
# name the files; the markdown is rewritten after every side, so a cut run still shows what it measured
run_step bench_model "$PY" benchmarks/bench_model.py --presets 44khz --ops forward --dtypes fp32 bf16 \
  --allocator tuned "${MODEL_ARGS[@]}" --out "$WORK/bench_model_out" --tag check --markdown "$WORK/bench_model.md" \
  --json "$WORK/bench_model.json"

CURRENT=""
write_summary
pack_logs
cat "$OUT/summary.md"
exit $FAILED
