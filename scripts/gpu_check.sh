#!/usr/bin/env bash
# dac_fast device check: everything a lent GPU machine should verify, in one command that fits the lease
# (one H200, 15 minutes of device time including the machine's start, at most 10 minutes a command, at most
# 8 files back).
#
#   bash scripts/gpu_check.sh [--budget S] OUT              on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --rehearse [--budget S] OUT   on a CPU machine (CI): the same plan in a venv like the device's
#
# The device as lent: python3 3.12 with torch 2.11.0+cu130, transformers 5.17.0, pytest, ninja, nvcc 13.0 and
# compute-sanitizer; no soundfile, soxr, pyloudnorm, ray or scipy; no network; 16 cores. PYTHON overrides python3.
# The run's wall-clock budget is --budget S, else GPU_CHECK_BUDGET, else 540 s (run it with the device tool's
# timeout_s at 600); a step never runs past what is left of it.
#
# The plan (DEVICE_PLAN below: step:estimate:cap), in order of value. Estimates are for the H200 (16 cores,
# cold caches); each step runs under its cap (`timeout`), its partial output merged into OUT every 10 s:
#
#   step          est  cap   what
#   plan            0    2   the arithmetic below checked (estimates under PLAN_TARGET, caps within the budget)
#   env             5   10   card, driver, CUDA runtime, cuDNN, torch, transformers, nvcc, compute-sanitizer;
#                            FAILS when torch sees no GPU (then every GPU step is skipped, loudly)
#   build          90  120   dac_fast._C for sm_90 (DAC_FAST_BUILD=cuda, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16);
#                            FAILS unless the loaded extension has CUDA kernels
#   kernel_cases    8   15   scripts/kernel_cases.py: every kernel through torch.ops.dac_fast on small shapes
#   model_parity   50   65   pytest -k model_cuda: tests/test_cuda_graphs.py FIRST (graph capture/replay, the
#                            code that has never run anywhere), then DacModel vs transformers on the GPU (fp32,
#                            TF32 off: codes identical, decode within 1e-4) in tests/test_ops_cuda.py
#   agreement      15   25   scripts/cuda_agreement.py: streams, padded batches, graphs vs offline/eager as
#                            measured agreement (codes equal %, max abs diff); fails only below its bounds
#   op_tests       35   40   tests/test_ops_cuda.py (every op test on CUDA) + tests/test_op_devices.py
#   memcheck       20   30   compute-sanitizer memcheck  } of scripts/kernel_cases.py only, filtered to our
#   racecheck      20   30   compute-sanitizer racecheck } kernels (--kernel-name kns=dac_fast), no pytest,
#   synccheck      12   20   compute-sanitizer synccheck } no transformers
#   bench_model   130  150   44khz forward 10 s, batch 16 and 1, in one warm process per side: transformers eager,
#                            ours fp32 and bf16, ours fp32 cuda_graphs=True (B16), transformers + torch.compile
#                            (B16 only, compile time reported, last); codes agreement beside each; row by row
#   bench_kernels  18   23   benchmarks/bench_kernels.py on CUDA (no torch.compile column)
#   (packing)       5   10   the last summary and log archive
#                 ---  ---
#                 408  540   (PLAN_TARGET 500: the estimates leave ~90 s of margin inside it)
#
# The review of the first plan (issue 18), point by point:
#   1. sanitizers hit their caps in pytest+torch+cuDNN, and library errors failed them: FIXED. They run
#      scripts/kernel_cases.py (torch.ops.dac_fast only, small shapes) filtered to our kernels with
#      --kernel-name kns=dac_fast (retried unfiltered, and said so, if this compute-sanitizer lacks the option);
#      synccheck added; each estimated well under its cap.
#   2. bench_model could not finish (a process per side per case, torch.compile on every case): FIXED.
#      --isolation warm (one process per side), torch.compile only at batch 16 (--compile-batches), last.
#   3. model_parity tight, CUDA-graph tests last: FIXED. Graph tests first; the stream and padded-batch
#      comparisons moved to the agreement step; cap 65 for an estimated 50.
#   4. stream / padded-batch exactness counted as failures: FIXED. scripts/cuda_agreement.py reports codes
#      equal % and max abs diff; only wrong shapes, NaN/Inf, codes < 99.9% or audio > 1e-3 off fail.
#   5. graph cache of 4 entries re-captured every graph of a 6-shape tiled call: FIXED. dac_fast/cuda_graphs.py
#      sizes it per network to the most shapes one call has used; tests/test_cuda_graphs.py counts captures.
#   6. graph key without autocast, dtype, cuDNN flags; global capture error mode: FIXED. kernel_settings()
#      (autocast state and dtype, cuDNN flags, deterministic mode, reduced-precision flags; dtypes in the
#      argument key); capture_error_mode="thread_local".
#   7. a GPU torch cannot see gave a green summary: FIXED. env fails and the GPU steps are skipped as such;
#      build fails without CUDA kernels; a pytest step whose CUDA tests were skipped fails.
#   8. fixed TOTAL_BUDGET, partial output lost when killed: FIXED. --budget / GPU_CHECK_BUDGET; summary.md and
#      logs.tar.gz (the running step's partial tables and log tail included) rewritten every 10 s.
#
# OUT (best empty) gets 2 files, rewritten every 10 s and after every step so that a killed run still returns
# what it found (plus, for a moment, their .part temporaries: at most 4 files, within the 8 that come back):
#   summary.md       date, commit, card, driver, CUDA runtime, cuDNN, torch at the top; one row per step
#                    (estimate, cap, status, seconds, detail); the measured tables; the failing tests and the
#                    tail of each failing (or running) step's log
#   logs.tar.gz      every step's log, the pytest junit XML and the benchmarks' JSON/markdown
# Exit status: 0 when no step failed (skips are not failures), 1 otherwise, 2 for a usage error.
#
# --rehearse: the same plan on this CPU machine with the same commands, so the script, the build on the device's
# torch and the lazy imports are exercised in CI (`make test`). CUDA-only steps (the sanitizers) are reported
# as skipped; the pytest steps run and skip their CUDA tests; kernel_cases and agreement run on the CPU; one
# extra step, cpu_tests, runs the CPU twins (transformers parity on CPU, the import test with the optional
# packages blocked, the device checks of the op front ends); the benchmarks run tiny CPU versions. Then the
# rehearsal checks the plan itself: kill_drill runs a step that writes partial output and outlives its cap,
# and plan_checks verifies that it was killed and reported, that the summary stayed valid, and that every
# step has its row in summary.md and its log in logs.tar.gz. Its interpreter is a venv of python 3.12
# (pyenv's, or REHEARSE_PYTHON) with torch==2.11.0, transformers==5.17.0, pytest, ninja and numpy from PyPI
# (about 4.6 GB, about 5 minutes to install once), kept at REHEARSE_VENV (default
# ~/.cache/dac_fast/rehearse-venv, outside the clone so that CI's fresh clones reuse it) and rebuilt when the
# pinned set changes. The rehearsal's own caps (2 shared cores) are in REHEARSE_CAPS below.
set -u -o pipefail

