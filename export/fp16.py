"""fp32 ONNX → calibrated mixed-precision fp16 ONNX, with the ε error per timestep bucket.

Precision is decided from data by NVIDIA ModelOpt's ONNX AutoCast
(``modelopt.onnx.autocast.convert_to_mixed_precision``): a reference run of the fp32 model in ONNX Runtime
on calibration samples (forward-process x_t from training images at timesteps spread over [0, T−1], both
ends included, plus pure noise at T−1) records every tensor's range; nodes whose inputs or outputs exceed
``data_max`` stay fp32. On top of that the sinusoidal timestep embedding (the subgraph between input ``t``
and the first MatMul/Gemm of the time MLP) and the normalisation statistics (InstanceNormalization, which
is how GroupNorm exports at opset 17, and the other normalisation ops) are kept fp32 by rule. Inputs and
outputs stay float32 and the DDPM metadata is kept, so the runtime and the engine builder read the fp16
model like the fp32 one.

Small steps (Polygraphy-style): ``calibration_images`` → ``calibration_batch`` → ``convert_to_fp16`` →
``fp16_error_report`` → ``export_fp16`` (writes ``model.fp16.onnx`` + ``precision.json``).

Note on the measurement: ONNX Runtime's CPU provider runs fp16 nodes that lack a CPU fp16 kernel (Conv,
Gemm, …) by casting to fp32 around them, so the CPU error measures fp16 storage of weights and of every
intermediate tensor, with fp32 accumulation, which is also what TensorRT's fp16 kernels accumulate in.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ddpm_deploy.runtime.config import ModelCard
from ddpm_deploy.runtime.contract import package_versions, INPUT_T, INPUT_X, PrecisionReport
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError, DataError, lazy_import
from ddpm_deploy.runtime.fileio import sha256_file
from ddpm_deploy.runtime.schedule import Schedule
from ddpm_deploy.runtime.tolerances import L2_EPS_FP16_REL_L2, compare

from .onnx_io import load_onnx, save_onnx, set_precision

log = logging.getLogger(__name__)

FP16_ONNX_NAME = "model.fp16.onnx"
PRECISION_JSON_NAME = "precision.json"
MODELOPT_INSTALL = ('pip install "nvidia-modelopt==0.47.0" onnxslim lief  '
                    '(not the [onnx] extra: it pins onnxruntime-gpu)')

# Calibration: timesteps spread over [0, T−1] (both ends), images per timestep, pure-noise samples at T−1.
# Every sample costs AutoCast's reference run all of the model's activations in memory (~140 MB per sample
# for the ddpm-cifar10 UNet), hence a modest default.
DEFAULT_CALIB_TIMESTEPS = 16
DEFAULT_CALIB_PER_T = 1
# AutoCast's own default: above 512 the fp16 spacing is ≥ 0.5. Nodes whose calibrated I/O exceeds it stay fp32.
DEFAULT_DATA_MAX = 512.0
FP16_MAX = float(np.finfo(np.float16).max)  # 65504; also AutoCast's default init_max
# Error report: timestep buckets covering [0, T−1], samples per bucket (evenly spaced t, bucket ends included).
DEFAULT_BUCKETS = 10
DEFAULT_PER_BUCKET = 4
DEFAULT_ERROR_SEED = 1234
# Normalisation ops whose statistics (mean, variance) stay fp32. GroupNorm exports as InstanceNormalization
# at opset 17 and as GroupNormalization from opset 18; ReduceMean is the statistic of a decomposed norm.
NORM_OP_TYPES = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization",
                 "ReduceMean")
# The time MLP starts at the first of these after the sinusoidal embedding.
TIME_MLP_OP_TYPES = ("MatMul", "Gemm")
_FLOAT, _HALF, _BF16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16
# the low precisions AutoCast can produce: ONNX element type, file name, initializer-summary key
LOW_PRECISIONS = {"fp16": (_HALF, "model.fp16.onnx", "float16"), "bf16": (_BF16, "model.bf16.onnx", "bfloat16")}
# bf16 has fp32's exponent range: its relative spacing (2^-8) is the same at every magnitude, so no activation
# range needs keeping in fp32 for it.
BF16_DATA_MAX = float(np.finfo(np.float32).max)


# --- calibration data -------------------------------------------------------------------------------------

def calibration_source(fp32_path: Path, card: ModelCard | None, images: np.ndarray | None, dataset: str | None):
    """(card, images, source) for calibrating ``fp32_path``: the card from its metadata unless given, the images
    from ``calibration_images`` unless given, and what the report calls their source."""
    from .onnx_io import read_card

    card = card or read_card(fp32_path)
    if card is None:
        raise ArtifactError(f"{fp32_path}: no DDPM config in the ONNX metadata; export the model with ddpm-export")
    if images is not None:
        return card, images, "images passed by the caller"
    return card, calibration_images(card, dataset), dataset or card.training.get("dataset")


def calibration_images(card: ModelCard, dataset: str | None = None) -> np.ndarray:
    """Training images for calibration, float32 [N,C,H,W] in [-1, 1], shaped for the model.

    ``dataset`` (a ``load_dataset`` spec) wins; otherwise the spec the model card records from training.
    The built-in ``digits`` needs no files; any other spec must be readable here.
    """
    from ddpm_deploy.trainer.data import load_dataset

    C, S = card.data.channels, card.data.image_size
    spec = dataset or card.training.get("dataset")
    if not spec:
        raise ConfigError(
            "fp16 calibration needs training images, and the model card names no training dataset; pass one "
            "(a dataset spec: digits, folder:PATH, cifar10:PATH, npz:PATH)"
        )
    try:
        return load_dataset(spec, image_size=S, channels=C).images
    except DataError as e:
        if dataset:
            raise
        raise ConfigError(
            f"fp16 calibration needs training images; the model card names the training dataset {spec!r}, which "
            f"cannot be read here ({str(e).rstrip('.')}). Pass the dataset explicitly "
            f"(digits, folder:PATH, cifar10:PATH, npz:PATH)"
        ) from None


def calibration_timesteps(num_timesteps: int, n_timesteps: int = DEFAULT_CALIB_TIMESTEPS) -> np.ndarray:
    """``n_timesteps`` evenly spread over [0, T−1], both ends included (unique, ascending)."""
    T = int(num_timesteps)
    if n_timesteps < 2:
        raise ConfigError(f"calibration needs at least 2 timesteps (0 and T−1), found n_timesteps={n_timesteps}")
    return np.unique(np.round(np.linspace(0, T - 1, min(int(n_timesteps), T))).astype(np.int64))


def calibration_batch(
    card: ModelCard, images: np.ndarray, n_timesteps: int = DEFAULT_CALIB_TIMESTEPS,
    per_t: int = DEFAULT_CALIB_PER_T, pure_noise: int | None = None, seed: int = 0,
) -> dict[str, np.ndarray]:
    """Calibration feeds ``{"x": float32 [N,C,H,W], "t": int32 [N]}``.

    ``per_t`` forward-process samples x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (eq. 4) per calibration timestep, then
    ``pure_noise`` (default ``per_t``) samples of pure noise N(0, I) at t = T−1 (what sampling starts from).
    """
    images = np.asarray(images)
    C, S = card.data.channels, card.data.image_size
    if images.ndim != 4 or images.shape[1:] != (C, S, S) or len(images) == 0:
        raise DataError(f"calibration images must be float [N,{C},{S},{S}] for this model, found {images.shape}")
    if per_t < 1:
        raise ConfigError(f"per_t must be >= 1, found {per_t}")
    n_noise = per_t if pure_noise is None else int(pure_noise)
    if n_noise < 0:
        raise ConfigError(f"pure_noise must be >= 0, found {pure_noise}")
    sched = Schedule(card.diffusion)
    T = card.diffusion.num_timesteps
    ts = np.repeat(calibration_timesteps(T, n_timesteps), per_t)
    g = np.random.default_rng(seed)
    idx = g.choice(len(images), size=len(ts), replace=len(ts) > len(images))
    x0 = images[idx].astype(np.float32)
    noise = g.standard_normal(x0.shape).astype(np.float32)
    x = sched.q_sample(x0, ts, noise).astype(np.float32)
    pure = g.standard_normal((n_noise, C, S, S)).astype(np.float32)
    return {INPUT_X: np.ascontiguousarray(np.concatenate([x, pure])),
            INPUT_T: np.concatenate([ts, np.full(n_noise, T - 1)]).astype(np.int32)}


# --- graph queries ----------------------------------------------------------------------------------------

def timestep_embedding_nodes(model: onnx.ModelProto, t_input: str = "t", x_input: str = "x") -> list[str]:
    """Names of the nodes between input ``t`` and the first MatMul/Gemm of the time MLP.

    Walks forward from ``t``; stops at MatMul/Gemm and at nodes that also depend on ``x`` (the trunk).
    """
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    x_dep = {x_input}
    for n in graph.node:  # exported graphs are topologically sorted
        if any(i in x_dep for i in n.input):
            x_dep.update(n.output)
    found: list[str] = []
    seen: set[str] = set()
    queue = [t_input]
    while queue:
        tensor = queue.pop(0)
        for n in consumers[tensor]:
            if n.name in seen or n.op_type in TIME_MLP_OP_TYPES or any(o in x_dep for o in n.output):
                continue
            seen.add(n.name)
            found.append(n.name)
            queue.extend(n.output)
    if not any(n.op_type in ("Sin", "Cos") for n in graph.node if n.name in seen):
        log.warning("no Sin/Cos found between input %r and the time MLP: is this a DDPM UNet?", t_input)
    return found


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def node_precisions(model: onnx.ModelProto, names: set[str] | None = None) -> dict[str, str]:
    """'fp32', 'fp16', 'bf16' or 'non-float' per node, from the element types of its float outputs."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = _tensor_types(inferred)
    out = {}
    for n in inferred.graph.node:
        if names is not None and n.name not in names:
            continue
        ft = {types.get(o) for o in n.output} & {_FLOAT, _HALF, _BF16}
        out[n.name] = "fp32" if _FLOAT in ft else "fp16" if _HALF in ft else "bf16" if _BF16 in ft else "non-float"
    return out


