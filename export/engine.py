"""ONNX -> TensorRT plan (+ ``model.plan.json`` sidecar), one code path for TensorRT >= 10 and TensorRT-RTX.

Written against the TensorRT 11 Python API: strongly typed networks (precision lives in the ONNX; no
BuilderFlag.FP16/INT8, no calibrators, no EXPLICIT_BATCH), ``OnnxParser.parse_from_file`` and
``Builder.build_serialized_network``. Options one flavour lacks or ignores are probed and skipped with a debug
log line:

- timing cache: deprecated no-op in TensorRT-RTX (>= 1.2), and it forces a GPU query that breaks CPU-only
  builds, so it is only used with ``tensorrt``;
- version compatibility: TensorRT-RTX fails the build without ``libnvinfer_lean`` (not in its wheels), so it is
  only applied with ``tensorrt``;
- ``builder_optimization_level``: set where the attribute exists (TensorRT-RTX 1.7 accepts it; its plans
  came out byte-identical for levels 0-5 on our fixture).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ddpm_deploy.runtime.backends.trt import FLAVOURS, INSTALL, RTX_MODULES, load_tensorrt  # noqa: F401
from ddpm_deploy.runtime.backends.trt import trt_logger as _logger
from ddpm_deploy.runtime.config import ModelCard
from ddpm_deploy.runtime.contract import (INPUT_NAMES, ONNX_METADATA_KEY, OUTPUT_NAMES, PlanSidecar, detect_precision,
                                          onnx_graphs)
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError, lazy_import
from ddpm_deploy.runtime.fileio import atomic_write_bytes, sha256_file
from ddpm_deploy.runtime.plan import RTX_SUPPORTED_CC, runs_on, sidecar_path

log = logging.getLogger(__name__)

INSTALL_RTX, INSTALL_TENSORRT = INSTALL["rtx"], INSTALL["tensorrt"]
DEFAULT_BATCH_MIN, DEFAULT_BATCH_OPT, DEFAULT_BATCH_MAX = 1, 8, 64
# compute capabilities a TensorRT-RTX plan can target (its support matrix; runtime.plan keeps where plans run)
RTX_TARGETS = tuple(f"{a}.{b}" for a, b in RTX_SUPPORTED_CC)
DEFAULT_WORKSPACE_MB = 4096
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default builder_optimization_level


@dataclass(frozen=True)
class EngineSettings:
    """Build options of one plan; saved (in part) in the sidecar under ``build`` and ``profile``."""

    batch_min: int = DEFAULT_BATCH_MIN
    batch_opt: int = DEFAULT_BATCH_OPT
    batch_max: int = DEFAULT_BATCH_MAX
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    opt_level: int = DEFAULT_OPT_LEVEL
    timing_cache: str | None = None
    version_compatible: bool = False
    tf32: bool = False  # TF32 tactics for fp32 layers: off keeps fp32 layers in full fp32 (the parity contract)
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX targets ("8.6", ...); () = its default (8.6/8.9/12.0)
    flavour: str = "auto"

    def __post_init__(self):
        b = (self.batch_min, self.batch_opt, self.batch_max)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in b) or not 1 <= b[0] <= b[1] <= b[2]:
            raise ConfigError(f"batch profile needs integers 1 <= min <= opt <= max, found min/opt/max = {b}")
        if not isinstance(self.workspace_mb, int) or self.workspace_mb < 1:
            raise ConfigError(f"workspace_mb must be a positive integer, found {self.workspace_mb!r}")
        if not isinstance(self.opt_level, int) or not 0 <= self.opt_level <= 5:
            raise ConfigError(f"opt_level (builder_optimization_level) must be 0..5, found {self.opt_level!r}")
        if self.flavour not in FLAVOURS:
            raise ConfigError(f"flavour must be one of {FLAVOURS}, found {self.flavour!r}")
        object.__setattr__(self, "compute_capabilities", tuple(str(c) for c in self.compute_capabilities))
        bad = [c for c in self.compute_capabilities if c not in RTX_TARGETS]
        if bad:
            raise ConfigError(f"compute capability {', '.join(bad)} cannot be targeted: TensorRT-RTX builds for "
                              f"{', '.join(RTX_TARGETS)} (A100 8.0, H100/H200 9.0 and B200 10.0 are not supported by "
                              f"TensorRT-RTX; build those plans with the 'tensorrt' flavour on the GPU itself)")
        if self.compute_capabilities and self.flavour == "tensorrt":
            raise ConfigError("--compute-capability applies to TensorRT-RTX plans; a 'tensorrt' plan is built for the "
                              "GPU it is built on: build it on the serving machine")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown engine settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# --- TensorRT plumbing -------------------------------------------------------------------------------------

def _dtype_name(dt) -> str:
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
             "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8", "INT4": "int4"}
    return names.get(dt.name, dt.name.lower())


def _network(trt, builder):
    """A strongly typed network (TensorRT 11 accepts the flag and makes every network strongly typed)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return builder.create_network(0 if flag is None else 1 << int(flag))


