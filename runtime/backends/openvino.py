"""OpenVINO ε backend on the CPU: reads our ONNX as is (or an OpenVINO IR, e.g. the int8 model of
``ddpm-export --int8``), precision by OpenVINO's ``INFERENCE_PRECISION_HINT`` (f32, or bf16 where the CPU has
AVX512_BF16/AMX), a latency or throughput hint, threads, and a compiled-model cache (``CACHE_DIR``) so that the
second start of the same model skips compilation.

Needs ``openvino`` (``pip install 'ddpm-deploy[openvino]'``); no torch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..config import ModelCard
from ..contract import (INPUT_T, INPUT_X, IO_TEXT, ONNX_METADATA_KEY, OUTPUT_EPS, PRECISION_METADATA_KEY, T_DTYPE)
from ..errors import ArtifactError, ConfigError, invalid, lazy_import
from .base import Runner

log = logging.getLogger(__name__)

INSTALL = "pip install 'ddpm-deploy[openvino]'"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}  # int8 is a property of the model (an NNCF IR), not a hint
PERFORMANCE_HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
_OV_TYPES = {INPUT_X: "f32", INPUT_T: "i32", OUTPUT_EPS: "f32"}


def default_cache_dir() -> Path:
    """Where compiled models are cached: $DDPM_OPENVINO_CACHE, else ~/.cache/ddpm-deploy/openvino."""
    env = os.environ.get("DDPM_OPENVINO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ddpm-deploy" / "openvino"


def cpu_supports_bf16(core) -> bool:
    """OpenVINO's own word: BF16 in the CPU plugin's OPTIMIZATION_CAPABILITIES (AVX512_BF16 or AMX)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


COMPUTE_LAYERS = ("Convolution", "FullyConnected", "MatMul")  # the execution graph's layers that do the FLOPs


def hint_is_bf16(value) -> bool:
    """Whether a compiled model's INFERENCE_PRECISION_HINT is bf16. OpenVINO 2024+ returns an ``ov.Type``
    (whose text is ``<Type: 'bfloat16'>``), older releases the string 'bf16': compare the type, not its text."""
    name = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return name in ("bf16", "bfloat16")