def _initializer_summary(model: onnx.ModelProto, precision: str = "fp16") -> dict[str, Any]:
    g = model.graph
    low, _, key_low = LOW_PRECISIONS[precision]
    conv_w = {n.input[1] for n in g.node if n.op_type == "Conv" and len(n.input) > 1}
    inits = {i.name: i for i in g.initializer}
    # A weight stored fp32 and cast at run time (AutoCast's init_conversion_max_bytes) counts as fp32 here.
    summary = {key_low: 0, "float32": 0, f"{key_low}_bytes": 0, "float32_bytes": 0,
               "conv_weights": {key_low: 0, "float32": 0}}
    for i in g.initializer:
        if i.data_type in (_FLOAT, low):
            key = key_low if i.data_type == low else "float32"
            summary[key] += 1
            summary[key + "_bytes"] += int(np.prod(i.dims, dtype=np.int64)) * (2 if key == key_low else 4)
    for w in conv_w:
        if w in inits and inits[w].data_type in (_FLOAT, low):
            summary["conv_weights"][key_low if inits[w].data_type == low else "float32"] += 1
    return summary


# --- conversion -------------------------------------------------------------------------------------------

class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)
        log.debug("modelopt: %s", record.getMessage())


@contextmanager
def _capture_modelopt_logs():
    """Route ModelOpt's ONNX loggers (which print to stdout) into a list and our debug log, then restore them."""
    cap = _Capture()
    saved = []
    for name in ("modelopt.onnx", "modelopt.onnx.autocast"):
        lg = logging.getLogger(name)
        saved.append((lg, list(lg.handlers), lg.propagate, lg.level))
        for h in list(lg.handlers):
            lg.removeHandler(h)
    parent, auto = logging.getLogger("modelopt.onnx"), logging.getLogger("modelopt.onnx.autocast")
    parent.addHandler(cap)
    parent.propagate = False
    auto.propagate = True
    auto.setLevel(logging.INFO)  # the "Skipping node …" lines carry the reasons
    try:
        yield cap.records
    finally:
        parent.removeHandler(cap)
        for lg, handlers, propagate, level in saved:
            for h in handlers:
                lg.addHandler(h)
            lg.propagate, lg.level = propagate, level