PLAN_TARGET=500
PACK_RESERVE=10
DEVICE_PLAN="plan:0:2 env:5:10 build:90:120 kernel_cases:8:15 model_parity:50:65 agreement:15:25 op_tests:35:40
  memcheck:20:30 racecheck:20:30 synccheck:12:20 bench_model:130:150 bench_kernels:18:23"
PACK_ESTIMATE=5
REHEARSE_CAPS="venv:900 plan:5 env:60 build:900 kernel_cases:180 model_parity:180 agreement:240 op_tests:180
  cpu_tests:420 memcheck:0 racecheck:0 synccheck:0 bench_model:300 bench_kernels:180 kill_drill:4 plan_checks:30"
REHEARSE_SPEC="torch==2.11.0 transformers==5.17.0 pytest ninja numpy"

usage() {
  echo "usage: $0 [--rehearse] [--budget SECONDS] OUT" >&2
  exit 2
}
REHEARSE=0
DEFAULT_BUDGET=540
TOTAL_BUDGET="${GPU_CHECK_BUDGET:-$DEFAULT_BUDGET}"
while [ $# -gt 1 ]; do
  case "$1" in
    --rehearse) REHEARSE=1; shift ;;
    --budget) TOTAL_BUDGET="${2:-}"; shift 2 || usage ;;
    *) usage ;;
  esac
