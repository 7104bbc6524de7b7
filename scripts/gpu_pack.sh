#!/usr/bin/env bash
# Packs what the GPU check needs and the GPU machine lacks into parts small enough for one device call each
# (at most 64 MiB travel per call, the repo included): onnxruntime-gpu (CUDA 13, CPython 3.12) and the calibrated
# fp16 ONNX of the random ddpm-cifar10 preset that `ddpm-export --fp16` would ship (made here: it needs ModelOpt,
# which the GPU machine does not have). Parts go to .gpu-parts/p1..pN (ignored by git), each under PART_MB.
#   bash scripts/gpu_pack.sh                 # then: see scripts/gpu_check.sh for the device calls
# And the demo model (a trained run: model.json + weights.safetensors, with its fp32 and calibrated fp16 exports), on
# which the GPU check runs `ddpm-run sample/parity --device cuda` as a user would: DEMO_RUN (default runs/latest,
# else the newest trained run under runs/; none: the CLI checks are skipped there, said here).
# Environment: ORT_GPU_VERSION (1.31.1), PART_MB (58), PYTHON (.venv/bin/python), NO_CALIBRATED=1 to leave the
# calibrated ddpm-cifar10 model out, DEMO_RUN.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version=${ORT_GPU_VERSION:-1.31.1}
part_mb=${PART_MB:-58}
if [ -n "${DEMO_RUN:-}" ]; then
  demo_run=$DEMO_RUN
  [ -f "$demo_run/weights.safetensors" ] || { echo "[gpu_pack] FAILED: DEMO_RUN=$demo_run holds no trained run" >&2; exit 2; }
else  # runs/latest, else the newest trained run under runs/
  demo_run=runs/latest
  [ -f "$demo_run/weights.safetensors" ] || demo_run=$(ls -td runs/*/ 2>/dev/null | while read -r d; do
    [ -f "$d/weights.safetensors" ] && [ -f "$d/model.json" ] && { echo "${d%/}"; break; }; done || true)
fi
out=.gpu-parts
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
log() { echo "[gpu_pack] $*"; }

log "downloading onnxruntime-gpu $version (cp312, manylinux x86-64)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$tmp/whl" "onnxruntime-gpu==$version"
mkdir -p "$tmp/pack"
(cd "$tmp/pack" && unzip -q "$tmp"/whl/onnxruntime_gpu-*.whl 'onnxruntime/*' 'onnxruntime_gpu-*.dist-info/*')
# polygraphy (pure Python; ddpm-run parity compares with its Comparator) is not in the GPU machine's image
poly=$("$PY" -c "import os, polygraphy; print(os.path.dirname(polygraphy.__file__))")
log "polygraphy from $poly"
cp -r "$poly" "$tmp/pack/polygraphy"
if [ -z "${NO_CALIBRATED:-}" ]; then
  log "making the calibrated fp16 ONNX of ddpm-cifar10 (random weights; ModelOpt AutoCast, digits calibration)"
  "$PY" -m ddpm_deploy.verify.gpu_check --work "$tmp/work" --prepare-calibrated "$tmp/pack/calibrated" >/dev/null
fi
if [ -n "$demo_run" ] && [ -f "$demo_run/model.json" ] && [ -f "$demo_run/weights.safetensors" ]; then
  log "the demo model: $demo_run (+ its ONNX and calibrated fp16 ONNX)"
  mkdir -p "$tmp/pack/demo/run"
  cp "$demo_run/model.json" "$demo_run/weights.safetensors" "$tmp/pack/demo/run/"
  "$PY" -m ddpm_deploy.export.cli "$tmp/pack/demo/run" --fp16 --out "$tmp/pack/demo/export" --no-progress >/dev/null
else
  log "WARNING: no trained run under runs/ (set DEMO_RUN, or train one: bash scripts/demo.sh): the GPU check will skip the CLI on the demo model"
fi
log "compressing"
(cd "$tmp/pack" && tar cf - . | xz -T0 -6 >"$tmp/all.tar.xz")
size=$(stat -c %s "$tmp/all.tar.xz")
n=$(( (size + part_mb * 1000000 - 1) / (part_mb * 1000000) ))
rm -rf "$out"
split -n "$n" -d -a 2 "$tmp/all.tar.xz" "$tmp/part"
i=1
for f in "$tmp"/part*; do
  mkdir -p "$out/p$i"
  mv "$f" "$out/p$i/part$(printf %02d $((i - 1)))"
  i=$((i + 1))
done
du -sh "$out"/p*
log "$n parts in $out: send them in $n device calls (scripts/gpu_check.sh says how)"