def _skip_reasons(records, node_names: set[str]) -> dict[str, str]:
    """{node: AutoCast's message} from its "Skipping node NAME: MESSAGE" log lines."""
    out = {}
    for r in records:
        msg = r.getMessage()
        if not msg.startswith("Skipping node "):
            continue
        rest = msg[len("Skipping node "):]
        for m in re.finditer(": ", rest):  # node names may contain ": "; take the split that names a node
            if rest[:m.start()] in node_names:
                out.setdefault(rest[:m.start()], rest[m.end():])
                break
    return out


def _reason(name: str, op_type: str, msg: str | None, embedding: set[str], norm_ops: set[str],
            unsupported: set[str], data_max: float) -> tuple[str, str]:
    if msg is None:
        if op_type in unsupported:
            return "unsupported-in-fp16", (f"AutoCast keeps {op_type} in fp32 (the ONNX spec or the converter needs "
                                           f"fp32 inputs, e.g. Resize scales)")
        return "autocast-converter", "kept fp32 by AutoCast's converter (no classification rule logged)"
    if msg == "DisabledNodeNameRegexRule":
        if name in embedding:
            return "timestep-embedding", "sinusoidal timestep embedding (t up to T−1): kept fp32 by rule"
        return "excluded-by-name", "in nodes_to_exclude"
    if msg == "DisabledOpTypes":
        if op_type in norm_ops and op_type in NORM_OP_TYPES:
            return "normalisation", f"normalisation statistics ({op_type}): kept fp32 by rule"
        return "excluded-op-type", f"op type {op_type} in op_types_to_exclude"
    if msg.startswith("initializer"):
        return "initializer-range", msg
    if msg.startswith("reference IO out of range"):
        m = re.search(r"absmax=([-+0-9.eEinfa]+)", msg)
        absmax = float(m.group(1)) if m else float("nan")
        if absmax > FP16_MAX:
            return "overflow", f"calibrated max |activation| {absmax:.6g} > fp16 max {FP16_MAX:g}"
        return "activation-range", (f"calibrated max |activation| {absmax:.6g} > data_max {data_max:g} "
                                    f"(fp16 spacing ≥ 0.5 above 512)")
    if "depth of reduction" in msg:
        return "accuracy", msg
    return "autocast-rule", msg