done
[ $# -eq 1 ] || usage
case "$TOTAL_BUDGET" in
  ''|*[!0-9]*) echo "gpu_check.sh: the budget (--budget or GPU_CHECK_BUDGET) must be whole seconds, got '$TOTAL_BUDGET'" >&2; exit 2 ;;
esac
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dac_fast_gpu_check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
rm -f "$OUT/summary.md" "$OUT/logs.tar.gz" "$OUT/.summary.md.part" "$OUT/.logs.tar.gz.part"

RUN_START=$(date +%s)
DEADLINE=$((RUN_START + TOTAL_BUDGET))

plan_field() {  # plan_field STEP N: the step's estimate (N=2) or cap (N=3) in DEVICE_PLAN; empty if absent
  local entry
  for entry in $DEVICE_PLAN; do
    if [ "${entry%%:*}" = "$1" ]; then echo "$entry" | cut -d: -f"$2"; return; fi
  done
}

cap_of() {  # the step's cap on this run: the device plan's, or REHEARSE_CAPS' in a rehearsal
  local kv
  if [ $REHEARSE -eq 0 ]; then
    plan_field "$1" 3
    return
  fi
  for kv in $REHEARSE_CAPS; do
    if [ "${kv%%:*}" = "$1" ]; then echo "${kv#*:}"; return; fi
  done
  echo 0
}

check_plan() {  # the device plan's arithmetic; prints it, returns 1 when it does not hold
  local entry name est cap est_total=$PACK_ESTIMATE cap_total=$PACK_RESERVE ok=0
  printf '%-14s %5s %5s\n' step est cap
  for entry in $DEVICE_PLAN; do
    IFS=: read -r name est cap <<<"$entry"
    printf '%-14s %5s %5s\n' "$name" "$est" "$cap"
    est_total=$((est_total + est))
    cap_total=$((cap_total + cap))
    if [ "$est" -gt "$cap" ]; then echo "step $name: estimate $est s over its cap $cap s"; ok=1; fi
  done
  printf '%-14s %5s %5s\n' "(packing)" "$PACK_ESTIMATE" "$PACK_RESERVE" total "$est_total" "$cap_total"
  if [ "$est_total" -ge "$PLAN_TARGET" ]; then
    echo "the estimates add up to $est_total s, not under the plan's target of $PLAN_TARGET s"; ok=1
  fi
  if [ "$cap_total" -gt "$DEFAULT_BUDGET" ]; then
    echo "the caps add up to $cap_total s, over the default budget of $DEFAULT_BUDGET s"; ok=1
  elif [ "$cap_total" -gt "$TOTAL_BUDGET" ]; then
    echo "note: the caps add up to $cap_total s, over this run's $TOTAL_BUDGET s budget: the last steps will be cut or skipped"
  fi
  echo "estimated ${est_total} s of the ${PLAN_TARGET} s target; caps ${cap_total} s$([ "$cap_total" -le "$TOTAL_BUDGET" ] \
    && echo ' within' || echo ', OVER') the ${TOTAL_BUDGET} s budget"
  return $ok
}

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
ROWS=()      # "| step | est | cap | status | seconds | detail |" rows of summary.md
FAILED=0
HEADER=()    # summary lines under the title (filled by the env step)
CURRENT=""   # the step running now (shown in the summary while it runs)
TABLES="agreement bench_model bench_kernels kill_drill"  # steps whose WORK/NAME.md is a summary section

step_detail() {  # the line that says how a step went: pytest's summary, the sanitizer's, or the last line
  local log="$1"
  local d
  d="$(grep -E '^=* ?[0-9]+ (passed|failed|skipped|error)|^=* ?no tests ran|ERROR SUMMARY|RACECHECK SUMMARY|kernel cases ok|comparisons within bounds' "$log" 2>/dev/null \
       | tail -n 2 | sed -E 's/=+//g; s/^ +| +$//g' | tr '|' '/' | paste -sd ';' - | sed 's/;/; /g')"
  [ -z "$d" ] && d="$(grep -v -e '^\s*$' -e '^=== \[' "$log" 2>/dev/null | tail -n 1 | cut -c1-160 | tr '|' '/')"
  echo "$d"
}

