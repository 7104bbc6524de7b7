"""The contracts every layer shares: the ε model's I/O, its precision, and every JSON artifact we write.

- **I/O**: inputs ``x`` float32 [B, C, H, W] and ``t`` int32 [B], output ``eps`` float32 [B, C, H, W], one
  dynamic batch axis. Defined here once; the exporter, the engine builder and every runner import it.
- **Precision** of an ONNX model: ``detect_precision`` (the ``ddpm_deploy.precision`` metadata the exporters
  write, else a walk of the graph).
- **Artifacts**: one dataclass per JSON file (plan sidecar, run.json, export report, precision report, parity
  report, bench results, fid.json, the header of a FID statistics file). Each carries ``schema``, ``schema_version``, the package versions that wrote it and
  the SHA-256 of the model it describes; ``to_json`` / ``from_json`` are the only writer and reader, so a
  file that round-trips here is a file every command can read.

This module needs only NumPy and the standard library (``onnx`` optionally, for the graph walk).
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .errors import ArtifactError
from .fileio import atomic_write_text

# --- the ε model's I/O ---------------------------------------------------------------------------------------

INPUT_X, INPUT_T, OUTPUT_EPS = "x", "t", "eps"
INPUT_NAMES, OUTPUT_NAMES = (INPUT_X, INPUT_T), (OUTPUT_EPS,)
X_DTYPE, T_DTYPE, EPS_DTYPE = np.float32, np.int32, np.float32  # t is int32 (documented in the README)
IO_DTYPES = {INPUT_X: "float32", INPUT_T: "int32", OUTPUT_EPS: "float32"}
ORT_TYPES = {INPUT_X: "tensor(float)", INPUT_T: "tensor(int32)", OUTPUT_EPS: "tensor(float)"}
IO_TEXT = "inputs x float32 [B,C,H,W] and t int32 [B], output eps float32 [B,C,H,W]"

ONNX_METADATA_KEY = "ddpm_deploy.config"  # the ModelCard JSON (runtime.config)
PRECISION_METADATA_KEY = "ddpm_deploy.precision"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
UNKNOWN_PRECISION = "unknown"


def onnx_graphs(model):
    """Every graph of an ONNX ModelProto as ``(graph or None, nodes)``: the main graph, the subgraphs of
    If/Loop/Scan, then the bodies of local functions (graph None)."""
    import onnx

    stack = [model.graph]
    while stack:
        graph = stack.pop()
        yield graph, graph.node
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    for fn in model.functions:
        yield None, fn.node


def _precision_from_graph(model) -> str:
    """'fp16' if any float16 initializer, typed tensor, Cast-to-fp16 or fp16 constant is in an ONNX ModelProto
    (main graph, subgraphs and local functions), 'bf16' likewise, else 'fp32'."""
    import onnx

    found: set[int] = set()
    for graph, nodes in onnx_graphs(model):
        if graph is not None:
            found.update(init.data_type for init in graph.initializer)
            for vi in (*graph.input, *graph.output, *graph.value_info):
                if vi.type.HasField("tensor_type"):
                    found.add(vi.type.tensor_type.elem_type)
        for node in nodes:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to":
                    found.add(attr.i)
                elif attr.type == onnx.AttributeProto.TENSOR:
                    found.add(attr.t.data_type)
    for dtype, name in ((onnx.TensorProto.FLOAT16, "fp16"), (onnx.TensorProto.BFLOAT16, "bf16")):
        if dtype in found:
            return name
    return "fp32"


def detect_precision(model, path: str | os.PathLike | None = None) -> str:
    """The precision of an ONNX ε model: 'fp32', 'fp16', 'bf16', 'int8' or 'unknown'.

    ``model`` is a path, an ``onnx.ModelProto`` or an ONNX Runtime session (``path``: its file). The ``ddpm_deploy.precision``
    metadata written by ddpm-export wins; without it the graph is walked (needs the ``onnx`` package; a session
    alone cannot show its initializers, so 'unknown' is returned then). Never guessed from a file name.
    """
    meta: dict[str, str] = {}
    proto = None
    if hasattr(model, "get_modelmeta"):  # an onnxruntime.InferenceSession
        meta = dict(model.get_modelmeta().custom_metadata_map)
        path = path or getattr(model, "_model_path", None)
    elif hasattr(model, "graph"):
        proto = model
        meta = {p.key: p.value for p in model.metadata_props}
    else:
        path = model
    if PRECISION_METADATA_KEY not in meta and proto is None and path:
        try:
            import onnx
        except ImportError:
            return meta.get(PRECISION_METADATA_KEY, UNKNOWN_PRECISION)
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # DecodeError and friends
            raise ArtifactError(f"{path}: expected an ONNX model, found an unreadable file ({e})") from None
        meta = {p.key: p.value for p in proto.metadata_props}
    if PRECISION_METADATA_KEY in meta:
        value = meta[PRECISION_METADATA_KEY]
        if value not in PRECISIONS:
            raise ArtifactError(f"metadata {PRECISION_METADATA_KEY}={value!r}: expected one of {PRECISIONS}")
        return value
    return _precision_from_graph(proto) if proto is not None else UNKNOWN_PRECISION


# --- package versions ------------------------------------------------------------------------------------------

VERSIONED_PACKAGES = ("ddpm-deploy", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "tensorrt",
                      "tensorrt-rtx-cu13-bindings", "cuda-bindings", "polygraphy", "diffusers", "nvidia-modelopt",
                      "openvino", "nncf")


def package_versions() -> dict[str, str]:
    """Versions of the installed packages that shape an artifact (those not installed are left out)."""
    from importlib import metadata

    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


# --- artifacts -------------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """JSON-ready: tuples → lists, NumPy scalars → Python, Paths → str (recursively)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return str(value)
    return value