def convert_to_fp16(
    fp32_path: str | os.PathLike, out_path: str | os.PathLike, calib_feeds: dict[str, np.ndarray],
    data_max: float = DEFAULT_DATA_MAX, init_max: float = FP16_MAX, keep_embedding_fp32: bool = True,
    norm_op_types: tuple[str, ...] = NORM_OP_TYPES, nodes_to_exclude: tuple[str, ...] = (),
    max_depth_of_reduction: int | None = None, precision: str = "fp16",
) -> dict[str, Any]:
    """Mixed-precision fp16 (or bf16) copy of ``fp32_path`` at ``out_path`` (atomic); returns the conversion report.

    AutoCast's reference run on ``calib_feeds`` decides which nodes overflow (``data_max``, ``init_max``);
    the timestep embedding (``keep_embedding_fp32``), the ops in ``norm_op_types`` and the node-name regexes
    in ``nodes_to_exclude`` stay fp32 by rule. Inputs/outputs stay float32; metadata_props are kept.
    """
    autocast = lazy_import("modelopt.onnx.autocast", f"{precision} calibration (ModelOpt AutoCast)", MODELOPT_INSTALL)
    if precision not in LOW_PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(LOW_PRECISIONS)}, found {precision!r}")
    fp32_path = Path(fp32_path)
    src = load_onnx(fp32_path)
    if set(calib_feeds) != {i.name for i in src.graph.input}:
        raise ConfigError(f"calibration feeds are {sorted(calib_feeds)}, the model's inputs are "
                          f"{sorted(i.name for i in src.graph.input)}")
    embedding = timestep_embedding_nodes(src) if keep_embedding_fp32 else []
    exclude = [re.escape(n) + "$" for n in embedding] + list(nodes_to_exclude)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ddpm-fp16-") as tmp, _capture_modelopt_logs() as records:
        calib = Path(tmp) / "calibration.npz"
        np.savez(calib, **{k: np.ascontiguousarray(v) for k, v in calib_feeds.items()})
        try:
            model = autocast.convert_to_mixed_precision(
                onnx_path=str(fp32_path), low_precision_type=precision, nodes_to_exclude=exclude,
                op_types_to_exclude=list(norm_op_types), data_max=data_max, init_max=init_max, keep_io_types=True,
                calibration_data=str(calib), max_depth_of_reduction=max_depth_of_reduction, providers=["cpu"],
            )
        except Exception as e:  # AutoCast raises bare Exception/AssertionError/ValueError
            raise ArtifactError(f"{fp32_path}: ModelOpt AutoCast could not convert this model to {precision} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})") from e
    seconds = time.perf_counter() - t0
    # AutoCast drops metadata_props: put ours back (the DDPM card above all).
    del model.metadata_props[:]
    model.metadata_props.extend(src.metadata_props)
    model.producer_name = src.producer_name or model.producer_name
    _check_io(model, src, fp32_path)
    set_precision(model, precision)
    save_onnx(model, out_path)

    names = {n.name for n in src.graph.node}
    prec = node_precisions(model, names)
    msgs = _skip_reasons(records, names)
    unsupported = set(getattr(getattr(autocast, "precisionconverter", None), "OP_TYPES_NOT_SUPPORTED_IN_LOW_PRECISION",
                              None) or ())
    fp32_nodes = []
    for n in src.graph.node:
        if prec.get(n.name) == "fp32" or (n.name in msgs and prec.get(n.name) != precision):
            reason, detail = _reason(n.name, n.op_type, msgs.get(n.name), set(embedding), set(norm_op_types),
                                     unsupported, data_max)
            fp32_nodes.append({"name": n.name, "op_type": n.op_type, "reason": reason, "detail": detail,
                               "output_precision": prec.get(n.name, "removed")})
    counted = [prec.get(n, "removed") for n in names]
    autocast_line = next((r.getMessage() for r in records if r.getMessage().startswith("Converted ")), None)
    m = re.match(r"Converted (\d+)/(\d+) nodes", autocast_line or "")
    report = {
        "tool": "nvidia-modelopt AutoCast (modelopt.onnx.autocast.convert_to_mixed_precision)",
        "versions": _versions(),
        "source": fp32_path.name,
        "output": Path(out_path).name,
        "seconds": seconds,
        "settings": {"low_precision_type": precision, "keep_io_types": True, "data_max": data_max, "init_max": init_max,
                     "keep_embedding_fp32": keep_embedding_fp32, "op_types_to_exclude": list(norm_op_types),
                     "nodes_to_exclude": list(nodes_to_exclude), "max_depth_of_reduction": max_depth_of_reduction},
        "calibration_samples": int(len(next(iter(calib_feeds.values())))),
        "nodes": {
            "total": len(names), precision: counted.count(precision), "fp32": counted.count("fp32"),
            "non_float": counted.count("non-float"), "removed": counted.count("removed"),
            "autocast_converted": int(m.group(1)) if m else None, "autocast_total": int(m.group(2)) if m else None,
        },
        "timestep_embedding_nodes": embedding,
        "fp32_nodes": fp32_nodes,
        "fp32_reasons": _count(f["reason"] for f in fp32_nodes),
        "initializers": _initializer_summary(model, precision),
        "autocast_warnings": sorted({r.getMessage() for r in records if r.levelno >= logging.WARNING}),
    }
    log.info("%s: %d/%d nodes %s, %d fp32 (%s) in %.1fs", precision, report["nodes"][precision], len(names), precision,
             len(fp32_nodes), report["fp32_reasons"], seconds)
    return report