def _parse(trt, onnx_path: Path):
    """Builder, strongly typed network and parser holding the parsed ONNX; ArtifactError with every parser error."""
    if not onnx_path.is_file():
        raise ArtifactError(f"expected an ONNX model at {onnx_path}, found no such file; export it with ddpm-export")
    logger = _logger(trt)
    logger.errors.clear()
    builder = trt.Builder(logger)
    network = _network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            if e.node() < 0:
                where = "the model"
            else:
                name = f"{e.node_name()!r}, " if e.node_name() else ""
                where = f"node {e.node()} ({name}op {e.node_operator()})"
            errors.append(f"  - {where}: {e.desc()}")
        try:
            unsupported = _unsupported(parser, onnx_path)
        except ArtifactError:  # not even readable as ONNX
            unsupported = []
        hint = f"ops TensorRT does not support: {unsupported}; " if unsupported else ""
        raise ArtifactError(
            f"{onnx_path}: expected an ONNX model TensorRT can parse, found {parser.num_errors} parser error(s):\n"
            + "\n".join(errors) + f"\n{hint}check that the file is complete (re-export it with ddpm-export) and "
            "that every op in it is supported by TensorRT"
        )
    return builder, network, parser


def _io_of(network, settings: EngineSettings) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes as the network sees them, and the optimisation profile shapes of each input."""
    batch = (settings.batch_min, settings.batch_opt, settings.batch_max)
    inputs, outputs = [], []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if len(shape) == 0 or any(d < 0 for d in shape[1:]):
            raise ArtifactError(
                f"input {tensor.name!r} has shape {shape}; expected [batch, ...] with only the batch axis dynamic; "
                "re-export the ONNX with static C, H, W"
            )
        if shape[0] >= 0 and set(batch) != {shape[0]}:
            raise ConfigError(
                f"input {tensor.name!r} has a fixed batch of {shape[0]}, the requested profile is min/opt/max = "
                f"{batch}; use batch {shape[0]} for all three, or re-export with a dynamic batch axis"
            )
        profile = {k: [b, *shape[1:]] for k, b in zip(("min", "opt", "max"), batch)}
        inputs.append({"name": tensor.name, "dtype": _dtype_name(tensor.dtype), "shape": list(shape),
                       "profile": profile})
    for i in range(network.num_outputs):
        tensor = network.get_output(i)
        outputs.append({"name": tensor.name, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)})
    found_in, found_out = sorted(t["name"] for t in inputs), sorted(t["name"] for t in outputs)
    if found_in != sorted(INPUT_NAMES) or found_out != sorted(OUTPUT_NAMES):
        raise ArtifactError(
            f"expected a DDPM ε-model with inputs {list(INPUT_NAMES)} and outputs {list(OUTPUT_NAMES)}, "
            f"found inputs {found_in} and outputs {found_out}; export the model with ddpm-export"
        )
    return {"inputs": inputs, "outputs": outputs}


def network_io(onnx_path: str | os.PathLike, settings: EngineSettings | None = None, trt=None) -> dict[str, Any]:
    """Parse ``onnx_path`` and return ``{"inputs": [...], "outputs": [...]}`` as the builder sees them."""
    settings = settings or EngineSettings()
    trt = trt or load_tensorrt(settings.flavour)[0]
    _, network, _ = _parse(trt, Path(onnx_path))
    return _io_of(network, settings)


# --- ONNX inspection ---------------------------------------------------------------------------------------

def _load_onnx(onnx_path: Path):
    onnx = lazy_import("onnx", "reading ONNX models", "pip install 'ddpm-deploy[export]'")
    try:
        return onnx, onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # DecodeError and friends
        raise ArtifactError(f"{onnx_path}: expected an ONNX model, found an unreadable file ({e})") from e


def _unsupported(parser, onnx_path: Path) -> list[str]:
    _, model = _load_onnx(onnx_path)
    local = {(f.domain, f.name) for f in model.functions}
    ops = {n.op_type for _, nodes in onnx_graphs(model) for n in nodes if (n.domain, n.op_type) not in local}
    return sorted(op for op in ops if not parser.supports_operator(op))


def unsupported_ops(onnx_path: str | os.PathLike, trt=None) -> list[str]:
    """Op types of the ONNX graph for which the TensorRT parser's ``supports_operator`` says no (sorted)."""
    trt = trt or load_tensorrt("auto")[0]
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ArtifactError(f"expected an ONNX model at {onnx_path}, found no such file; export it with ddpm-export")
    builder = trt.Builder(_logger(trt))
    return _unsupported(trt.OnnxParser(_network(trt, builder), _logger(trt)), onnx_path)


