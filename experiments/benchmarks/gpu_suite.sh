#!/usr/bin/env bash
# Every GPU row of experiments/benchmarks/README.md in one command, for the first lent GPU (one H200 through the
# device tool), within 8 minutes of device time; and the same rows at tiny shapes on this CPU (--dry-run).
#
#   bash experiments/benchmarks/gpu_suite.sh --prepare    # here, once: wheels the GPU machine lacks -> .whl/
#   bash experiments/benchmarks/gpu_suite.sh              # there: device tool run, carry [".whl"], timeout_s 570
#   bash experiments/benchmarks/gpu_suite.sh --dry-run    # here: every row on the CPU at tiny shapes (~2.5 min)
#
# Options: --out=DIR (default $OUT when set, else experiments/benchmarks/results/gpu; --dry-run: a new temporary
# directory), --rows=a,b (a subset, in that order), --budget=SECONDS (the whole run, start-up included; default
# 480, dry run 1800), --inject-failure=ROW (that row gets an unknown flag and fails: the failure path, for tests).
#
# What it does: installs the carried wheels that the machine lacks or has older (gpu_suite_check.py select) into
# a private --target folder on PYTHONPATH, with the repository itself (no pip install -e); records our
# requirements against what is installed; then runs the rows in order of importance, each under `timeout` with
# the smaller of its cap and what is left of the budget (a row is skipped when under 30 s is left), continuing
# past a failed, timed-out or unknown row. Rows with worker subprocesses (train_step, sampler, compile_time) get
# per-worker timeouts that leave their driver time to write its file, so a slow side is recorded as such.
# Writes at most 8 files into the output folder: one results JSON per row, suite.json (every row's status, time,
# command and key figures; versions; the GPU) and suite.log (everything printed); prints the summary table last.
#
# GPU rows (one H200, bf16 unless said), caps in seconds (estimates before any GPU run; compile times dominate):
#   parity        45  parity.py: ours vs transformers on the device in fp32 and bf16, judged against float64
#   train_step   190  released per-layer shapes, 6 layers (one 5:1 period), full SFT, prompt 256 + canvas 256,
#                     batch 8, bf16 params: step time and MFU against transformers (README: --layers=2,6 and
#                     LoRA too; one depth and one mode fit the lease, MFU is a per-layer figure)
#   sampler      150  released shapes, all 30 layers (~50 GB), denoising forward at batch 1 and 8 against the
#                     memory-bandwidth floor (the generate part is the generate row's)
#   moe           50  one MoE layer at released shapes, 8192 tokens: dense, grouped, expert-parallel (dropless,
#                     capacity 1.25, ragged all-to-all) on a 1x1 mesh
#   compile_time  90  released widths, 6 and 30 layers, full SFT: trace + lower and XLA compile time
#   generate      75  generate.py preset gpu at batch 8: same checkpoint, ours vs transformers' generate
# Sum 600 s against a 480 s budget: the caps are upper bounds (each row's workers may use about half of its cap,
# compiling included), so the first four rows (the issue's figures) always get theirs and compile_time and
# generate run on what those leave; a row cut by the budget is recorded as skipped or timeout: rerun it with
# --rows=compile_time,generate in a second call.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$REPO/experiments/benchmarks"
PY="${PYTHON:-python3}"
MODE=gpu
ROWS="parity,train_step,sampler,moe,compile_time,generate"
OUTDIR=""
BUDGET=""
INJECT=""
SITE="${GPU_SUITE_SITE:-/tmp/gpu_suite_site}"
MIN_ROW_S=30

for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry-run ;;
    --prepare) MODE=prepare ;;
    --out=*) OUTDIR="${arg#*=}" ;;
    --rows=*) ROWS="${arg#*=}" ;;
    --budget=*) BUDGET="${arg#*=}" ;;
    --inject-failure=*) INJECT="${arg#*=}" ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