def _check_io(model: onnx.ModelProto, src: onnx.ModelProto, path: Path) -> None:
    def io(m):
        return [(v.name, v.type.tensor_type.elem_type) for v in [*m.graph.input, *m.graph.output]]

    if io(model) != io(src):
        raise ArtifactError(f"{path}: AutoCast changed the model's inputs/outputs from {io(src)} to {io(model)}; "
                            f"they must stay as exported")


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def _versions() -> dict[str, str]:
    return {k: v for k, v in package_versions().items() if k in ("nvidia-modelopt", "onnx", "onnxruntime")}


# --- error report -----------------------------------------------------------------------------------------

def timestep_buckets(num_timesteps: int, buckets: int = DEFAULT_BUCKETS) -> list[tuple[int, int]]:
    """``buckets`` contiguous inclusive ranges [lo, hi] covering [0, T−1]."""
    T = int(num_timesteps)
    if not 1 <= buckets <= T:
        raise ConfigError(f"buckets must be between 1 and T={T}, found {buckets}")
    edges = np.round(np.linspace(0, T, buckets + 1)).astype(int)
    return [(int(lo), int(hi) - 1) for lo, hi in zip(edges[:-1], edges[1:])]


def bf16_emulation(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a bf16 mixed-precision model that ONNX Runtime's CPU provider can run (it has no bf16 kernels
    for Conv, MatMul, …): every node that reads or writes bfloat16 (but Cast and Constant) computes in float32
    between Casts, so each bf16 tensor of the model is still rounded to bf16 where the model stores it. That is
    bf16 storage with fp32 arithmetic, the same thing the fp16 CPU measurement is (see the module note)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = _tensor_types(inferred)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, k = [], 0
    for n in model.graph.node:
        if n.op_type in ("Cast", "Constant") or not any(types.get(v) == _BF16 for v in [*n.input, *n.output] if v):
            nodes.append(n)
            continue
        new, after = onnx.NodeProto(), []
        new.CopyFrom(n)
        for j, name in enumerate(new.input):
            if name and types.get(name) == _BF16:
                k += 1
                nodes.append(onnx.helper.make_node("Cast", [name], [f"{name}__f32_{k}"], to=_FLOAT))
                new.input[j] = f"{name}__f32_{k}"
        for j, name in enumerate(new.output):
            if types.get(name) == _BF16:
                new.output[j] = f"{name}__f32"
                after.append(onnx.helper.make_node("Cast", [f"{name}__f32"], [name], to=_BF16))
        nodes += [new, *after]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.value_info[:]  # stale types of the renamed tensors; ONNX Runtime infers them
    return out