@dataclass(kw_only=True)
class Artifact:
    """Base of every JSON artifact: ``schema`` and ``schema_version`` (class constants, written first), the
    writing packages' versions and the described model's SHA-256, then the subclass's fields."""

    SCHEMA: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[int] = 1
    OLDER_VERSIONS: ClassVar[tuple[int, ...]] = ()  # earlier versions still read (their missing keys have defaults)
    WHAT: ClassVar[str] = "artifact"
    REWRITE: ClassVar[str] = "write it again with this ddpm-deploy"

    model_sha256: str | None = None
    versions: dict[str, str] = field(default_factory=package_versions)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema": self.SCHEMA, "schema_version": self.SCHEMA_VERSION}
        for f in fields(self):
            d[f.name] = _plain(getattr(self, f.name))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a reader never sees half a file)."""
        atomic_write_text(path, self.to_json())
        return Path(path)

    @classmethod
    def from_dict(cls, d: Any, where: str = "artifact"):
        if not isinstance(d, dict):
            raise ArtifactError(f"{where}: expected a JSON object ({cls.WHAT}), found {type(d).__name__}; {cls.REWRITE}")
        if d.get("schema") != cls.SCHEMA:
            raise ArtifactError(f"{where}: expected schema {cls.SCHEMA!r}, found {d.get('schema')!r}; {cls.REWRITE}")
        if d.get("schema_version") != cls.SCHEMA_VERSION and d.get("schema_version") not in cls.OLDER_VERSIONS:
            raise ArtifactError(f"{where}: expected schema_version {cls.SCHEMA_VERSION} of {cls.SCHEMA!r}, found "
                                f"{d.get('schema_version')!r}; {cls.REWRITE}")
        known = {f.name: f for f in fields(cls)}
        required = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in d]
        unknown = sorted(set(d) - set(known) - {"schema", "schema_version"})
        if missing or unknown:
            raise ArtifactError(f"{where}: {cls.WHAT} with missing keys {missing} and unknown keys {unknown} "
                                f"(schema {cls.SCHEMA} v{cls.SCHEMA_VERSION}); {cls.REWRITE}")
        return cls(**{n: d[n] for n in known if n in d})

    @classmethod
    def from_json(cls, text: str, where: str = "artifact"):
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{where}: expected JSON ({cls.WHAT}), found an unreadable file ({e}); "
                                f"{cls.REWRITE}") from None
        return cls.from_dict(d, where)

    @classmethod
    def load(cls, path: str | os.PathLike):
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ArtifactError(f"expected the {cls.WHAT} {p}, found no such file; {cls.REWRITE}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{p}: cannot read the {cls.WHAT} ({e}); {cls.REWRITE}") from None
        return cls.from_json(text, str(p))


@dataclass(kw_only=True)
class PlanSidecar(Artifact):
    """``model.plan.json``: what a TensorRT plan is (model, flavour, profile, I/O) and the hash of its bytes.
    ``model_sha256`` is the SHA-256 of the source ONNX."""

    SCHEMA: ClassVar[str] = "ddpm-deploy/plan"
    SCHEMA_VERSION: ClassVar[int] = 2
    WHAT: ClassVar[str] = "plan sidecar"
    REWRITE: ClassVar[str] = "rebuild the plan and its sidecar together with `ddpm-export --engine`"

    ddpm: dict[str, Any]                 # the ModelCard
    trt: dict[str, str]                  # flavour, module, version
    precision: str
    profile: dict[str, int]              # min, opt, max batch
    inputs: list[dict[str, Any]]         # name, dtype, shape
    outputs: list[dict[str, Any]]
    onnx: dict[str, str]                 # path (name), sha256
    plan: dict[str, Any]                 # path (name), sha256, bytes
    build: dict[str, Any]                # seconds, timestamp, opt_level, workspace_mb, version_compatible, ...
    gpu: dict[str, str] | None = None    # name, compute_capability of the build machine (None: built without one)


@dataclass(kw_only=True)
class RunInfo(Artifact):
    """``run.json`` of ``ddpm-run sample`` (and ``ddpm-run request``): what was sampled, how, and how fast.
    ``model_sha256``: the ONNX/plan. v2 added ``shard`` (index, count, num_total of a ``--shard I/N`` run); v3
    ``status`` ("running" while a job writes, "interrupted"/"failed" when it stopped early, "complete") and ``done``
    (the finished indices as inclusive [first, last] ranges); v4 ``scheduler`` (the step plan's scheduler, options and
    number of ε calls: ``StepPlan.describe()``); v5 ``precision_choice`` (``--precision auto``: what was asked, the
    backend and precision chosen, why, and the precision that ran). v2 files read as complete, v2/v3 files as DDPM
    ancestral sampling."""

    SCHEMA: ClassVar[str] = "ddpm-deploy/samples"
    SCHEMA_VERSION: ClassVar[int] = 5
    OLDER_VERSIONS: ClassVar[tuple[int, ...]] = (2, 3, 4)
    WHAT: ClassVar[str] = "sampling record (run.json)"
    REWRITE: ClassVar[str] = "sample again with ddpm-run sample"

    seed: int
    num: int
    batch: int
    start_index: int
    steps: int
    num_timesteps: int
    backend: str
    runner: str
    loop: str
    precision: str
    model: str
    diffusion: dict[str, Any]
    total_seconds: float
    images_per_second: float
    timings: dict[str, Any]
    host: dict[str, Any] = field(default_factory=dict)
    shard: dict[str, int] | None = None  # {"index": i, "count": n, "num_total": N} of a sharded job
    status: str = "complete"
    done: list[list[int]] | None = None  # finished indices, inclusive ranges; None: all of them (v2)
    scheduler: dict[str, Any] | None = None  # StepPlan.describe(); None: DDPM ancestral (v2, v3)
    precision_choice: dict[str, Any] | None = None  # --precision auto: asked, backend, precision, reason, ran (v5)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def done_count(self) -> int:
        return self.num if self.done is None else sum(b - a + 1 for a, b in self.done)


@dataclass(kw_only=True)
class MergeInfo(Artifact):
    """``run.json`` of ``ddpm-run merge``: the shards merged into one samples.npz (ordered by index).
    ``model_sha256``: the model every shard was sampled with."""

    SCHEMA: ClassVar[str] = "ddpm-deploy/merged-samples"
    SCHEMA_VERSION: ClassVar[int] = 2  # v2: scheduler
    OLDER_VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    WHAT: ClassVar[str] = "merge record (run.json of ddpm-run merge)"
    REWRITE: ClassVar[str] = "merge again with ddpm-run merge"

    seed: int
    num: int
    first_index: int
    steps: int
    num_timesteps: int
    precision: str
    diffusion: dict[str, Any]
    shards: list[dict[str, Any]]         # dir, shard, start_index, num, backend, total_seconds, run_json_sha256
    sampling_seconds: float              # sum over the shards
    scheduler: dict[str, Any] | None = None  # the shards' StepPlan.describe() (None: DDPM ancestral, older shards)

    # what a reader of samples asks of any sampling record (RunInfo has these as fields)
    status: ClassVar[str] = "complete"
    complete: ClassVar[bool] = True

    def done_count(self) -> int:
        return self.num

    @property
    def start_index(self) -> int:
        return self.first_index

    @property
    def backend(self) -> str:
        return ",".join(dict.fromkeys(str(s.get("backend")) for s in self.shards))

    @property
    def total_seconds(self) -> float:
        return float(self.sampling_seconds)

    @property
    def images_per_second(self) -> float:
        return self.num / self.sampling_seconds if self.sampling_seconds > 0 else float("nan")


def load_samples_record(path: str | os.PathLike) -> "RunInfo | MergeInfo":
    """The run.json beside a samples.npz, whichever command wrote it: ``ddpm-run sample``/``request``
    (:class:`RunInfo`) or ``ddpm-run merge`` (:class:`MergeInfo`). Every reader of samples goes through here, so
    every kind of samples we write is read."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"expected the sampling record {p}, found no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{p}: cannot read the sampling record ({e}); sample or merge again") from None
    schema = d.get("schema") if isinstance(d, dict) else None
    if schema == MergeInfo.SCHEMA:
        return MergeInfo.from_dict(d, str(p))
    if schema == RunInfo.SCHEMA:
        return RunInfo.from_dict(d, str(p))
    raise ArtifactError(f"{p}: expected a sampling record (schema {RunInfo.SCHEMA!r} of ddpm-run sample or "
                        f"{MergeInfo.SCHEMA!r} of ddpm-run merge), found schema {schema!r}")