def _model_card(model, onnx_path: Path) -> dict[str, Any]:
    meta = {p.key: p.value for p in model.metadata_props}
    if ONNX_METADATA_KEY not in meta:
        raise ArtifactError(
            f"{onnx_path}: expected the DDPM config under metadata_props[{ONNX_METADATA_KEY!r}], found keys "
            f"{sorted(meta)}; export the model with ddpm-export (it writes the config into the ONNX)"
        )
    return ModelCard.from_json(meta[ONNX_METADATA_KEY], f"{onnx_path} [{ONNX_METADATA_KEY}]").to_dict()


# --- build -------------------------------------------------------------------------------------------------

def _gpu_info() -> dict[str, str] | None:
    """Name and compute capability of GPU 0 (the runtime's one GPU probe), or None: no binding, driver or GPU."""
    from ddpm_deploy.runtime.device.info import probe_gpu

    props, why = probe_gpu(0)
    if props is None:
        log.debug("%s: the sidecar records no GPU", why)
        return None
    return {"name": props.name, "compute_capability": f"{props.compute_capability[0]}.{props.compute_capability[1]}"}


def _configure(trt, flavour: str, builder, config, io: dict, settings: EngineSettings) -> dict[str, Any]:
    """Profile, memory pool and the optional knobs; returns what was applied (for the sidecar)."""
    profile = builder.create_optimization_profile()
    for inp in io["inputs"]:
        profile.set_shape(inp["name"], *(tuple(inp["profile"][k]) for k in ("min", "opt", "max")))
    config.add_optimization_profile(profile)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    applied: dict[str, Any] = {"opt_level": None, "version_compatible": False, "timing_cache": None, "tf32": None}
    if hasattr(trt.BuilderFlag, "TF32"):  # on by default in TensorRT; fp32 layers then round inputs to 10 bits
        (config.set_flag if settings.tf32 else config.clear_flag)(trt.BuilderFlag.TF32)
        applied["tf32"] = bool(config.get_flag(trt.BuilderFlag.TF32))
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = settings.opt_level
        applied["opt_level"] = settings.opt_level
    else:
        log.debug("%s has no builder_optimization_level; opt_level=%s ignored", trt.__name__, settings.opt_level)
    applied["compute_capabilities"] = None
    if settings.compute_capabilities:
        if flavour != "rtx" or not hasattr(config, "set_compute_capability"):
            raise ConfigError(f"--compute-capability needs TensorRT-RTX; {trt.__name__} builds for the GPU it runs on")
        config.num_compute_capabilities = len(settings.compute_capabilities)
        for i, cc in enumerate(settings.compute_capabilities):
            if not config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + cc.replace(".", "")), i):
                raise ConfigError(f"{trt.__name__} {trt.__version__} refused compute capability {cc} as a build target")
        applied["compute_capabilities"] = list(settings.compute_capabilities)
    if settings.version_compatible:
        if flavour == "tensorrt" and hasattr(trt.BuilderFlag, "VERSION_COMPATIBLE"):
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            applied["version_compatible"] = True
        else:
            log.debug("version-compatible plans are not supported with %s; building a version-specific plan",
                      trt.__name__)
    return applied


