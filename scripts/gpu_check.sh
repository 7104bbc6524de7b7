#!/usr/bin/env bash
# The GPU check (issue 14), for a machine with an NVIDIA GPU (run from anywhere; it works in the repo root):
#   bash scripts/gpu_check.sh            # results in $OUT (default /tmp/gpu-check-out)
# It installs what travelled with the working tree, never touching the machine's own packages:
#   .whl/*.whl                  wheels (e.g. cuda-python, nvidia-cuda-nvrtc) -> /tmp/site
#   .gpu-parts/p*/part0*        onnxruntime-gpu in parts (shared/gpu/ort-gpu-parts.sh) -> /tmp/gpu-parts
#   .gpu-parts-*/p*/part0*      any other package packed the same way (e.g. TensorRT-RTX) -> /tmp/<dir>
# then this repo (pip install --no-deps --no-build-isolation -e .), runs `pytest -m gpu` and the benchmark
# (python -m ddpm_deploy.verify.gpu_check; extra arguments, e.g. --trt --torch --steps 200, go to it) and prints the table.
# Environment: OUT, PYTHON (default python3), GPU_PARTS (a folder of the p1..pN parts sent in earlier calls, see
# below), TOTAL_S (540: the whole script's deadline, under a device call's 600 s), TEST_S (200: the tests').
# Exit status: non-zero if a gpu test failed (124/130: a stage ran out of time).
#
# Through the device tool (at most 64 MiB travel per call; onnxruntime-gpu is ~200 MB): here, once,
# `bash scripts/gpu_pack.sh` (onnxruntime-gpu, polygraphy, the calibrated fp16 ONNX and the demo model ->
# .gpu-parts/p1..pN, N = 5; NO_CALIBRATED=1 leaves the 71 MB calibrated model out: N = 4), then N calls back to
# back (the machine stays warm 30 s between them, and what is copied to /tmp stays):
#   calls 1..N-1: carry [".gpu-parts/pK"], command: mkdir -p /tmp/parts && cp -r .gpu-parts/pK /tmp/parts/
#   call N:       carry [".gpu-parts/pN"], command: mkdir -p /tmp/parts && cp -r .gpu-parts/pN /tmp/parts/ && GPU_PARTS=/tmp/parts bash scripts/gpu_check.sh --torch
# The last call runs at most TOTAL_S (540 s; give it timeout_s 570): the gpu tests incl. the CLI end to end, the
# demo model through `ddpm-run sample/parity --device cuda` in fp32 and calibrated fp16 (demo.txt), then ~15
# benchmark rows at batch 256, each written to $OUT/gpu_check.{txt,json} as it finishes, so a stage cut off keeps
# what ran. Estimated (not measured) a few minutes on an H100. Then give_back. A rerun after the machine was given
# back needs all N parts again.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DDPM_NO_PROGRESS=1
log() { echo "[gpu_check] $*"; }
die() { echo "[gpu_check] FAILED: $*" >&2; exit 3; }

if compgen -G ".whl/*.whl" >/dev/null; then
  log "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || die "installing the carried wheels failed"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  # cuda-python finds libnvrtc & co. in site-packages, LD_LIBRARY_PATH or CUDA_HOME, never through PYTHONPATH
  for lib in /tmp/site/nvidia/*/lib /tmp/site/nvidia/*/*/lib; do
    [ -d "$lib" ] && export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  done
fi
extra=()
if [ -n "${GPU_PARTS:-}" ]; then
  # the parts in the order of their file names (part00, part01, ...), whatever folders they came in
  mapfile -t parts < <(find "$GPU_PARTS" -type f -name 'part[0-9]*' -printf '%f %p\n' | sort | cut -d' ' -f2-)
  [ "${#parts[@]}" -gt 0 ] || die "GPU_PARTS=$GPU_PARTS holds no part files (the machine was given back between calls? send all parts again)"
  for k in "${!parts[@]}"; do  # part00, part01, ... with none missing
    [ "$(basename "${parts[$k]}")" = "$(printf 'part%02d' "$k")" ] \
      || die "GPU_PARTS: expected part$(printf %02d "$k"), found $(basename "${parts[$k]}") (a part missing: the machine was given back between calls? send all parts again)"
  done
  log "unpacking ${#parts[@]} parts from $GPU_PARTS into /tmp/gpu-parts"
  mkdir -p /tmp/gpu-parts && cat "${parts[@]}" | xz -d -T0 | tar x -C /tmp/gpu-parts \
    || die "unpacking $GPU_PARTS failed (a part missing? ${#parts[@]} found)"
  export PYTHONPATH=/tmp/gpu-parts${PYTHONPATH:+:$PYTHONPATH}
  # scripts/gpu_pack.sh also sends the calibrated fp16 ONNX that ddpm-export --fp16 ships
  [ -f /tmp/gpu-parts/calibrated/manifest.json ] && extra=(--calibrated /tmp/gpu-parts/calibrated)