def compute_precisions(compiled) -> dict[str, int]:
    """{runtime precision: count} over the convolutions and matrix products of OpenVINO's execution graph
    (``get_runtime_model()``: what the CPU plugin really runs after its own precision choices)."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        if "layerType" in rt and rt["layerType"].astype(str) in COMPUTE_LAYERS and "runtimePrecision" in rt:
            p = rt["runtimePrecision"].astype(str)
            counts[p] = counts.get(p, 0) + 1
    return counts


def precision_that_ran(counts: dict[str, int]) -> str:
    """'bf16' if most compute layers ran in bf16, else 'fp32' (an fp32 model's layers run f32 or bf16)."""
    bf16 = sum(n for p, n in counts.items() if p in ("bf16", "bfloat16"))
    return "bf16" if bf16 > 0 and 2 * bf16 >= sum(counts.values()) else "fp32"


class OpenVinoRunner(Runner):
    """``eps(x, t)`` through OpenVINO on the CPU."""

    device = "cpu"

    def __init__(self, path: str | os.PathLike, threads: int = 0, precision: str = "fp32",
                 hint: str = "latency", cache_dir: str | os.PathLike | None = None):
        ov = lazy_import("openvino", "The OpenVINO backend", INSTALL)
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: model file not found (an ONNX from ddpm-export, or an OpenVINO IR .xml)")
        if precision not in PRECISION_HINTS:
            raise ConfigError(f"OpenVINO precision must be one of {sorted(PRECISION_HINTS)} (int8 is a model: "
                              f"ddpm-export --int8 writes model.int8.xml), found {precision!r}")
        if hint not in PERFORMANCE_HINTS:
            raise ConfigError(f"performance hint must be one of {sorted(PERFORMANCE_HINTS)}, found {hint!r}")
        if int(threads) < 0:
            raise ConfigError(invalid("threads", threads, "must be >= 0 (0: OpenVINO's default)"))
        self.core = core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as e:  # OpenVINO raises RuntimeError with its parser's message
            raise ArtifactError(f"{self.path}: OpenVINO cannot read this model "
                                f"({(str(e).splitlines() or [type(e).__name__])[0][:300]})") from None
        self._check_io(model)
        meta = self._metadata(model)
        self.card = ModelCard.from_json(meta[ONNX_METADATA_KEY], f"{self.path} metadata") \
            if ONNX_METADATA_KEY in meta else None
        model_precision = meta.get(PRECISION_METADATA_KEY, "fp32")
        self.bf16_hardware = cpu_supports_bf16(core)
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "PERFORMANCE_HINT": PERFORMANCE_HINTS[hint]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not False:
            cache = Path(cache_dir) if cache_dir else default_cache_dir()
            try:
                cache.mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(cache)
            except OSError as e:
                log.warning("OpenVINO model cache %s unusable (%s); compiling without a cache", cache, e.strerror)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:
            raise ArtifactError(f"{self.path}: OpenVINO cannot compile this model for the CPU "
                                f"({(str(e).splitlines() or [type(e).__name__])[0][:300]})") from None
        self.request = self.compiled.create_infer_request()
        self.config = {k: str(v) for k, v in config.items()}
        # what OpenVINO really runs: its execution graph's runtime precision of the convolutions and matrix
        # products (it ignores the bf16 hint on CPUs without AVX512_BF16/AMX and runs f32 then)
        self.compute_precisions = compute_precisions(self.compiled)
        ran = precision_that_ran(self.compute_precisions)
        hinted = "bf16" if hint_is_bf16(self.compiled.get_property("INFERENCE_PRECISION_HINT")) else "fp32"
        if ran != hinted and model_precision == "fp32":
            log.warning("OpenVINO reports the precision hint %s but its execution graph runs %s (%s); reporting "
                        "what ran", hinted, ran, dict(self.compute_precisions))
        # the model's own precision (int8 IR, fp16/bf16 mixed ONNX) wins; an fp32 model runs at what ran
        self.precision = model_precision if model_precision != "fp32" else ran
        if model_precision == "int8" and any(p in ("bf16", "bfloat16") for p in self.compute_precisions):
            self.precision = "int8+bf16"  # the layers kept float run bf16
        if precision == "bf16" and "bf16" not in self.precision:
            log.warning("OpenVINO runs f32: this CPU has no native bf16 (AVX512_BF16 or AMX), so the bf16 hint is "
                        "ignored")

    def _check_io(self, model) -> None:
        ins = {p.get_any_name(): p for p in model.inputs}
        outs = {p.get_any_name(): p for p in model.outputs}
        if set(ins) != {INPUT_X, INPUT_T} or list(outs) != [OUTPUT_EPS]:
            raise ArtifactError(f"{self.path}: expected {IO_TEXT}, found inputs {sorted(ins)} and outputs {list(outs)}")
        for name, port in [*ins.items(), *outs.items()]:
            if port.get_element_type().get_type_name() != _OV_TYPES[name]:
                raise ArtifactError(f"{self.path}: expected {IO_TEXT}, found {name} of type {port.get_element_type()}")
        xs, es = ins[INPUT_X].get_partial_shape(), outs[OUTPUT_EPS].get_partial_shape()
        if xs.rank.get_length() != 4 or es.rank.get_length() != 4:
            raise ArtifactError(f"{self.path}: expected {IO_TEXT}, found x {xs} and eps {es}")
        static = lambda d: d.get_length() if d.is_static else None  # noqa: E731
        self.sample_shape = tuple(static(xs[i]) for i in range(1, 4))
        self.fixed_batch = static(xs[0])

    def _metadata(self, model) -> dict[str, str]:
        """The ddpm_deploy.* metadata: our IR rt_info entries (written by ddpm-export --int8) first, else the ONNX
        metadata_props (rt_info['framework'])."""
        out: dict[str, str] = {}
        for section in ([], ["framework"]):
            for key in (ONNX_METADATA_KEY, PRECISION_METADATA_KEY):
                if key in out:
                    continue
                try:
                    out[key] = model.get_rt_info([*section, key]).astype(str)
                except Exception:  # absent key: OpenVINO raises
                    continue
        if ONNX_METADATA_KEY in out:
            json.loads(out[ONNX_METADATA_KEY])  # a malformed card fails in ModelCard.from_json with the file named
        return out

    @property
    def name(self) -> str:
        return "openvino-cpu"

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        self.request.infer({INPUT_X: x, INPUT_T: t.astype(T_DTYPE, copy=False)})
        return self.request.get_output_tensor(0).data.copy()  # the request reuses its output buffer

    def close(self) -> None:
        self.request = self.compiled = None
