"""What this machine's GPU stack is, and whether it can run a given plan (``ddpm-run info --engine``).

Both work on any machine: without cuda-python, a driver or a GPU, ``engine_info`` still prints the sidecar
and says what is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import DDPMError
from ..plan import check_plan_compat, read_plan_sidecar, runs_on
from . import kernels
from .cuda import DeviceProps, query_device


def _cuda_python_version() -> str | None:
    try:
        import cuda.bindings as bindings
    except ImportError:
        return None
    return getattr(bindings, "__version__", "unknown")


def probe_gpu(ordinal: int = 0) -> tuple[DeviceProps | None, str]:
    """(the GPU's properties, its name) or (None, why there is no usable GPU): the one GPU probe every layer uses
    (the engine builder's sidecar, parity, info). Never raises for a missing driver, binding or device."""
    try:
        props = query_device(ordinal)
    except DDPMError as e:
        return None, f"no GPU: {e}"
    except Exception as e:  # a broken driver is "no GPU" for every caller
        return None, f"no GPU: the CUDA device query failed ({type(e).__name__}: {e})"
    return props, props.name


def device_info(ordinal: int = 0) -> dict[str, Any]:
    """The GPU, driver, cuda-python and NVRTC; raises NoDeviceError / MissingDependencyError without them."""
    info: dict[str, Any] = query_device(ordinal).to_dict()
    info["cuda_python"] = _cuda_python_version()
    try:
        archs = kernels.supported_archs()
        major, minor = kernels.nvrtc_version()
        cc = tuple(int(v) for v in info["compute_capability"].split("."))
        info["nvrtc"] = {"version": f"{major}.{minor}", "kernel_target": kernels.select_target(cc, archs)}
    except DDPMError as e:
        info["nvrtc"] = {"error": str(e)}
    return info


def engine_info(plan: str | os.PathLike, ordinal: int = 0, load: bool = True) -> dict[str, Any]:
    """The plan's sidecar, this machine's TensorRT and GPU, and the reasons (if any) it cannot run the plan.

    Raises ArtifactError when the sidecar is missing or does not match the plan. With ``load`` and no known
    obstacle, the plan is deserialized on the GPU to be sure.
    """
    from ..backends.trt import import_tensorrt

    plan = Path(plan)
    sidecar = read_plan_sidecar(plan)
    info: dict[str, Any] = {"plan": str(plan), "sidecar": sidecar.to_dict(), "runs_on": runs_on(sidecar),
                            "tensorrt": None, "gpu": None, "reasons": [], "onnx_beside": None}
    beside = plan.parent / Path(str(sidecar.onnx.get("path", ""))).name
    if sidecar.onnx.get("path") and beside.is_file():
        from ..fileio import sha256_file

        same = sha256_file(beside) == sidecar.onnx.get("sha256")
        info["onnx_beside"] = {"path": str(beside), "matches": same}
        if not same:
            info["reasons"].append(
                f"{beside} beside the plan is not the ONNX the plan was built from (its SHA-256 differs from the "
                f"sidecar's {str(sidecar.onnx.get('sha256'))[:16]}…): the plan is stale; rebuild it with "
                f"`ddpm-export --onnx {beside} --engine`")
    try:
        trt = import_tensorrt(sidecar.trt["flavour"])
        info["tensorrt"] = {"module": trt.__name__, "version": trt.__version__}
    except DDPMError as e:
        info["reasons"].append(str(e))
    try:
        info["gpu"] = device_info(ordinal)
    except DDPMError as e:
        info["reasons"].append(f"no usable GPU: {e}")
    if info["tensorrt"] is not None:
        cc = info["gpu"]["compute_capability"] if info["gpu"] else None
        info["reasons"] += check_plan_compat(sidecar, info["tensorrt"]["module"], info["tensorrt"]["version"], cc)
    if load and not info["reasons"]:
        info["reasons"] += _try_load(plan, ordinal)
    info["runnable"] = not info["reasons"]
    return info


def _try_load(plan: Path, ordinal: int) -> list[str]:
    from ..backends.trt import TrtRunner

    try:
        with TrtRunner(plan, cuda_graph=False, device_id=ordinal, runtime_cache=None):  # info writes nothing
            return []
    except DDPMError as e:
        return [f"loading the plan failed: {e}"]


def format_engine_info(info: dict[str, Any]) -> str:
    """Human-readable lines for ``ddpm-run info --engine``."""
    side = info["sidecar"]
    trt, gpu, prof = side["trt"], side.get("gpu") or {}, side["profile"]
    ddpm = side["ddpm"]
    lines = [
        f"plan: {info['plan']} ({side['plan']['bytes']} bytes, sha256 {side['plan']['sha256'][:16]}…)",
        f"built by: {trt.get('module')} {trt.get('version')} (flavour {trt.get('flavour')}), precision "
        f"{side['precision']}, on {gpu.get('name') or 'no GPU'}"
        + (f" (compute capability {gpu['compute_capability']})" if gpu.get("compute_capability") else ""),
        f"batch profile: min/opt/max = {prof['min']}/{prof['opt']}/{prof['max']}",
        f"model: {ddpm['data']['channels']}x{ddpm['data']['image_size']}x{ddpm['data']['image_size']}, "
        f"T = {ddpm['diffusion']['num_timesteps']}, {ddpm['diffusion']['schedule']} schedule, "
        f"{ddpm['diffusion']['variance_type']}",
        f"source ONNX: {side['onnx']['path']} (sha256 {side['onnx']['sha256'][:16]}…)"
        + ("" if info.get("onnx_beside") is None else "; the copy beside the plan "
           + ("matches" if info["onnx_beside"]["matches"] else "DIFFERS (the plan is stale)")),
        "runs on compute capability: " + (", ".join(info["runs_on"]) if info["runs_on"] else "unknown (built without a GPU)")
        + (" (TensorRT for RTX: not on A100 8.0, H100/H200 9.0, B200 10.0)" if trt.get("flavour") == "rtx" else ""),
        "this machine: " + (f"{info['tensorrt']['module']} {info['tensorrt']['version']}" if info["tensorrt"]
                            else "no matching TensorRT")
        + (f"; GPU {info['gpu']['name']} (compute capability {info['gpu']['compute_capability']}, driver CUDA "
           f"{info['gpu']['driver_cuda_version']})" if info["gpu"] else "; no usable GPU"),
    ]
    unchecked = (side.get("build") or {}).get("unchecked") or []
    if unchecked:
        lines.append("adopted without checking (ddpm-export --adopt-plan could not check these where it ran):")
        lines += [f"  - {u}" for u in unchecked]
    if info["runnable"]:
        lines.append("runnable here: yes")
    else:
        lines.append("runnable here: no")
        lines += [f"  - {r}" for r in info["reasons"]]
    return "\n".join(lines)