@dataclass(kw_only=True)
class ExportReport(Artifact):
    """``export_report.json``: where an ONNX came from and its check against the PyTorch model right after export.
    ``model_sha256``: the ONNX written."""

    SCHEMA: ClassVar[str] = "ddpm-deploy/export-report"
    WHAT: ClassVar[str] = "export report"
    REWRITE: ClassVar[str] = "export again with ddpm-export"

    onnx: str
    source: dict[str, Any]               # run_dir/weights/step, or the diffusers directory and layout
    export_seconds: float
    verify_fp32: dict[str, Any]          # passed, atol, max_abs, cases


@dataclass(kw_only=True)
class PrecisionReport(Artifact):
    """``precision.json`` (``precision.bf16.json``) of ``ddpm-export --precision fp16|bf16``: which nodes stayed
    fp32 and why, and the ε error per timestep bucket. ``model_sha256``: the fp32 source ONNX."""

    SCHEMA: ClassVar[str] = "ddpm-deploy/precision"
    WHAT: ClassVar[str] = "precision report"
    REWRITE: ClassVar[str] = "export again with ddpm-export --fp16"

    precision: str                       # "fp16-mixed" or "bf16-mixed"
    onnx_fp32: str
    onnx_mixed: str | None               # the mixed-precision file written (None when rejected)
    passed: bool
    tolerance: dict[str, Any]
    calibration: dict[str, Any]
    conversion: dict[str, Any]
    error: dict[str, Any]