def _timing_cache(flavour: str, config, path: str | None):
    """Attach the timing cache stored at ``path`` (or a new one); None where unsupported or not requested."""
    if path is None:
        return None
    if flavour != "tensorrt" or not hasattr(config, "create_timing_cache"):
        log.debug("timing cache %s not used: a no-op for the %s flavour", path, flavour)
        return None
    p = Path(path)
    cache = config.create_timing_cache(p.read_bytes() if p.is_file() else b"")
    if not config.set_timing_cache(cache, False):
        log.debug("timing cache %s does not match this TensorRT/GPU; starting a new one", p)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


class BuildProgress:
    """What a build reports while it runs (TensorRT's ``IProgressMonitor``): override any of the three. A phase may
    nest in another (``parent`` is None for the top level); returning False from ``step`` cancels the build."""

    def phase_start(self, name: str, parent: str | None, num_steps: int) -> None: ...

    def step(self, name: str, step: int) -> bool:
        return True

    def phase_finish(self, name: str) -> None: ...


def _monitor(trt, progress: BuildProgress):
    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            progress.phase_start(phase_name, parent_phase or None, int(num_steps))

        def step_complete(self, phase_name, step):
            return bool(progress.step(phase_name, int(step)))

        def phase_finish(self, phase_name):
            progress.phase_finish(phase_name)

    return _Monitor()


def build_engine(
    onnx_path: str | os.PathLike, plan_path: str | os.PathLike, settings: EngineSettings | None = None,
    progress: BuildProgress | None = None,
) -> PlanSidecar:
    """Build ``plan_path`` from ``onnx_path`` and write ``plan_path + '.json'``; returns the sidecar.
    ``progress`` sees the build's phases and steps where the TensorRT flavour has a progress monitor."""
    settings = settings or EngineSettings()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    trt, flavour = load_tensorrt(settings.flavour)
    builder, network, _parser = _parse(trt, onnx_path)
    _, model = _load_onnx(onnx_path)
    card = _model_card(model, onnx_path)
    io = _io_of(network, settings)

    config = builder.create_builder_config()
    applied = _configure(trt, flavour, builder, config, io, settings)
    cache = _timing_cache(flavour, config, settings.timing_cache)
    monitor = None
    if progress is not None and hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
        monitor = _monitor(trt, progress)  # kept alive until the build returns
        config.progress_monitor = monitor
    logger = _logger(trt)
    logger.errors.clear()
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    batch = {"min": settings.batch_min, "opt": settings.batch_opt, "max": settings.batch_max}
    if serialized is None:
        reported = "\n".join(f"  - {m}" for m in logger.errors) or "  (no error message; see the TensorRT log)"
        raise ArtifactError(
            f"{onnx_path}: TensorRT ({trt.__name__} {trt.__version__}) could not build an engine for the batch "
            f"profile min/opt/max = {batch['min']}/{batch['opt']}/{batch['max']} with {settings.workspace_mb} MiB "
            f"of workspace. TensorRT reported:\n{reported}\nCheck the log (DEBUG level shows the TensorRT log), "
            "try a smaller batch_max or a larger workspace"
        )
    plan = bytes(serialized)
    if cache is not None:
        atomic_write_bytes(settings.timing_cache, bytes(config.get_timing_cache().serialize()))
        applied["timing_cache"] = str(settings.timing_cache)
    atomic_write_bytes(plan_path, plan)
    onnx_sha = sha256_file(onnx_path)
    sidecar = PlanSidecar(
        ddpm=card,
        trt={"flavour": flavour, "module": trt.__name__.split(".")[0], "version": trt.__version__},
        precision=detect_precision(model),
        profile=batch,
        inputs=[{k: t[k] for k in ("name", "dtype", "shape")} for t in io["inputs"]],
        outputs=io["outputs"],
        gpu=_gpu_info(),
        onnx={"path": onnx_path.name, "sha256": onnx_sha},
        plan={"path": plan_path.name, "sha256": hashlib.sha256(plan).hexdigest(), "bytes": len(plan)},
        build={
            "seconds": round(seconds, 3),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "opt_level": applied["opt_level"],
            "workspace_mb": settings.workspace_mb,
            "version_compatible": applied["version_compatible"],
            "tf32": applied["tf32"],
            "compute_capabilities": applied["compute_capabilities"],
            "timing_cache": applied["timing_cache"],
        },
        model_sha256=onnx_sha,
    )
    sidecar.build["runs_on"] = runs_on(sidecar)  # compute capabilities, for people reading the sidecar
    sidecar.save(sidecar_path(plan_path))
    log.info("built %s (%d bytes, %s, %.1f s) from %s", plan_path, len(plan), flavour, seconds, onnx_path.name)
    return sidecar


