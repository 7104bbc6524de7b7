"""The GPU runtime: cuda-python driver wrappers, the NVRTC kernels and the device sampling loop.

Importing this package needs neither cuda-python nor a GPU; the first CUDA call does, and says what is
missing (``NoDeviceError``, ``MissingDependencyError``). Entry points: ``cuda.GpuContext``,
``loop.DeviceLoop``, ``info.device_info`` / ``info.engine_info``; ε backends
in ``runtime.backends.trt`` (TensorRT, TensorRT-RTX) and ``runtime.backends.ort_cuda`` (ONNX Runtime CUDA).
"""

from .cuda import CudaError, GpuContext, NoDeviceError
from .info import device_info, engine_info, format_engine_info
from .kernels import KernelCompileError
from .loop import DeviceLoop, DeviceTimings

__all__ = ["CudaError", "DeviceLoop", "DeviceTimings", "GpuContext", "KernelCompileError", "NoDeviceError",
           "device_info", "engine_info", "format_engine_info"]
