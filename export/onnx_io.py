"""ONNX files without torch: load, save (atomically), metadata (DDPM card, precision), fold and clean, check.

Everything downstream of an ONNX file (fp16 calibration, engine builds, adopting a plan) uses these, so that a
serving machine with no torch can run ``ddpm-export --onnx model.onnx --engine``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

from ddpm_deploy.runtime.config import ModelCard
from ddpm_deploy.runtime.contract import INPUT_NAMES, ONNX_METADATA_KEY, OUTPUT_NAMES, PRECISION_METADATA_KEY, PRECISIONS
from ddpm_deploy.runtime.errors import ArtifactError
from ddpm_deploy.runtime.fileio import atomic_write_bytes

log = logging.getLogger(__name__)


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> onnx.ModelProto:
    """Set one ``metadata_props`` entry (replacing an old value), keeping the others."""
    props = {p.key: p.value for p in model.metadata_props}
    props[key] = value
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    return model


def set_card(model: onnx.ModelProto, card: ModelCard) -> onnx.ModelProto:
    set_metadata(model, ONNX_METADATA_KEY, card.to_json())
    model.producer_name = "ddpm-deploy"
    return model


def set_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """Record the model's precision (``runtime.contract.detect_precision`` reads it) in its metadata."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, found {precision!r}")
    return set_metadata(model, PRECISION_METADATA_KEY, precision)


def read_card(path_or_model) -> ModelCard | None:
    m = path_or_model
    if not isinstance(m, onnx.ModelProto):
        m = load_onnx(m, load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    return ModelCard.from_json(props[ONNX_METADATA_KEY], "ONNX metadata") if ONNX_METADATA_KEY in props else None


def load_onnx(path, load_external_data: bool = True) -> onnx.ModelProto:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p}: ONNX file not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        m = onnx.load(str(p), load_external_data=load_external_data)
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ArtifactError(f"{p}: not a readable ONNX model ({msg}); it may be truncated or corrupt") from None
    if not m.graph.node and not m.graph.input:  # protobuf parses many non-ONNX byte strings as an empty model
        raise ArtifactError(f"{p}: not an ONNX model (no graph: the file is empty, truncated or of another format)")
    return m


def check_ddpm_onnx(path) -> ModelCard:
    """An ONNX file ddpm-export can start from: readable, inputs x and t, output eps, and our DDPM config in its
    metadata. Returns the card. Checked before anything is written."""
    m = load_onnx(path, load_external_data=False)
    ins = [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
    outs = [o.name for o in m.graph.output]
    if tuple(ins) != INPUT_NAMES or tuple(outs) != OUTPUT_NAMES:
        raise ArtifactError(f"{path}: expected inputs {list(INPUT_NAMES)} and output {list(OUTPUT_NAMES)} (the "
                            f"ddpm-deploy ONNX contract), found inputs {ins} and outputs {outs}; export the model "
                            f"with ddpm-export")
    try:
        card = read_card(m)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    if card is None:
        raise ArtifactError(f"{path}: no DDPM config in the ONNX metadata ({ONNX_METADATA_KEY}); export the model "
                            f"with ddpm-export")
    return card


def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold and remove dead nodes with onnx-graphsurgeon (keeps metadata)."""
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        log.info("onnx-graphsurgeon not installed; skipping constant folding")
        return model
    props = list(model.metadata_props)
    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(props)
    out.producer_name = model.producer_name
    return out


def finalize(model: onnx.ModelProto, card: ModelCard) -> onnx.ModelProto:
    model = cleanup(model)
    model = set_precision(set_card(model, card), "fp32")
    try:
        onnx.checker.check_model(model, full_check=True)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:
        raise ArtifactError(f"exported ONNX failed onnx.checker / shape inference: {e}") from None
    return model


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    data = model.SerializeToString()
    atomic_write_bytes(path, data)  # a fault names the file (a full disk fails write(2), which names none)
    return Path(path)