# --- adopting a plan built elsewhere (trtexec, another tool) ------------------------------------------------

PLAN_MAGIC = {b"ftrt": "tensorrt", b"vtrt": "rtx"}  # first 4 bytes of a serialized engine, per flavour
_HEADER_VERSION = slice(24, 27)  # major, minor, patch bytes (observed in TensorRT-RTX 1.7 plans; not documented)


_HEADER_LENGTH = slice(16, 24)  # little-endian uint64: the whole plan's length in bytes (observed, as above)


def plan_header(data: bytes) -> dict[str, Any]:
    """What the first bytes of a plan say without TensorRT or a GPU: the flavour (by its magic), where the layout is
    the one we observed, the major.minor.patch version of the TensorRT that built it and the plan's length in bytes
    (``length``: None when the field is not there or not plausible, so the length cannot be checked)."""
    flavour = PLAN_MAGIC.get(bytes(data[:4]))
    if flavour is None:
        raise ArtifactError(f"expected a TensorRT plan (starting with 'ftrt' or 'vtrt'), found {bytes(data[:4])!r}")
    major, minor, patch = data[_HEADER_VERSION] if len(data) >= 27 else (0, 0, 0)
    version = f"{major}.{minor}.{patch}" if major else None
    length = int.from_bytes(data[_HEADER_LENGTH], "little") if len(data) >= 24 else 0
    return {"flavour": flavour, "version": version, "length": length if 32 <= length < 1 << 40 else None}


def check_plan_length(data: bytes, where) -> bool:
    """ArtifactError if the plan's header states a length other than the file's (a truncated copy, or bytes
    appended); False when the header states none (not checked), True when it matches."""
    stated = plan_header(data)["length"]
    if stated is None:
        return False
    if stated != len(data):
        what = "truncated" if stated > len(data) else "followed by other bytes"
        raise ArtifactError(f"{where}: the plan's header says {stated} bytes, the file has {len(data)}: it is {what} "
                            f"(an interrupted copy or download?); copy it again or rebuild it")
    return True