log_excerpt() {  # log_excerpt TITLE LOG: a summary section with the log's failing tests and its tail
  echo
  echo "## $1 (full log in logs.tar.gz)"
  echo
  echo '```'
  grep -E '^(FAILED|ERROR) |^=========  *(Invalid|Race|Barrier|Error)|FAIL' "$2" | head -n 30
  echo "..."
  tail -n 25 "$2" | cut -c1-300
  echo '```'
}

write_summary() {
  local tmp="$OUT/.summary.md.part" now elapsed part log name
  now=$(date +%s)
  elapsed=$((now - RUN_START))
  {
    if [ $REHEARSE -eq 1 ]; then echo "# dac_fast device check: REHEARSAL on the CPU (no GPU)"; else echo "# dac_fast device check"; fi
    echo
    for line in "${HEADER[@]}"; do echo "- $line"; done
    if [ -n "$CURRENT" ]; then
      echo "- state: RUNNING step '$CURRENT' (elapsed ${elapsed} s of the ${TOTAL_BUDGET} s budget)"
    else
      echo "- state: finished in ${elapsed} s (budget ${TOTAL_BUDGET} s); $([ $FAILED -eq 0 ] && echo 'no step failed' || echo 'SOME STEPS FAILED')"
    fi
    echo
    echo "| step | est s | cap s | status | s | detail |"
    echo "|---|---:|---:|---|---:|---|"
    for row in "${ROWS[@]}"; do echo "$row"; done
    [ -n "$CURRENT" ] && echo "| $CURRENT | $(plan_field "$CURRENT" 2) | $(cap_of "$CURRENT") | RUNNING | | |"
    for part in $TABLES; do
      if [ -s "$WORK/$part.md" ]; then
        echo
        echo "## $part$([ "$part" = "$CURRENT" ] && echo ' (partial: still running)')"
        echo
        sed -E 's/^# /### /' "$WORK/$part.md"
      fi
    done
    for log in "$WORK"/*.log; do
      [ -f "$log" ] || continue
      name="$(basename "$log" .log)"
      if [ "$name" = "$CURRENT" ]; then
        log_excerpt "$name: running" "$log"
      elif grep -q "^=== \[$name\] \(FAIL\|TIMEOUT\)" "$log"; then
        log_excerpt "$name: failures" "$log"
      fi
    done
  } >"$tmp"
  mv -f "$tmp" "$OUT/summary.md"
}

pack_logs() {
  (cd "$WORK" && tar -czf "$OUT/.logs.tar.gz.part" --exclude='*.d' --exclude='bench_model_out' . 2>/dev/null) \
    && mv -f "$OUT/.logs.tar.gz.part" "$OUT/logs.tar.gz"
}

merge_outputs() {  # OUT as of now: the summary and the logs, partial ones included
  write_summary
  pack_logs
}

record() {  # record NAME CAP STATUS SECONDS DETAIL
  ROWS+=("| $1 | $(plan_field "$1" 2) | $2 | $3 | $4 | $5 |")
  echo "=== [$1] $3 in $4 s${5:+: $5}"
  CURRENT=""
  merge_outputs
}

skip_step() {  # skip_step NAME REASON
  echo "=== [$1] skipped: $2" >"$WORK/$1.log"
  record "$1" "$(cap_of "$1")" "skipped" 0 "$2"
}

cuda_tests_skipped() {  # on the device, a pytest log whose CUDA tests skipped for want of a GPU or kernels
  [ $REHEARSE -eq 0 ] && grep -qE "^SKIPPED .*(no CUDA GPU|needs a CUDA device|has no CUDA kernels)" "$1"
}

# run_step NAME CMD...: CMD (a program or an exported function) under the step's cap, clamped to what is left
# of the budget; its output goes to WORK/NAME.log. timeout signals the whole process group (benchmark
# children included). While it runs, OUT is refreshed every 10 s (its partial tables and log tail).
run_step() {
  local name="$1"
  shift
  local cap left log="$WORK/$name.log" start rc status secs detail pid waited=0
  cap="$(cap_of "$name")"
  left=$((DEADLINE - $(date +%s) - PACK_RESERVE))
  if [ $REHEARSE -eq 0 ] && [ "$left" -lt "$cap" ]; then
    cap=$left
    if [ "$cap" -lt 5 ]; then
      skip_step "$name" "no time left in the ${TOTAL_BUDGET} s budget"
      return 1
    fi
  fi
  CURRENT="$name"
  echo "=== [$name] (cap ${cap} s) $*" | tee "$log"
  merge_outputs
  start=$(date +%s)
  timeout -k 5 "$cap" bash -c '"$@"' run_step "$@" >>"$log" 2>&1 &
  pid=$!
  STEP_PID=$pid  # timeout leads its own process group: stop_run signals it
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    waited=$((waited + 1))
    [ $((waited % 10)) -eq 0 ] && merge_outputs
  done
  wait "$pid"
  rc=$?
  secs=$(($(date +%s) - start))
  detail="$(step_detail "$log")"
  [ -s "$WORK/$name.md" ] && detail="$detail; table below"
  if [ $rc -eq 0 ] && cuda_tests_skipped "$log"; then
    status="FAIL (CUDA tests skipped on the device)"
    FAILED=1
  elif [ $rc -eq 0 ]; then
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
  [ "$status" = pass ]
}

# Stopped from outside (SIGTERM, SIGINT; SIGKILL cannot be caught: the 10 s refreshes cover it): the running
# step's processes are stopped, and OUT says what happened.
STEP_PID=""
stop_run() {
  [ -n "$STEP_PID" ] && kill -TERM -- "-$STEP_PID" 2>/dev/null
  local name="$CURRENT"
  FAILED=1
  [ -n "$name" ] && record "$name" "$(cap_of "$name")" "STOPPED from outside" $(($(date +%s) - ${start:-$RUN_START})) "the run was signalled"
  merge_outputs
  exit 1
}
trap stop_run TERM INT

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
export PY SANITIZER WORK OUT

# ------------------------------------------------------------------------------------------ plan
export -f check_plan plan_field
export DEVICE_PLAN PLAN_TARGET PACK_ESTIMATE PACK_RESERVE TOTAL_BUDGET DEFAULT_BUDGET
run_step plan check_plan

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
  local report
  report="$("$PY" - <<'EOF'
import importlib.metadata as md
import platform

import torch

print("python_version:", platform.python_version())
print("torch:", torch.__version__, "| GPU available", torch.cuda.is_available())
print("cuda_runtime:", torch.version.cuda)
print("cudnn:", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu:", torch.cuda.get_device_name(0), f"| sm_{p.major}{p.minor} | {p.total_memory / 2**30:.0f} GiB |",
          p.multi_processor_count, "SMs")
for name in ("transformers", "numpy", "pytest", "ninja", "setuptools", "soundfile", "soxr", "pyloudnorm", "ray", "tqdm"):
    try:
        print(f"package {name}:", md.version(name))
    except md.PackageNotFoundError:
        print(f"package {name}: not installed")
EOF
)"
  echo "$report"
  echo "nvcc: $("${CUDA_HOME:-/nonexistent}/bin/nvcc" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not found')"
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  echo "MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=$CUDA_HOME nproc=$(nproc)"
  # the report above already asked torch (each torch import costs seconds of the lease)
  if [ $REHEARSE -eq 0 ] && ! grep -q '| GPU available True' <<<"$report"; then
    echo "NO GPU: torch.cuda.is_available() is False on the device (driver, container or CUDA build?): every GPU step is skipped"
    return 1
  fi
}
export -f env_report
export REHEARSE

run_step env env_report
ENV_LOG="$WORK/env.log"
field() { sed -n "s/^$1: //p" "$ENV_LOG" | head -n 1; }
CARD="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
HEADER=(
  "date: $(date -u -d "@$RUN_START" '+%Y-%m-%d %H:%M:%S UTC') (start); commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  "card: ${CARD:-none}${CARD:+ (name, driver, memory)}$(field gpu | sed 's/^/; torch sees /')"
  "CUDA runtime (torch): $(field cuda_runtime); cuDNN: $(field cudnn); torch: $(field torch)"
  "python $(field python_version); $(field 'package transformers' | sed 's/^/transformers /')"
  "nvcc: $(field nvcc); compute-sanitizer: ${SANITIZER:-not found}; runtime: $(container_runtime); cores: $(nproc)"
)
[ $REHEARSE -eq 1 ] && HEADER+=("rehearsal venv: $VENV ($REHEARSE_SPEC; base $BASE_PY)")
HAS_GPU="$(grep -q '| GPU available True' "$ENV_LOG" && echo 1 || echo 0)"
[ "$HAS_GPU" = 1 ] || HEADER+=("**NO GPU visible to torch**$([ $REHEARSE -eq 1 ] && echo ' (expected in a rehearsal)' || echo ': the GPU steps are skipped and the run FAILS')")
merge_outputs

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
assert '$BUILD_MODE' != 'cuda' or 'cuda' in s['devices'], 'the extension loaded without CUDA kernels'
"
}
export -f build_ext
GPU_STEPS="kernel_cases model_parity agreement op_tests memcheck racecheck synccheck bench_model bench_kernels"
if ! run_step build build_ext; then
  for step in $GPU_STEPS; do skip_step "$step" "the build failed"; done
  exit 1
fi
if [ $REHEARSE -eq 0 ] && [ "$HAS_GPU" != 1 ]; then
  for step in $GPU_STEPS; do skip_step "$step" "NO GPU visible to torch (see env)"; done
  exit 1
fi

# ------------------------------------------------------------------------------------------ tests
if [ $REHEARSE -eq 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
run_step kernel_cases "$PY" scripts/kernel_cases.py --device "$DEVICE"
# -v: a step cut by its cap still shows which tests ran; -p no:cacheprovider: nothing written into the tree.
# model_parity: the CUDA-graph tests first (the code that has never run anywhere), then transformers parity
PYTEST=("$PY" -m pytest -v -rfEs -p no:cacheprovider)
run_step model_parity "${PYTEST[@]}" --junitxml="$WORK/model_parity.xml" tests/test_cuda_graphs.py \
  tests/test_ops_cuda.py -k model_cuda
run_step agreement "$PY" scripts/cuda_agreement.py --device "$DEVICE" --markdown "$WORK/agreement.md" \
  --json "$WORK/agreement.json"
run_step op_tests "${PYTEST[@]}" --junitxml="$WORK/op_tests.xml" tests/test_ops_cuda.py tests/test_op_devices.py -k "not model_cuda"
if [ $REHEARSE -eq 1 ]; then
  run_step cpu_tests "${PYTEST[@]}" --junitxml="$WORK/cpu_tests.xml" tests/test_imports.py \
    "tests/test_model.py::test_encode_decode_forward_match_transformers[44khz]"
fi

# compute-sanitizer over scripts/kernel_cases.py: our launches only (the kernel-name filter), no pytest or
# transformers; torch's own API probing is not counted (--report-api-errors no)
sanitize() {  # sanitize TOOL
  local tool="$1" rc filter=(--kernel-name kns=dac_fast) cache=()
  [ "$tool" = memcheck ] && cache=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)  # out-of-bounds past an allocation's end is seen
  run_sanitizer() {
    "${cache[@]}" "$SANITIZER" --tool "$tool" "$@" --report-api-errors no --error-exitcode 99 --print-limit 20 \
      "$PY" scripts/kernel_cases.py --device cuda
  }
  run_sanitizer "${filter[@]}"
  rc=$?
  if [ $rc -ne 0 ] && grep -qiE "unrecognized option|unknown option|invalid (option|filter).*kernel" "$WORK/$tool.log"; then
    echo "this compute-sanitizer does not take --kernel-name kns=: rerun UNFILTERED (errors may be NVIDIA's libraries')"
    run_sanitizer
    rc=$?
  fi
  if [ $rc -ne 0 ] && grep -qiE "device not supported|no supported device|unable to (find|initialize)|not supported on this platform" \
       "$WORK/$tool.log" 2>/dev/null; then
    echo "compute-sanitizer refused the device (runtime: $(container_runtime))"
  fi
  return $rc
}
export -f sanitize
for tool in memcheck racecheck synccheck; do
  if [ $REHEARSE -eq 1 ]; then
    skip_step $tool "CUDA only (rehearsal)"
  elif [ -z "$SANITIZER" ]; then
    skip_step $tool "compute-sanitizer not found"
  elif [ "$(container_runtime)" = "gVisor" ]; then
    skip_step $tool "gVisor runtime: compute-sanitizer refuses the device there"
  else
    run_step $tool sanitize $tool
  fi
done

# ------------------------------------------------------------------------------------------ benchmarks
# forward = encode + decode, so every figure has its code agreement (and decode SNR) beside it; one warm
# process per side; the markdown is rewritten after every row, so a cut run still shows what it measured
if [ $REHEARSE -eq 1 ]; then
  MODEL_ARGS=(--device cpu --batch-sizes 1 --seconds 0.25 --warmup 0 --repeats 1)
  KERNEL_ARGS=(--device cpu --small --repeats 2 --warmup 1 --no-compile)
else
  MODEL_ARGS=(--device cuda --batch-sizes 16 1 --seconds 10 --warmup 1 --repeats 3 --cuda-graphs-batches 16
              --compile --compile-batches 16 --timeout 100)
  KERNEL_ARGS=(--device cuda --repeats 10 --warmup 2 --no-compile)
fi
run_step bench_model "$PY" benchmarks/bench_model.py --presets 44khz --ops forward --dtypes fp32 bf16 \
  --allocator tuned --isolation warm "${MODEL_ARGS[@]}" --out "$WORK/bench_model_out" --tag check \
  --markdown "$WORK/bench_model.md" --json "$WORK/bench_model.json"
run_step bench_kernels "$PY" benchmarks/bench_kernels.py "${KERNEL_ARGS[@]}" --json "$WORK/bench_kernels.json" \
  --markdown "$WORK/bench_kernels.md"

# ------------------------------------------------------------------------------------------ the plan itself (rehearsal)
# kill_drill: a step that writes a partial table, then outlives its cap; plan_checks: it was killed and
# reported, the summary stayed valid, and every step left its row in summary.md and its log in logs.tar.gz
kill_drill() {
  printf '# kill drill\n\n| row |\n|---|\n| written before the kill |\n' >"$WORK/kill_drill.md"
  echo "partial output written; now outliving the cap"
  sleep 60
}
plan_checks() {
  local step missing=0 listing
  listing="$(tar -tzf "$OUT/logs.tar.gz")" || { echo "logs.tar.gz does not list"; return 1; }
  for step in $(echo "$DEVICE_PLAN" | tr ' ' '\n' | cut -d: -f1) cpu_tests kill_drill; do
    grep -q "^| $step |" "$OUT/summary.md" || { echo "no summary row for step $step"; missing=1; }
    echo "$listing" | grep -qx "./$step.log" || { echo "no log of step $step in logs.tar.gz"; missing=1; }
  done
  grep -q '^| kill_drill | .* | TIMEOUT (cap [0-9]* s) |' "$OUT/summary.md" || { echo "kill_drill was not reported as killed at its cap"; missing=1; }
  grep -q '^| written before the kill |' "$OUT/summary.md" || { echo "the killed step's partial table is not in the summary"; missing=1; }
  head -n 1 "$OUT/summary.md" | grep -q '^# dac_fast device check' || { echo "summary.md lost its title"; missing=1; }
  grep -q '^| step | est s | cap s | status | s | detail |$' "$OUT/summary.md" || { echo "summary.md lost its step table"; missing=1; }
  [ $missing -eq 0 ] && echo "plan checks ok: every step reported and logged; the killed step's row and partial table kept"
  return $missing
}
export -f kill_drill plan_checks
if [ $REHEARSE -eq 1 ]; then
  failed_before=$FAILED
  run_step kill_drill kill_drill
  FAILED=$failed_before  # its TIMEOUT is the drill's expected outcome; plan_checks judges it
  run_step plan_checks plan_checks
fi

CURRENT=""
merge_outputs
cat "$OUT/summary.md"
exit $FAILED
