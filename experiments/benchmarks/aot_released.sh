#!/usr/bin/env bash
# The released 26B-A4B model's programs compiled for TPU slices on this CPU host (python -m diffusion_gemma.aot):
# one JSON per row in experiments/benchmarks/results/aot/, the table in experiments/benchmarks/README.md
# ("TPU ahead-of-time compilation"). Rows whose file exists are skipped, so an interrupted run resumes where it
# stopped: each row is one or more full compiles of the 30-layer program (about 10 minutes each on a 2-core host).
#
#   bash experiments/benchmarks/aot_released.sh [ROW ...]      # default: every row, in this order
#   python experiments/benchmarks/aot_table.py                # the README tables from the files
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=experiments/benchmarks/results/aot
HLO=${AOT_HLO_DIR:-/tmp/diffusion_gemma_aot_hlo}
mkdir -p "$OUT"
LORA="--config=configs/gsm8k_lora.py --config.lora.rank=8 --config.lora.alpha=16"
SFT="--config=configs/gsm8k_sft.py"
declare -A ROWS=(
  [lora_v6e-8]="$LORA --topology=v6e-8"
  [sft_v6e-8]="$SFT --topology=v6e-8"
  [sft_v5p-16]="$SFT --topology=v5p-16"
  [sampler_v6e-8]="$LORA --topology=v6e-8 --programs=sampler --sampler_batch_sizes=1,8,64"
  [lora_v6e-8_mesh2x4]="$LORA --topology=v6e-8 --config.mesh.data=2 --config.mesh.expert=4"
  [lora_v6e-8_ragged]="$LORA --topology=v6e-8 --config.model.overrides.moe_impl=expert_parallel_ragged"
  [lora_v5p-8]="$LORA --topology=v5p-8"
  [sft_v5p-8]="$SFT --topology=v5p-8"
  [lora_v5p-16]="$LORA --topology=v5p-16"
  [lora_v6e-16]="$LORA --topology=v6e-16"
  [sft_v6e-16]="$SFT --topology=v6e-16"
  [sft_v6e-8_bf16_params]="$SFT --topology=v6e-8 --config.model.param_dtype=bfloat16"
  # Largest batch: a search from the recipe's batch (v5p-8), or from 16 where a row above already compiled batch 8;
  # a plain row at the next whole batch where that alone brackets it (full SFT fits a v5p-16 at 8 and nothing
  # else: is 16 too much there, and is a v5p-8's smallest whole batch, 4, still too much?).
  [max_batch_lora_v5p-8]="$LORA --topology=v5p-8 --find_max_batch --max_batch_by=sum"
  [max_batch_lora_v5p-16]="$LORA --topology=v5p-16 --find_max_batch --max_batch_by=sum --config.data.global_batch_size=16"
  [max_batch_lora_v6e-16]="$LORA --topology=v6e-16 --find_max_batch --max_batch_by=sum --config.data.global_batch_size=16"
  [lora_v6e-8_batch16]="$LORA --topology=v6e-8 --config.data.global_batch_size=16"
  [lora_v6e-8_batch24]="$LORA --topology=v6e-8 --config.data.global_batch_size=24"
  [sft_v5p-16_batch16]="$SFT --topology=v5p-16 --config.data.global_batch_size=16"
  [sft_v5p-8_batch4]="$SFT --topology=v5p-8 --config.data.global_batch_size=4"
  [sft_v6e-32]="$SFT --topology=v6e-32"
  [sft_v6e-16_batch1]="$SFT --topology=v6e-16 --config.data.global_batch_size=1"
)
ORDER=(lora_v6e-8 sft_v6e-8 sft_v5p-16 sampler_v6e-8 lora_v6e-8_mesh2x4 lora_v6e-8_ragged lora_v5p-8 sft_v5p-8
       lora_v5p-16 lora_v6e-16 sft_v6e-16 sft_v6e-8_bf16_params max_batch_lora_v5p-8 lora_v6e-8_batch16
       lora_v6e-8_batch24 sft_v5p-16_batch16 sft_v5p-8_batch4 max_batch_lora_v5p-16 max_batch_lora_v6e-16 sft_v6e-32
       sft_v6e-16_batch1)
[ $# -gt 0 ] && ORDER=("$@")
for row in "${ORDER[@]}"; do
  args=${ROWS[$row]:-}
  if [ -z "$args" ]; then echo "unknown row $row (rows: ${!ROWS[*]})" >&2; exit 2; fi
  if [ -f "$OUT/$row.json" ]; then echo "== $row: done already ($OUT/$row.json)"; continue; fi
  echo "== $row: python -m diffusion_gemma.aot $args"
  # shellcheck disable=SC2086
  /usr/bin/time -v python -m diffusion_gemma.aot $args --output="$OUT/$row.json" --hlo_dir="$HLO/$row" \
      > "$OUT/$row.log" 2>&1
  status=$?
  grep -v "^\s" "$OUT/$row.log" | tail -n 40
  grep "Maximum resident\|Elapsed (wall" "$OUT/$row.log"
  [ $status -ne 0 ] && echo "== $row: FAILED (exit $status, log $OUT/$row.log)"
done