# --------------------------------------------------------------------------------------------------- prepare
prepare() {
  # The pip download of the device README: CPython 3.12, x86-64 manylinux (any glibc up to the image's), no deps
  # (gpu_suite_check.py's CARRIED names the closure), at the versions installed here.
  cd "$REPO" || return 1
  git check-ignore -q .whl/probe.whl || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
  local specs platforms=() n tmp
  specs=$("$PY" "$HERE/gpu_suite_check.py" carry) || return 1
  for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  tmp=$(mktemp -d)
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$tmp" $specs || return 1
  mkdir -p .whl
  for wheel in "$tmp"/*.whl; do
    rm -f ".whl/$(basename "$wheel" | cut -d- -f1)"-*.whl  # one version of each distribution
    mv "$wheel" .whl/
  done
  rmdir "$tmp"
  ls -l .whl
  du -cb .whl/*.whl | tail -1 \
    | awk '{printf "carried wheels: %.1f MiB (the travelling tree is limited to 64 MiB)\n", $1 / 2^20}'
}

# ------------------------------------------------------------------------------------------------------ rows
# row_args NAME OUTFILE TIMEOUT: the row's command line (after the interpreter). Per-worker timeouts leave 20 s
# of the row's own for the driver's start-up and its results file.
row_args() {
  local name=$1 out=$2 timeout=$3 worker=$(( ($3 - 20) / 2 ))
  (( worker < 10 )) && worker=10
  local B="$HERE"
  if [[ $MODE == gpu ]]; then
    case "$name" in
      parity) echo "$B/parity.py --size=small --output=$out" ;;
      train_step) echo "$B/train_step.py --preset=released --layers=6 --modes=full --prompt=256 --canvas=256 \
--batch=8 --dtype=bfloat16 --param_dtype=bfloat16 --warmup=1 --repeats=3 --timeout=$worker --output=$out" ;;
      sampler) echo "$B/sampler.py --preset=released --layers=30 --dtype=bfloat16 --batch_sizes=1,8 \
--parts=forward --repeats=5 --timeout=$worker --output=$out" ;;
      moe) echo "$B/moe.py --preset=gpu --json=$out" ;;
      compile_time) echo "$B/compile_time.py --preset=released --layers=6,30 --modes=full --dtype=bfloat16 \
--param_dtype=bfloat16 --prompt=256 --canvas=256 --batch=8 --timeout=$worker --output=$out" ;;
      generate) echo "$B/generate.py --preset=gpu --batch_sizes=8 --repeats=2 --json=$out" ;;
      *) return 1 ;;
    esac
  else
    case "$name" in
      parity) echo "$B/parity.py --size=tiny --device=cpu --output=$out" ;;
      train_step) echo "$B/train_step.py --preset=tiny --layers=1 --modes=full --prompt=8 --canvas=8 --batch=1 \
--warmup=0 --repeats=1 --threads=1 --device=cpu --timeout=$worker --output=$out" ;;
      sampler) echo "$B/sampler.py --preset=tiny --layers=1 --batch_sizes=1 --canvas=16 --prompt=8 --parts=forward \
--repeats=1 --threads=1 --device=cpu --timeout=$worker --output=$out" ;;
      moe) echo "$B/moe.py --preset=cpu --model=tiny --tokens=16 --repeats=1 \
--variants=dense,grouped,expert_parallel,expert_parallel@1.25,expert_parallel_ragged --json=$out" ;;
      compile_time) echo "$B/compile_time.py --preset=tiny --layers=1 --modes=full --prompt=8 --canvas=8 --batch=1 \
--threads=1 --timeout=$worker --output=$out" ;;
      generate) echo "$B/generate.py --preset=tiny --batch_sizes=1 --canvas_length=16 --max_new_tokens=16 \
--prompt_length=8 --steps=2 --repeats=1 --threads=1 --torch_device=cpu --json=$out" ;;
      *) return 1 ;;
    esac
  fi
}

row_cap() {
  if [[ $MODE == dry-run ]]; then echo 300; return; fi
  case "$1" in
    parity) echo 45 ;; train_step) echo 190 ;; sampler) echo 150 ;; moe) echo 50 ;; compile_time) echo 90 ;;
    generate) echo 75 ;; *) echo 0 ;;
  esac
}

# record NAME STATUS EXIT SECONDS TIMEOUT RESULTS COMMAND: one tab-separated line for the summary.
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/rows.tsv"; }

run_row() {
  local name=$1 file="$1.json" cap left timeout args began code status seconds
  cap=$(row_cap "$name")
  if ! args=$(row_args "$name" "$OUTDIR/$file" "$cap"); then
    echo "=== $name: unknown row (known: parity, train_step, sampler, moe, compile_time, generate)"
    record "$name" unknown "" "" "" "" ""
    return
  fi
  left=$(( BUDGET - ($(date +%s) - START) ))
  timeout=$(( cap < left ? cap : left ))
  if (( timeout < MIN_ROW_S )); then
    echo "=== $name: skipped, ${left} s of the budget left"
    record "$name" skipped "" "" "$timeout" "" ""
    return
  fi
  args=$(row_args "$name" "$OUTDIR/$file" "$timeout")
  [[ $name == "$INJECT" ]] && args="$args --gpu_suite_injected_failure"
  local env=()
  # generate.py runs JAX and torch on the device in one process: JAX must not take 75% of it up front.
  [[ $name == generate ]] && env+=(XLA_PYTHON_CLIENT_PREALLOCATE=false)
  echo "=== $name (timeout ${timeout} s): $PY $args"
  rm -f "$OUTDIR/$file"
  began=$(date +%s.%N)
  # shellcheck disable=SC2086
  env ${env[@]+"${env[@]}"} timeout --kill-after=10 "$timeout" "$PY" $args
  code=$?
  seconds=$(awk -v a="$began" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $code in
    0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;;
  esac
  echo "=== $name: $status (exit $code) after $seconds s"
  [[ -f "$OUTDIR/$file" ]] || file=""
  record "$name" "$status" "$code" "$seconds" "$timeout" "$file" "$PY $args"
}

suite() {
  echo "GPU suite ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET} s, output $OUTDIR"
  cd "$REPO" || return 1
  local gpu=""
  if command -v nvidia-smi > /dev/null; then
    gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader \
          | head -1)
    nvidia-smi
  fi
  : > "$WORK/installed.txt"
  if [[ -d .whl ]]; then
    "$PY" "$HERE/gpu_suite_check.py" select .whl > "$WORK/installed.txt"
    if [[ -s "$WORK/installed.txt" ]]; then
      echo "installing the carried wheels this machine lacks: $(xargs -n1 basename < "$WORK/installed.txt" | xargs)"
      # shellcheck disable=SC2046
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
          $(cat "$WORK/installed.txt") || echo "WARNING: installing the carried wheels failed"
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
  elif [[ $MODE == gpu ]]; then
    echo "WARNING: no .whl/ (run --prepare here and carry .whl): the machine's own packages only"
  fi
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$REPO" PYTHONUNBUFFERED=1
  [[ $MODE == dry-run ]] && export JAX_PLATFORMS=cpu
  echo "requirements:"
  "$PY" "$HERE/gpu_suite_check.py" packages "$WORK/packages.json"
  # Our package imports, and JAX sees the accelerator (else every JAX row would quietly time the CPU).
  local jax_line
  jax_line=$(XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -c 'import diffusion_gemma, jax
print(f"diffusion_gemma imports; jax {jax.__version__}, backend {jax.default_backend()}: {jax.devices()}")' 2>&1 \
             | tail -1)
  echo "$jax_line"
  local row
  IFS=',' read -r -a rows <<< "$ROWS"
  for row in "${rows[@]}"; do
    run_row "$row"
  done
  "$PY" "$HERE/gpu_suite_check.py" summary --rows "$WORK/rows.tsv" --out "$OUTDIR" --packages "$WORK/packages.json" \
      --installed "$WORK/installed.txt" --mode "$MODE" --started "$STARTED" --started_epoch "$START" \
      --budget "$BUDGET" --gpu "$gpu" --jax "$jax_line"
}

if [[ $MODE == prepare ]]; then
  prepare
  exit $?
fi
if [[ -z $OUTDIR ]]; then
  if [[ $MODE == dry-run ]]; then OUTDIR=$(mktemp -d -t gpu_suite_dry_run.XXXXXX)
  else OUTDIR="${OUT:-$REPO/experiments/benchmarks/results/gpu}"; fi
fi
[[ -z $BUDGET ]] && { [[ $MODE == dry-run ]] && BUDGET=1800 || BUDGET=480; }
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d -t gpu_suite.XXXXXX)
: > "$WORK/rows.tsv"
START=$(date +%s)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
suite 2>&1 | tee "$OUTDIR/suite.log"
code=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$code"