def eps_error_report(
    fp32_path: str | os.PathLike, card: ModelCard, images: np.ndarray, eps_fn, label: str,
    buckets: int = DEFAULT_BUCKETS, per_bucket: int = DEFAULT_PER_BUCKET, seed: int = DEFAULT_ERROR_SEED,
    tol: float = L2_EPS_FP16_REL_L2, backend: str = "onnxruntime-cpu",
) -> dict[str, Any]:
    """ε of a lower-precision model (``eps_fn(x, t)``) vs the fp32 ONNX in ONNX Runtime CPU, per timestep bucket.

    Each bucket gets ``per_bucket`` forward-process samples at evenly spaced t (bucket ends included, so
    t = 0 and t = T−1 are measured); metric: relative L2 of ε over the bucket, plus max |Δε| and its place.
    """
    from ddpm_deploy.runtime.backends.ort import OrtRunner

    if per_bucket < 1:
        raise ConfigError(f"per_bucket must be >= 1, found {per_bucket}")
    images = np.asarray(images)
    C, S = card.data.channels, card.data.image_size
    if images.ndim != 4 or images.shape[1:] != (C, S, S) or len(images) == 0:
        raise DataError(f"images must be float [N,{C},{S},{S}] for this model, found {images.shape}")
    sched = Schedule(card.diffusion)
    ranges = timestep_buckets(card.diffusion.num_timesteps, buckets)
    g = np.random.default_rng(seed)
    ts = np.concatenate([np.round(np.linspace(lo, hi, per_bucket)).astype(np.int64) for lo, hi in ranges])
    x0 = images[g.choice(len(images), size=len(ts), replace=len(ts) > len(images))].astype(np.float32)
    x = sched.q_sample(x0, ts, g.standard_normal(x0.shape).astype(np.float32)).astype(np.float32)
    t = ts.astype(np.int32)
    want = OrtRunner(fp32_path).eps(x, t)
    got = eps_fn(x, t)
    rows = []
    for k, (lo, hi) in enumerate(ranges):
        sl = slice(k * per_bucket, (k + 1) * per_bucket)
        c = compare(f"eps {label} vs fp32, t in [{lo}, {hi}]", got[sl], want[sl], tol, metric="rel_l2")
        rows.append({"t_min": lo, "t_max": hi, "timesteps": [int(v) for v in ts[sl]], "rel_l2": c.rel_l2,
                     "max_abs": c.max_abs, "index": list(c.index), label: c.got, "fp32": c.want,
                     "passed": c.passed})
    overall = compare(f"eps {label} vs fp32", got, want, tol, metric="rel_l2")
    failing = [f"[{r['t_min']}, {r['t_max']}]" for r in rows if not r["passed"]]
    return {
        "backend": backend, "metric": f"relative L2 of eps ({label} vs fp32) over each bucket",
        "tolerance": tol, "tolerance_name": "L2_EPS_FP16_REL_L2", "samples": int(len(t)), "seed": seed,
        "buckets": rows, "overall_rel_l2": overall.rel_l2, "overall_max_abs": overall.max_abs,
        "worst_rel_l2": max(r["rel_l2"] for r in rows), "passed": not failing, "failing_buckets": failing,
    }


