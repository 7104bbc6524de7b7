#!/usr/bin/env bash
# Issue 16's bf16 measurement, for a machine whose CPU has AVX512_BF16 or AMX (our development machines lately
# have neither; a lent GPU machine's host CPU may): OpenVINO bf16 vs PyTorch bf16 autocast (target: >= 1.3x) and
# vs fp32 on ddpm-cifar10 (random weights), batch 1 and 8, THREADS threads (default 2, as our 2-core machines),
# one process per row; then bf16's fidelity (FID_STEPS respaced steps, default 250, 8 images, same noise as fp32;
# all cores: it is not a speed row). Fits one device call (< 10 min on a 16-core host); $OUT gets 6 files
# (run.log, bench/results.{json,md} + plot, fidelity/results.{json,md}), the device tool returns at most 8.
#   bash scripts/cpu_bf16_check.sh            # results in $OUT (default /tmp/cpu-bf16-out)
# Needs torch and onnxruntime (the GPU machine's image has both) and OpenVINO: carried as wheels in .whl/
# (here: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
#  -d .whl openvino==2026.4.1 openvino-telemetry; ~60 MB: a device call of its own), installed into /tmp/site.
# Exits 0 without measuring on a CPU with no bf16 hardware (prints its flags); CPU_BF16_FORCE=1 runs anyway (to
# try the script: bf16 is then emulated or falls back to fp32, and the numbers mean nothing for issue 16).
# The int8 rows (openvino-int8-bf16, openvino-bands: what --precision auto runs) also need NNCF (carry its wheel and
# its pure-Python dependencies in .whl/ too, or drop them from BACKENDS); without it those rows record the error.
# Environment: OUT, PYTHON, THREADS, BATCHES (1,8), BACKENDS (the seven below), FID_STEPS (250; 1000 = every
# step), FID_ROWS (ref,ov-bf16; add spread for a second fp32 seed), CPU_BF16_FORCE.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/cpu-bf16-out}
THREADS=${THREADS:-2}
BATCHES=${BATCHES:-1,8}
BACKENDS=${BACKENDS:-ort-cpu,openvino-fp32,openvino-bf16,openvino-int8-bf16,openvino-bands,torch-eager-fp32,torch-eager-bf16}
WORK=/tmp/cpu-bf16-work  # the exported model (143 MB) stays out of $OUT
FID_STEPS=${FID_STEPS:-250}
FID_ROWS=${FID_ROWS:-ref,ov-bf16}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1  # one log file for everything
export PYTHONUNBUFFERED=1 DDPM_NO_PROGRESS=1
log() { echo "[cpu_bf16_check] $*"; }
die() { echo "[cpu_bf16_check] FAILED: $*" >&2; exit 3; }

model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
flags=$(grep -o -w -E 'avx2|avx512f|avx512_vnni|avx512_bf16|avx_vnni|amx_tile|amx_bf16|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')
echo "CPU: $model; $(nproc) cores; flags: $flags"
case " $flags " in
  *" avx512_bf16 "* | *" amx_bf16 "*) ;;
  *) if [ -z "${CPU_BF16_FORCE:-}" ]; then
       log "no AVX512_BF16 or AMX on this CPU: bf16 would be emulated, nothing to measure here"; exit 0
     fi
     log "no AVX512_BF16 or AMX on this CPU; CPU_BF16_FORCE is set: running anyway (numbers not for issue 16)" ;;
esac

if compgen -G ".whl/*.whl" >/dev/null; then
  log "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || die "installing the carried wheels failed"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/pip-install.log" 2>&1; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --break-system-packages -e . >>"$WORK/pip-install.log" 2>&1 \
    || { tail -20 "$WORK/pip-install.log"; die "pip install -e . failed"; }
fi
"$PY" -c "import openvino, torch, onnxruntime, ddpm_deploy.runtime" || die "openvino, torch or onnxruntime is missing"

log "speed: ddpm-run bench, $THREADS threads"
"$PY" -c "from ddpm_deploy.verify.cli import main; main()" bench --presets ddpm-cifar10 \
  --backends "$BACKENDS" --batches "$BATCHES" \
  --threads "$THREADS" --repeat 7 --no-engine-builds --out "$OUT/bench"
bench=$?

log "fidelity: bf16 vs fp32, 8 images x $FID_STEPS steps, batch 8, all cores"
"$PY" - "$WORK" <<'EOF' || die "exporting ddpm-cifar10 failed"
import sys
from pathlib import Path
from ddpm_deploy.verify.gpu_check import export_preset
print(export_preset(Path(sys.argv[1]), half=False))
EOF
"$PY" -m ddpm_deploy.verify.fidelity --onnx "$WORK/cifar10-random.onnx" --num 8 --batch 8 --threads 0 \
  --steps "$FID_STEPS" --rows "$FID_ROWS" --out "$OUT/fidelity"
fid=$?
cat "$OUT/bench/results.md" "$OUT/fidelity/results.md" 2>/dev/null
log "bench exit $bench, fidelity exit $fid; results in $OUT"
[ "$bench" -eq 0 ] && exit "$fid"
exit "$bench"
