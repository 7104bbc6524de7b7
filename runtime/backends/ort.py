"""ONNX Runtime ε backend (host arrays). CPU provider by default; CUDA when onnxruntime-gpu is installed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..config import ONNX_METADATA_KEY, ModelCard
from ..errors import ArtifactError, ConfigError, lazy_import

log = logging.getLogger(__name__)

INPUT_X, INPUT_T, OUTPUT_EPS = "x", "t", "eps"
T_DTYPE = np.int32  # the one integer type of input `t` (documented in the README)
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OrtRunner:
    """``eps(x, t)`` through an ONNX Runtime session; validates the model's I/O against our contract."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int = 0, opt_level: str = "all"):
        ort = lazy_import("onnxruntime", "The ONNX Runtime backend", "pip install onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: ONNX file not found (export one with ddpm-export)")
        if device not in PROVIDERS:
            raise ConfigError(f"device must be one of {sorted(PROVIDERS)}, found {device!r}")
        if opt_level not in OPT_LEVELS:
            raise ConfigError(f"graph optimisation level must be one of {sorted(OPT_LEVELS)}, found {opt_level!r}")
        available = ort.get_available_providers()
        want = PROVIDERS[device]
        if want not in available:
            raise ConfigError(
                f"requested provider {want}, but this onnxruntime offers {available}; for CUDA install "
                f"onnxruntime-gpu instead of onnxruntime (pip uninstall onnxruntime && pip install onnxruntime-gpu)"
            )
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=[want])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/… types
            raise ArtifactError(f"{self.path}: ONNX Runtime cannot load this model ({str(e).splitlines()[0][:300]})") from None
        self.device = device
        self.provider = want
        self._check_io()
        meta = self.session.get_modelmeta().custom_metadata_map
        self.card: ModelCard | None = (
            ModelCard.from_json(meta[ONNX_METADATA_KEY], f"{self.path} metadata") if ONNX_METADATA_KEY in meta else None
        )

    def _check_io(self):
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = [o.name for o in self.session.get_outputs()]
        if set(ins) != {INPUT_X, INPUT_T} or outs != [OUTPUT_EPS]:
            raise ArtifactError(
                f"{self.path}: expected inputs ['x', 't'] and output ['eps'], found inputs {sorted(ins)} "
                f"and outputs {outs}; export the model with ddpm-export"
            )
        xs = ins[INPUT_X].shape
        if len(xs) != 4 or ins[INPUT_X].type != "tensor(float)":
            raise ArtifactError(f"{self.path}: input x must be float32 [B,C,H,W], found {ins[INPUT_X].type} {xs}")
        if ins[INPUT_T].type != "tensor(int32)":
            raise ArtifactError(f"{self.path}: input t must be int32 [B], found {ins[INPUT_T].type}")
        self.sample_shape = tuple(int(d) if isinstance(d, int) else None for d in xs[1:])

    def check_shape(self, shape: tuple[int, ...]) -> None:
        for want, got in zip(self.sample_shape, shape):
            if want is not None and want != got:
                raise ArtifactError(f"{self.path}: model input x is [B,{self.sample_shape}], the sampler asks for {shape}")

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_EPS], {INPUT_X: x, INPUT_T: t.astype(T_DTYPE, copy=False)})[0]

    @property
    def name(self) -> str:
        return f"onnxruntime-{self.device}"

    def close(self):
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
