"""ONNX Runtime: the session helper shared by the CPU and CUDA runners, and the CPU runner (host arrays).

``OrtSession`` opens a model on one execution provider, refuses a session that silently fell back to another
provider, and checks the model's I/O against ``runtime.contract``; ``OrtRunner`` (CPU) and
``ort_cuda.OrtCudaRunner`` (CUDA, device buffers) are thin runners over it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from ..config import ModelCard
from ..contract import INPUT_T, INPUT_X, IO_TEXT, ONNX_METADATA_KEY, ORT_TYPES, OUTPUT_EPS, T_DTYPE, detect_precision
from ..diffusers_config import (DIFFUSERS_EPS, DIFFUSERS_T, DIFFUSERS_X, T_TYPES, DiffusersIo, card_beside,
                                is_diffusers_io)
from ..errors import ArtifactError, ConfigError, invalid, lazy_import, out_of_memory
from .base import Runner

log = logging.getLogger(__name__)

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
INSTALL = {"cpu": "pip install onnxruntime",
           "cuda": "install onnxruntime-gpu instead of onnxruntime (pip uninstall onnxruntime && pip install "
                   "onnxruntime-gpu; never both in one environment)"}


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


OOM_MARKERS = ("failed to allocate memory", "bad_alloc", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ONNX Runtime failed for want of memory: its arena's "Failed to allocate memory for requested buffer",
    a C++ ``std::bad_alloc`` (pybind11 raises it as MemoryError), or CUDA's "out of memory"."""
    return isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in OOM_MARKERS)


def oom_detail(exc: BaseException) -> str:
    """The part of ONNX Runtime's message that says what failed: the node and the allocation (its first line is
    mostly a source location)."""
    import re

    text = str(exc)
    node = re.search(r"running (\S+) node\. Name:'([^']*)'", text)
    alloc = re.search(r"(Failed to allocate memory[^\n]*|std::bad_alloc|bad_alloc|out of memory[^\n]*)", text, re.I)
    parts = [f"{node.group(1)} node {node.group(2)}" if node else "", alloc.group(1).strip() if alloc else ""]
    return ": ".join(p for p in parts if p) or first_line(exc) or type(exc).__name__


def check_provider(ort, device: str) -> None:
    """ConfigError unless this onnxruntime offers the provider of ``device`` (before any GPU is touched)."""
    available = ort.get_available_providers()
    if PROVIDERS[device] not in available:
        raise ConfigError(f"requested provider {PROVIDERS[device]}, but this onnxruntime offers {available}; "
                          f"{INSTALL[device]}")