def fp16_error_report(
    fp32_path: str | os.PathLike, fp16_path: str | os.PathLike, card: ModelCard, images: np.ndarray,
    buckets: int = DEFAULT_BUCKETS, per_bucket: int = DEFAULT_PER_BUCKET, seed: int = DEFAULT_ERROR_SEED,
    tol: float = L2_EPS_FP16_REL_L2, precision: str = "fp16",
) -> dict[str, Any]:
    """``eps_error_report`` of the fp16 (or bf16) ONNX in ONNX Runtime CPU. A bf16 model runs as
    ``bf16_emulation`` (ONNX Runtime CPU has no bf16 compute kernels)."""
    from ddpm_deploy.runtime.backends.ort import OrtRunner

    if precision == "bf16":
        def eps(x, t):
            with tempfile.TemporaryDirectory(prefix="ddpm-bf16-") as tmp:
                emulated = save_onnx(bf16_emulation(load_onnx(fp16_path)), Path(tmp) / "emulated.onnx")
                return OrtRunner(emulated).eps(x, t)

        backend = "onnxruntime-cpu, bf16 emulated (bf16 storage, fp32 arithmetic)"
    else:
        eps, backend = OrtRunner(fp16_path).eps, "onnxruntime-cpu"
    return eps_error_report(fp32_path, card, images, eps, precision, buckets, per_bucket, seed, tol, backend)


# --- the whole step ---------------------------------------------------------------------------------------

def precision_json_name(precision: str) -> str:
    return PRECISION_JSON_NAME if precision == "fp16" else f"precision.{precision}.json"


