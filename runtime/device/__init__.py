"""The GPU runtime: cuda-python driver wrappers, the NVRTC kernels and the device sampling loop.

Importing this package needs neither cuda-python nor a GPU; the first CUDA call does, and says what is
missing (``NoDeviceError``, ``MissingDependencyError``). Entry points: ``loop.GpuContext``,
``loop.DeviceSampler``, ``info.device_info`` / ``info.engine_info``; ε backends
in ``runtime.backends.trt`` (TensorRT, TensorRT-RTX) and ``runtime.backends.ort_cuda`` (ONNX Runtime CUDA).
"""

from .cuda import CudaError, NoDeviceError
from .info import device_info, engine_info, format_engine_info
from .kernels import KernelCompileError
from .loop import DeviceSampler, DeviceTimings, GpuContext

__all__ = ["CudaError", "DeviceSampler", "DeviceTimings", "GpuContext", "KernelCompileError", "NoDeviceError",
           "device_info", "engine_info", "format_engine_info"]