def adopt_plan(plan_path: str | os.PathLike, onnx_path: str | os.PathLike,
               settings: EngineSettings | None = None, precision: str | None = None, write=None) -> PlanSidecar:
    """Write the sidecar of a plan built elsewhere from ``onnx_path`` (e.g. by trtexec), after every check that can
    run here: the ONNX contract and card, the plan's magic, version and well-formedness (TensorRT's
    ``get_engine_validity``), and on a GPU a deserialization whose I/O names, dtypes and batch profile must match
    the ONNX and ``settings``' profile. Returns the sidecar (also saved as ``plan_path + '.json'``, or to
    ``write(sidecar_path)``'s path when given).

    ``precision``: what the plan was built as, as its builder says (``trtexec --fp16`` on an fp32 ONNX makes an fp16
    plan); default the ONNX's. What could not be checked here (without a GPU: the I/O, the batch profile, the
    precision and that the plan comes from this ONNX) is listed in the sidecar's ``build["unchecked"]`` and by
    ``ddpm-run info --engine``."""
    settings = settings or EngineSettings()
    plan_path, onnx_path = Path(plan_path), Path(onnx_path)
    if not plan_path.is_file():
        raise ArtifactError(f"expected a TensorRT plan at {plan_path}, found no such file")
    data = plan_path.read_bytes()
    try:
        header = plan_header(data)
    except ArtifactError as e:
        raise ArtifactError(f"{plan_path}: {e}") from None
    length_checked = check_plan_length(data, plan_path)
    trt, flavour = load_tensorrt(header["flavour"], f"adopting a {header['flavour']} plan")
    _, network, _ = _parse(trt, onnx_path)
    _, model = _load_onnx(onnx_path)
    card = _model_card(model, onnx_path)
    io = _io_of(network, settings)
    version = trt.__version__
    if header["version"] and not str(trt.__version__).startswith(header["version"] + "."):
        version = header["version"]
        log.warning("%s was built by %s %s; this machine has %s: it will not load here", plan_path.name,
                    flavour, header["version"], trt.__version__)
    runtime = trt.Runtime(_logger(trt))
    validity, diagnostics = runtime.get_engine_validity(data) if hasattr(runtime, "get_engine_validity") else (None, 0)
    malformed = getattr(getattr(trt, "EngineInvalidityDiagnostics", None), "MALFORMED_ENGINE", None)
    if malformed is not None and int(diagnostics) & int(malformed):
        raise ArtifactError(f"{plan_path}: {trt.__name__} {trt.__version__} says this plan is malformed "
                            f"(get_engine_validity: {validity}); rebuild it")
    gpu = _gpu_info()
    verified_on = _verify_on_gpu(trt, runtime, data, plan_path, io, settings) if gpu else None
    batch = {"min": settings.batch_min, "opt": settings.batch_opt, "max": settings.batch_max}
    onnx_sha = sha256_file(onnx_path)
    onnx_precision = detect_precision(model)
    unchecked = []
    if not length_checked:
        unchecked.append("the plan's length (its header states none that this version reads)")
    if not verified_on:
        why = "no GPU here" if not gpu else f"it does not deserialize on {gpu.get('name')}"
        unchecked += [f"the engine's I/O names and dtypes against the ONNX ({why})",
                      f"the batch profile {batch['min']}/{batch['opt']}/{batch['max']} ({why})",
                      f"that the plan was built from {onnx_path.name} ({why}; only its I/O could say)"]
    unchecked.append(f"the precision {precision or onnx_precision}: "
                     + (f"as given (--precision), the ONNX is {onnx_precision}" if precision else
                        f"taken from the ONNX; a plan built with trtexec --fp16/--bf16 from it is not {onnx_precision} "
                        "(give --precision)"))
    sidecar = PlanSidecar(
        ddpm=card,
        trt={"flavour": flavour, "module": trt.__name__.split(".")[0], "version": version},
        precision=precision or onnx_precision,
        profile=batch,
        inputs=[{k: t[k] for k in ("name", "dtype", "shape")} for t in io["inputs"]],
        outputs=io["outputs"],
        gpu=gpu if verified_on else None,
        onnx={"path": onnx_path.name, "sha256": onnx_sha},
        plan={"path": plan_path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
        build={"adopted": True, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "header": header, "verified_on_gpu": verified_on, "onnx_precision": onnx_precision,
               "unchecked": unchecked, "compute_capabilities": list(settings.compute_capabilities) or None},
        model_sha256=onnx_sha,
    )
    sidecar.build["runs_on"] = runs_on(sidecar)
    sidecar.save(write(sidecar_path(plan_path)) if write else sidecar_path(plan_path))
    log.info("adopted %s (%s %s, batch %s) from %s", plan_path, flavour, version, batch, onnx_path.name)
    return sidecar


def _verify_on_gpu(trt, runtime, data: bytes, plan_path: Path, io: dict, settings: EngineSettings) -> str | None:
    """Deserialize on GPU 0 and compare the engine's I/O and profile with the ONNX and the given profile; the GPU's
    name when they match, None when TensorRT cannot load the plan here (reported, not fatal: adopt on the target)."""
    from ddpm_deploy.runtime.device.cuda import GpuContext

    with GpuContext(0) as gpu:
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            log.warning("%s does not deserialize on %s (%s); the sidecar is written from the ONNX and the header",
                        plan_path.name, gpu.props.name, "; ".join(_logger(trt).errors[-3:]) or "no message")
            return None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        found = {n: (engine.get_tensor_mode(n).name, _dtype_name(engine.get_tensor_dtype(n))) for n in names}
        want = {t["name"]: ("INPUT", t["dtype"]) for t in io["inputs"]}
        want.update({t["name"]: ("OUTPUT", t["dtype"]) for t in io["outputs"]})
        if found != want:
            raise ArtifactError(f"{plan_path}: the engine's I/O is {found}, the ONNX's is {want}: the plan was not "
                                f"built from this ONNX")
        lo, opt, hi = (int(d[0]) for d in engine.get_tensor_profile_shape(INPUT_NAMES[0], 0))
        if (lo, opt, hi) != (settings.batch_min, settings.batch_opt, settings.batch_max):
            raise ArtifactError(f"{plan_path}: the engine's batch profile is {lo}/{opt}/{hi}, not the "
                                f"{settings.batch_min}/{settings.batch_opt}/{settings.batch_max} given; pass "
                                f"--batch-min {lo} --batch-opt {opt} --batch-max {hi}")
        return gpu.props.name