def preload_cuda(ort) -> None:
    """Load the CUDA/cuDNN libraries of the nvidia-* wheels where this onnxruntime-gpu can (>= 1.21); without it
    the CUDA provider may fail to load them and ONNX Runtime falls back to the CPU (which OrtSession refuses)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as e:  # best effort: a system CUDA install may be found anyway
            log.debug("onnxruntime.preload_dlls() failed: %s", e)


class OrtSession:
    """An ONNX Runtime session of a ddpm-deploy ε model on exactly one execution provider.

    ``provider_options`` are the provider's options (strings); ``threads`` 0 leaves ONNX Runtime's default.
    ``batch_dims``: symbolic dimension name -> size, fixed before the graph is optimised (ONNX Runtime's free
    dimension override): with the batch known, constant folding turns the model's shape subgraphs (Shape, Gather,
    Concat of int64 feeding Reshape) into constants, so nothing is left that the CUDA provider would place on the
    CPU, and ONNX Runtime's CUDA graph can capture the run. ``optimized_path``: where ONNX Runtime saves the
    optimised graph (a diagnostic: which nodes remain, Memcpy nodes the provider inserted).
    Attributes after opening: ``session``, ``sample_shape`` (C, H, W), ``fixed_batch``, ``card``, ``precision``.
    """

    def __init__(self, path: str | os.PathLike, device: str, opt_level: str = "all", threads: int = 0,
                 provider_options: dict[str, str] | None = None, batch_dims: dict[str, int] | None = None,
                 optimized_path: str | os.PathLike | None = None):
        self.ort = ort = lazy_import("onnxruntime", f"The ONNX Runtime {device.upper()} backend", INSTALL.get(device))
        self.path = Path(path)
        if device not in PROVIDERS:
            raise ConfigError(f"device must be one of {sorted(PROVIDERS)}, found {device!r}")
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: ONNX file not found (export one with ddpm-export)")
        if opt_level not in OPT_LEVELS:
            raise ConfigError(f"graph optimisation level must be one of {sorted(OPT_LEVELS)}, found {opt_level!r}")
        if int(threads) < 0:
            raise ConfigError(invalid("threads", threads, "must be >= 0 (0: ONNX Runtime's default)"))
        self.provider = PROVIDERS[device]
        check_provider(ort, device)
        if device == "cuda":
            preload_cuda(ort)
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
        if threads:
            so.intra_op_num_threads = int(threads)
        # worker threads sleep between ε calls instead of spinning: as fast on an idle machine, and 1.6x faster
        # with another process on the cores (benchmarks/results/cpu-threads-*; DDPM_ORT_SPIN=1 restores spinning)
        so.add_session_config_entry("session.intra_op.allow_spinning",
                                    "1" if os.environ.get("DDPM_ORT_SPIN") == "1" else "0")
        so.log_severity_level = 3
        for name, size in (batch_dims or {}).items():
            so.add_free_dimension_override_by_name(name, int(size))
        if optimized_path is not None:
            so.optimized_model_filepath = str(optimized_path)
        providers = [(self.provider, provider_options)] if provider_options is not None else [self.provider]
        self.session = ort.InferenceSession(str(self.path), so, providers=providers)  # callers map ORT's errors
        got = self.session.get_providers()
        if not got or got[0] != self.provider:
            # ONNX Runtime builds a CPU session when the CUDA provider's libraries fail to load (a warning only)
            raise ConfigError(
                f"{self.path}: asked ONNX Runtime for {self.provider}, but the session runs on {got}: the provider "
                f"failed to load (CUDA/cuDNN libraries missing or mismatched; run with -v for ONNX Runtime's log). "
                f"{INSTALL[device]}"
            )
        self.io: DiffusersIo | None = None  # set for an ONNX with diffusers' I/O names (runtime.diffusers_config)
        self._check_io()
        meta = self.session.get_modelmeta().custom_metadata_map
        self.card: ModelCard | None = (
            ModelCard.from_json(meta[ONNX_METADATA_KEY], f"{self.path} metadata") if ONNX_METADATA_KEY in meta else None
        )
        if self.io is not None and self.card is None:
            self.card, _, where = card_beside(self.path, self.sample_shape)
            self.io = dataclasses.replace(self.io, scheduler_config=str(where))
        self.precision = detect_precision(self.session, self.path)

    def _check_io(self) -> None:
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        if is_diffusers_io(ins, list(outs)):
            self._check_diffusers_io(ins, outs)
            return
        if set(ins) != {INPUT_X, INPUT_T} or list(outs) != [OUTPUT_EPS]:
            raise ArtifactError(f"{self.path}: expected {IO_TEXT}, found inputs {sorted(ins)} and outputs "
                                f"{list(outs)}; export the model with ddpm-export")
        for name, arg in [*ins.items(), *outs.items()]:
            if arg.type != ORT_TYPES[name]:
                raise ArtifactError(f"{self.path}: expected {IO_TEXT}, found {name} of type {arg.type}")
        self._check_shapes(ins[INPUT_X].shape, outs[OUTPUT_EPS].shape, ins[INPUT_T].shape)

    def _check_diffusers_io(self, ins, outs) -> None:
        """sample float32 [B,C,H,W], timestep int64/float32/int32 of [B], [1] or [] → out_sample float32."""
        x, t, e = ins[DIFFUSERS_X], ins[DIFFUSERS_T], outs[DIFFUSERS_EPS]
        want = f"{DIFFUSERS_X} float32 [B,C,H,W], {DIFFUSERS_T} int64 or float32 ([B], [1] or a scalar) → {DIFFUSERS_EPS} float32"
        if x.type != "tensor(float)" or e.type != "tensor(float)" or t.type not in T_TYPES or len(t.shape) > 1:
            raise ArtifactError(f"{self.path}: expected {want}, found {DIFFUSERS_X} {x.type}, {DIFFUSERS_T} {t.type} "
                                f"{t.shape}, {DIFFUSERS_EPS} {e.type}")
        self.io = DiffusersIo(t.type, tuple(t.shape), "")
        self._check_shapes(x.shape, e.shape, t.shape if self.io.per_image else None, DIFFUSERS_X, DIFFUSERS_EPS)

    def _check_shapes(self, xs, es, ts, x_name: str = INPUT_X, eps_name: str = OUTPUT_EPS) -> None:
        if len(xs) != 4 or len(es) != 4:
            raise ArtifactError(f"{self.path}: expected {IO_TEXT}, found {x_name} {xs} and {eps_name} {es}")
        static = lambda d: int(d) if isinstance(d, int) else None  # noqa: E731
        self.sample_shape = tuple(static(d) for d in xs[1:])
        eps_shape = tuple(static(d) for d in es[1:])
        if any(a is not None and b is not None and a != b for a, b in zip(self.sample_shape, eps_shape)):
            raise ArtifactError(f"{self.path}: {eps_name} must have the shape of {x_name}, found {x_name} {xs} and {eps_name} {es}")
        xb, eb = static(xs[0]), static(es[0])
        if eb is not None and xb != eb:
            raise ArtifactError(f"{self.path}: {eps_name} must have {x_name}'s batch axis, found {x_name} {xs} and {eps_name} {es} (a model that "
                                f"returns batch {eb} for any batch would be broadcast over the samples)")
        self.fixed_batch = static(xs[0])
        # the symbolic names of the inputs' batch axes (x, t), for batch_dims: empty when x's batch is fixed or
        # unnamed (ONNX Runtime then reports None; it invents names like "unk__233" for outputs only)
        self.batch_dim_names = (sorted({d for d in (xs[0], ts[0] if ts else None) if isinstance(d, str) and d})
                                if isinstance(xs[0], str) and xs[0] else [])


class OrtRunner(Runner):
    """``eps(x, t)`` through ONNX Runtime on the CPU."""

    device = "cpu"

    def __init__(self, path: str | os.PathLike, threads: int = 0, opt_level: str = "all"):
        self.path = Path(path)
        try:
            self._s = OrtSession(path, "cpu", opt_level=opt_level, threads=threads)
        except (ArtifactError, ConfigError):
            raise
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/… types
            raise ArtifactError(f"{self.path}: ONNX Runtime cannot load this model ({first_line(e)})") from None
        self.session, self.card, self.precision = self._s.session, self._s.card, self._s.precision
        self.sample_shape, self.fixed_batch = self._s.sample_shape, self._s.fixed_batch
        self.io = self._s.io  # diffusers' I/O names, mapped (None: our contract's)
        # a failed run is raised with ONNX Runtime's message (mapped below); its own log line of it would be a
        # second, unformatted error on stderr
        self._run_options = self._s.ort.RunOptions()
        self._run_options.log_severity_level = 4

    @property
    def name(self) -> str:
        return "onnxruntime-cpu"

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        try:
            if self.io is None:
                return self.session.run([OUTPUT_EPS], {INPUT_X: x, INPUT_T: t.astype(T_DTYPE, copy=False)},
                                        self._run_options)[0]
            runs = self.io.feeds(x, t)
            if len(runs) == 1:
                return self.session.run([DIFFUSERS_EPS], runs[0][1], self._run_options)[0]
            out = np.empty_like(x)
            for rows, feeds in runs:
                out[rows] = self.session.run([DIFFUSERS_EPS], feeds, self._run_options)[0]
            return out
        except Exception as e:  # ORT's RuntimeException/Fail, or MemoryError from a std::bad_alloc
            if is_out_of_memory(e):
                raise out_of_memory(f"{self.path}: ONNX Runtime", len(x), oom_detail(e)) from None
            raise

    def close(self) -> None:
        self.session = None