def export_fp16(
    fp32_path: str | os.PathLike, out_dir: str | os.PathLike, card: ModelCard | None = None,
    images: np.ndarray | None = None, dataset: str | None = None, tol: float = L2_EPS_FP16_REL_L2,
    n_timesteps: int = DEFAULT_CALIB_TIMESTEPS, per_t: int = DEFAULT_CALIB_PER_T, calib_seed: int = 0,
    data_max: float | None = None, buckets: int = DEFAULT_BUCKETS, per_bucket: int = DEFAULT_PER_BUCKET,
    precision: str = "fp16", **convert_kw,
) -> tuple[Path, PrecisionReport]:
    """fp32 ONNX → ``out_dir/model.fp16.onnx`` + ``out_dir/precision.json``; returns (path, report). With
    ``precision="bf16"``: ``model.bf16.onnx`` + ``precision.bf16.json``, the same error report and tolerance.

    ``card`` defaults to the one in the ONNX metadata; ``images`` to ``calibration_images(card, dataset)``.
    Raises ArtifactError naming the failing timestep buckets when the ε error exceeds ``tol``; precision.json
    is written either way, and the rejected model is kept as ``model.fp16.rejected.onnx`` for inspection.
    """
    fp32_path, out_dir = Path(fp32_path), Path(out_dir)
    card, images, source = calibration_source(fp32_path, card, images, dataset)
    if precision not in LOW_PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(LOW_PRECISIONS)}, found {precision!r}")
    if data_max is None:
        data_max = DEFAULT_DATA_MAX if precision == "fp16" else BF16_DATA_MAX
    if precision == "bf16":
        convert_kw.setdefault("init_max", BF16_DATA_MAX)
    name, json_name = LOW_PRECISIONS[precision][1], precision_json_name(precision)
    rejected = out_dir / f"model.{precision}.rejected.onnx"
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    candidate = out_dir / f".{name}.candidate"
    feeds = calibration_batch(card, images, n_timesteps=n_timesteps, per_t=per_t, seed=calib_seed)
    try:
        conv = convert_to_fp16(fp32_path, candidate, feeds, data_max=data_max, precision=precision, **convert_kw)
        err = fp16_error_report(fp32_path, candidate, card, images, buckets=buckets, per_bucket=per_bucket, tol=tol,
                                precision=precision)
        report = PrecisionReport(
            precision=f"{precision}-mixed", onnx_fp32=fp32_path.name, onnx_mixed=name if err["passed"] else None,
            passed=err["passed"], tolerance={"name": "L2_EPS_FP16_REL_L2", "metric": "rel_l2", "value": tol},
            calibration={"samples": int(len(feeds["t"])), "timesteps": sorted({int(v) for v in feeds["t"]}),
                         "per_t": per_t, "pure_noise_at": card.diffusion.num_timesteps - 1, "seed": calib_seed,
                         "dataset": source},
            conversion=conv, error=err, model_sha256=sha256_file(fp32_path),
        )
        if err["passed"]:
            os.replace(candidate, final)
        else:
            os.replace(candidate, rejected)
            final.unlink(missing_ok=True)  # a stale model would not match this precision report
        report.save(out_dir / json_name)
    finally:
        candidate.unlink(missing_ok=True)
    if not err["passed"]:
        worst = ", ".join(f"t∈[{r['t_min']}, {r['t_max']}] rel L2 {r['rel_l2']:.3g}" for r in err["buckets"]
                          if not r["passed"])
        raise ArtifactError(
            f"{precision} ε error exceeds the tolerance {tol:g} (relative L2 vs fp32, ONNX Runtime CPU) in timestep "
            f"buckets {', '.join(err['failing_buckets'])} ({worst}); the rejected model is {rejected}, details in "
            f"{out_dir / json_name}. Keep more nodes fp32 (a lower data_max), use fp16, or use the fp32 model"
        )
    log.info("%s: wrote %s; worst bucket rel L2 %.3g (tolerance %g)", precision, final, err["worst_rel_l2"], tol)
    return final, report
