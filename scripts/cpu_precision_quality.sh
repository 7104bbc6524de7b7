#!/usr/bin/env bash
# Issue 25's quality verdict for CPU precisions: the same seeds and indices sampled by ONNX Runtime fp32 (the
# reference), by a second fp32 seed (the spread), and by each candidate (OpenVINO bf16, OpenVINO int8, ...), then
# FID/KID of every set against the fp32 reference (`ddpm-run fid`, paired where the seeds match).
#   MODEL=runs/demo/export/model.onnx NUM=1024 STEPS=250 OUT=benchmarks/results/cpu-precision-quality \
#     bash scripts/cpu_precision_quality.sh
# A candidate keeps quality when its FID and KID against the reference are within those of the second fp32 seed.
# Environment: MODEL, NUM (1024), STEPS (250 respaced DDPM steps; 1000 = every step), BATCH (64), OUT, THREADS (0),
# ROWS (fp32-seed1,ov-bf16,ov-int8; also ov-fp32, ov-int8-bf16, auto, bands; the int8 rows need model.int8.xml
# beside MODEL), BANDS (row bands' --precision-bands), SCHEDULER (ddpm), EXTRA (more
# `ddpm-run sample` options for every row).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-.venv/bin/ddpm-run}
MODEL=${MODEL:?set MODEL to the fp32 ONNX of a trained model}
NUM=${NUM:-1024}; STEPS=${STEPS:-250}; BATCH=${BATCH:-64}; THREADS=${THREADS:-0}; SCHEDULER=${SCHEDULER:-ddpm}
OUT=${OUT:-benchmarks/results/cpu-precision-quality}
ROWS=${ROWS:-fp32-seed1,ov-bf16,ov-int8}
EXTRA=${EXTRA:-}
BANDS=${BANDS:-bf16:0-99,int8-bf16:100-599,bf16:600-999}  # row "bands": a precision per timestep band
mkdir -p "$OUT"
common=(--onnx "$MODEL" --num "$NUM" --batch "$BATCH" --steps "$STEPS" --scheduler "$SCHEDULER" --threads "$THREADS"
        --no-pngs --no-progress $EXTRA)
sample() {  # name, extra options: sampled once (a finished row is reused with --resume)
  local name=$1; shift
  echo "[quality] sampling $name"
  "$RUN" sample "${common[@]}" --out "$OUT/$name" --resume "$@"
}
sample fp32-seed0 --seed 0
for row in ${ROWS//,/ }; do
  case $row in
    fp32-seed1) sample fp32-seed1 --seed 1 ;;
    ov-fp32) sample ov-fp32 --seed 0 --backend openvino --precision fp32 ;;
    ov-bf16) sample ov-bf16 --seed 0 --backend openvino --precision bf16 ;;
    ov-int8) sample ov-int8 --seed 0 --backend openvino --precision int8 ;;
    ov-int8-bf16) sample ov-int8-bf16 --seed 0 --backend openvino --precision int8-bf16 ;;
    auto) sample auto --seed 0 --precision auto ;;
    bands) sample bands --seed 0 --precision-bands "$BANDS" ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
done
for row in ${ROWS//,/ }; do
  paired=(--paired); [ "$row" = fp32-seed1 ] && paired=()
  echo "[quality] FID/KID of $row against fp32-seed0"
  "$RUN" fid "$OUT/$row" --ref "$OUT/fp32-seed0" "${paired[@]}" --out "$OUT/fid-$row" --overwrite --no-progress
done
