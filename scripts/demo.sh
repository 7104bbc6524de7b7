#!/usr/bin/env bash
# The main job, end to end on a CPU: train `tiny` on the built-in digits, export to ONNX (verified against
# PyTorch), to calibrated fp16 ONNX and to a TensorRT-RTX plan (its builder needs no GPU), sample 64 images with the framework-free runtime (ONNX Runtime), and score them with a
# classifier trained on the real digits and with FID/KID against the real digits. Everything lands in runs/latest/
# (the FID Inception, exported once, in ~/.cache/ddpm-deploy/; the digits' FID statistics in runs/fid-stats/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
STEPS=${DEMO_STEPS:-1500}
# bf16 autocast only where the CPU computes bf16 natively (AVX512_BF16 or AMX); elsewhere PyTorch emulates it and
# training is many times slower than fp32 (measured: ~7 s per step vs ~1 s on a 2-core AVX2-only EPYC).
BF16=""
if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then BF16="--bf16"; fi
start=$(date +%s)
echo "== 1/4 train: tiny UNet on digits, $STEPS steps (${BF16:-fp32, no native bf16 on this CPU}) =="
ddpm-train --preset tiny --dataset digits --steps "$STEPS" $BF16
echo "== 2/4 export: ONNX (checked against PyTorch), calibrated fp16 ONNX, TensorRT-RTX engine =="
ddpm-export --fp16 --engine
echo "== 3/4 sample: 64 images, 1000 steps, ONNX Runtime CPU, no torch =="
ddpm-run sample --num 64 --batch 64 --seed 0 --out runs/latest/export/samples
echo "== 4/4 quality: a digits classifier labels the samples; FID/KID against the 1,797 real digits =="
STATS="${DDPM_RUNS_DIR:-runs}/fid-stats/digits16.npz"
[ -f "$STATS" ] || ddpm-run fid-stats digits --out "$STATS"    # once: Inception features of the real digits
ddpm-run fid runs/latest/export/samples --ref "$STATS"
python -m ddpm_deploy.trainer.quality runs/latest/export/samples
echo "done in $(( $(date +%s) - start ))s; see runs/latest/export/samples/grid.png"