fi
for dir in .gpu-parts .gpu-parts-*; do
  compgen -G "$dir/p*/part0*" >/dev/null || continue
  [ -n "${GPU_PARTS:-}" ] && [ "$dir" = .gpu-parts ] && continue  # sent part by part: unpacked from GPU_PARTS above
  dest=/tmp/${dir#.}
  log "unpacking $dir into $dest"
  mkdir -p "$dest" && cat "$dir"/p*/part0* | xz -d -T0 | tar x -C "$dest" || die "unpacking $dir failed"
  export PYTHONPATH=$dest${PYTHONPATH:+:$PYTHONPATH}
done

log "installing this repo (editable, no dependencies)"
# PEP 668 Pythons refuse a plain install: retry with --break-system-packages (our package only, no dependencies)
# (the log stays in /tmp: the device tool returns at most 8 files from $OUT; it is printed on failure)
if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/tmp/gpu-check-pip.log 2>&1; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --break-system-packages -e . >>/tmp/gpu-check-pip.log 2>&1 \
    || { tail -20 /tmp/gpu-check-pip.log; die "pip install -e . failed"; }
fi
"$PY" -c "import ddpm_deploy.runtime, ddpm_deploy.verify" || die "ddpm_deploy is not importable after the install"

# one file for the machine ($OUT comes back with at most 8 files: env.txt, pytest-gpu.{xml,log}, gpu_check.{log,txt,json},
# demo.txt)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/env.txt"
# the host CPU too: with AVX512_BF16 or AMX it can take issue 16's bf16 measurement (scripts/cpu_bf16_check.sh)
echo "host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); $(nproc) cores; flags:" \
  "$(grep -o -w -E 'avx512f|avx512_bf16|amx_tile|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')" | tee -a "$OUT/env.txt"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import importlib, sys
print("python", sys.version.split()[0])
for name in ("numpy", "onnxruntime", "cuda.bindings", "torch", "onnx", "tensorrt_rtx_bindings", "tensorrt"):
    try:
        mod = importlib.import_module(name)
        extra = f" providers={mod.get_available_providers()}" if name == "onnxruntime" else ""
        print(f"{name} {getattr(mod, '__version__', '?')} ({mod.__file__}){extra}")
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
try:
    from ddpm_deploy.runtime.device import kernels
    print("nvrtc", kernels.nvrtc_version(), "archs", kernels.supported_archs())
except Exception as e:
    print("nvrtc: unavailable:", e)
EOF

# one deadline for the three stages (a device call may run 600 s at most): each gets at most its cap and what is
# left, and is stopped with SIGINT (then SIGKILL) when it is over; what was written by then comes back
DEADLINE=${TOTAL_S:-540}  # seconds since this script started (bash's SECONDS), the unpacking and install included
budget() {
  local left=$((DEADLINE - SECONDS - 15))
  [ "$left" -lt 1 ] && left=1  # (timeout 0 would mean no limit)
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}

log "pytest -m gpu (at most $(budget "${TEST_S:-200}") s)"
timeout -s INT -k 15 "$(budget "${TEST_S:-200}")" \
  "$PY" -m pytest -m gpu tests/runtime/test_device_gpu.py tests/parity/test_l4_backend.py -p no:cacheprovider -rA \
  --junitxml="$OUT/pytest-gpu.xml" -o junit_family=xunit1 2>&1 | tee "$OUT/pytest-gpu.log"
status=${PIPESTATUS[0]}

# the demo model sent by scripts/gpu_pack.sh: the commands a user types, on the GPU (one file back: demo.txt);
# before the benchmark: it is the correctness check, and it is short
demo=/tmp/gpu-parts/demo
if [ -f "$demo/run/model.json" ]; then
  log "demo model: ddpm-run sample and parity --device cuda"
  run_cli() {
    echo "\$ ddpm-run $*"
    timeout -s INT -k 10 "$(budget 90)" "$PY" -m ddpm_deploy.verify.cli "$@"
    echo "exit status $?"
  }
  {
    run_cli sample --onnx "$demo/export/model.onnx" --device cuda --num 64 --batch 64 --seed 0 \
      --out /tmp/demo-samples --overwrite --no-progress
    run_cli parity --checkpoint "$demo/run" --onnx "$demo/export/model.onnx" --device cuda --out /tmp/demo-parity-fp32
    run_cli parity --checkpoint "$demo/run" --onnx "$demo/export/model.fp16.onnx" --device cuda --out /tmp/demo-parity-fp16
    cat /tmp/demo-parity-fp32/parity.md /tmp/demo-parity-fp16/parity.md 2>/dev/null
  } 2>&1 | tee "$OUT/demo.txt"
fi

log "benchmark (at most $(budget 600) s; rows are written as they finish)"
timeout -s INT -k 15 "$(budget 600)" \
  "$PY" -m ddpm_deploy.verify.gpu_check --junit "$OUT/pytest-gpu.xml" --out "$OUT" ${extra[@]+"${extra[@]}"} "$@" 2>&1 \
  | tee "$OUT/gpu_check.log"
bench=${PIPESTATUS[0]}
log "pytest exit $status, benchmark exit $bench; results in $OUT"
[ "$status" -eq 0 ] || [ "$status" -eq 5 ] && exit "$bench"
exit "$status"