@dataclass(kw_only=True)
class ParityReport(Artifact):
    """``parity.json`` of ``ddpm-run parity``: every level, the runner class that ran it, pass/fail/not run and
    why. ``model_sha256``: the ONNX checked (None without one)."""

    SCHEMA: ClassVar[str] = "ddpm-deploy/parity"
    SCHEMA_VERSION: ClassVar[int] = 2
    WHAT: ClassVar[str] = "parity report"
    REWRITE: ClassVar[str] = "run ddpm-run parity again"

    passed: bool
    failed: list[str]
    checkpoint: str
    reference: str
    onnx: str | None
    engine: str | None
    device: str
    steps: int
    batch: int
    seed: int
    diffusion: dict[str, Any]
    tolerances: dict[str, float]
    levels: list[dict[str, Any]]
    seconds: float
    environment: dict[str, Any]


@dataclass(kw_only=True)
class BenchResults(Artifact):
    """``results.json`` of a benchmark: the machine (CPU flags, GPU), the command and one row per measurement."""

    SCHEMA: ClassVar[str] = "ddpm-deploy/bench"
    WHAT: ClassVar[str] = "benchmark results"
    REWRITE: ClassVar[str] = "run the benchmark again"

    machine: dict[str, Any]
    date: str
    command: str
    statistic: str
    warmup: int
    repeat: int
    results: list[dict[str, Any]]
    engine_builds: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)  # test outcomes run with it (the GPU check)


