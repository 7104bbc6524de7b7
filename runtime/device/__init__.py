"""The GPU runtime: cuda-python driver wrappers (``cuda``: ``GpuContext``, ``DeviceArray``, …), the NVRTC kernels
(``kernels``), the device sampling loop (``loop.DeviceLoop``) and ``info.device_info`` / ``info.engine_info``; ε
backends in ``runtime.backends.trt`` (TensorRT, TensorRT-RTX) and ``runtime.backends.ort_cuda`` (ONNX Runtime CUDA).

Importing this package needs neither cuda-python nor a GPU, and imports none of its modules (import them by name):
the first CUDA call says what is missing (``cuda.NoDeviceError``, ``MissingDependencyError``).
"""
