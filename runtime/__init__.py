"""ddpm_deploy.runtime: the framework-free base layer (NumPy + ONNX Runtime; optional TensorRT/CUDA).

This package must never import torch (tests/runtime/test_no_torch.py proves it).
"""

from .errors import DDPMError
from .schedule import DiffusionConfig, Schedule

__all__ = ["DDPMError", "DiffusionConfig", "Schedule"]