@dataclass(kw_only=True)
class FidStatsHeader(Artifact):
    """The JSON header inside a FID statistics file (``ddpm-run fid-stats``, a .npz that also holds μ, Σ and KID's
    reference features): how many images, from where, and which extractor (weights SHA-256, preprocessing)."""

    SCHEMA: ClassVar[str] = "ddpm-deploy/fid-stats"
    WHAT: ClassVar[str] = "FID statistics header"
    REWRITE: ClassVar[str] = "compute the statistics again with `ddpm-run fid-stats REF --out FILE`"

    count: int
    feature_dim: int
    extractor: dict[str, Any]            # name, weights_sha256, preprocess
    source: str                          # the dataset spec or image set the statistics describe
    image_shape: list[int] | None        # H, W, C of the images before the resize to 299
    kid_features: int                    # reference features kept for KID


@dataclass(kw_only=True)
class FidReport(Artifact):
    """``fid.json`` of ``ddpm-run fid`` / ``fid-compare``: FID and KID of a set of samples against a reference, the
    image count on each side (FID is biased for small sets: ``small_sample`` and ``warnings`` say so), the
    extractor's identity and, for a precision/backend comparison, the paired per-image differences and the
    gate. ``model_sha256``: the model that made the samples, when their run.json says."""

    SCHEMA: ClassVar[str] = "ddpm-deploy/fid"
    WHAT: ClassVar[str] = "FID report (fid.json)"
    REWRITE: ClassVar[str] = "run ddpm-run fid again"

    fid: float
    kid: dict[str, Any]                  # mean, std, subsets, subset_size
    inception_score: dict[str, Any]      # value (None when not computed) and the reason
    samples: dict[str, Any]              # path, count, image_shape, run (run.json summary or None)
    reference: dict[str, Any]            # spec, count, image_shape, stats_file, kid_features
    extractor: dict[str, Any]            # path, sha256 (the ONNX file), weights_sha256, preprocess, backend
    small_sample: bool
    warnings: list[str]
    seconds: float
    paired: dict[str, Any] | None = None  # same seeds on both sides: per-image differences, each side's speed
    gate: dict[str, Any] | None = None    # max_fid, max_kid, passed


ARTIFACTS: tuple[type[Artifact], ...] = (PlanSidecar, RunInfo, MergeInfo, ExportReport, PrecisionReport,
                                         ParityReport, BenchResults, FidStatsHeader, FidReport)
