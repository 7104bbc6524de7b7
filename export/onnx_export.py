"""PyTorch UNet → ONNX: export, embed the DDPM config, check, fold constants, clean, verify against PyTorch.

A chain of small steps (Polygraphy-style): ``export_torch`` → ``finalize`` (metadata, checker, shape
inference, graph-surgeon fold/cleanup) → ``verify`` (ONNX Runtime vs PyTorch on seeded inputs).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ddpm_deploy.runtime.config import ModelCard
from ddpm_deploy.runtime.contract import (INPUT_NAMES, ONNX_METADATA_KEY, OUTPUT_NAMES, PRECISION_METADATA_KEY,
                                          PRECISIONS, ExportReport)
from ddpm_deploy.runtime.errors import ArtifactError
from ddpm_deploy.runtime.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

OPSET = 17
# fp32 ONNX Runtime vs PyTorch: max |Δε| allowed right after export. Measured ≤ 3e-6 on both presets
# (README, "Parity"); 1e-4 leaves room for other CPUs' kernels while catching any real mismatch.
FP32_EXPORT_ATOL = 1e-4


class EpsWrapper(torch.nn.Module):
    """The exported signature: (x float32 [B,C,H,W], t int32 [B]) → eps float32 [B,C,H,W]."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t).float()


def export_torch(model: torch.nn.Module, channels: int, size: int, opset: int = OPSET) -> onnx.ModelProto:
    """Trace the model to ONNX with a dynamic batch axis."""
    model = EpsWrapper(model).eval()
    x = torch.randn(2, channels, size, size)
    t = torch.tensor([0, 1], dtype=torch.int32)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x, t), buf, dynamo=False, opset_version=opset, input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES), dynamic_axes={n: {0: "batch"} for n in (*INPUT_NAMES, *OUTPUT_NAMES)},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


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
        raise ArtifactError(f"{p}: ONNX file not found")
    try:
        return onnx.load(str(p), load_external_data=load_external_data)
    except Exception as e:
        raise ArtifactError(f"{p}: not a readable ONNX model ({str(e).splitlines()[0][:200]})") from None


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
    atomic_write_bytes(path, data)
    return Path(path)


@dataclass
class VerifyReport:
    atol: float
    max_abs: float = 0.0
    cases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.atol

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "atol": self.atol, "max_abs": self.max_abs, "cases": self.cases}


def verify(
    onnx_path: str | os.PathLike, torch_model: torch.nn.Module, card: ModelCard, atol: float = FP32_EXPORT_ATOL,
    batches: tuple[int, ...] = (1, 3), seed: int = 0,
) -> VerifyReport:
    """ONNX Runtime (CPU) vs PyTorch on seeded inputs at t ∈ {0, 1, T/2, T−1} and the given batch sizes."""
    from ddpm_deploy.runtime.backends.ort import OrtRunner

    T = card.diffusion.num_timesteps
    C, S = card.data.channels, card.data.image_size
    rep = VerifyReport(atol=atol)
    g = np.random.default_rng(seed)
    runner = OrtRunner(onnx_path)
    torch_model = torch_model.eval()
    for b in batches:
        for tv in (0, 1, T // 2, T - 1):
            x = g.standard_normal((b, C, S, S)).astype(np.float32)
            t = np.full((b,), tv, dtype=np.int32)
            got = runner.eps(x, t)
            with torch.no_grad():
                ref = torch_model(torch.from_numpy(x), torch.from_numpy(t)).float().numpy()
            d = np.abs(got - ref)
            k = int(d.argmax())
            case = {"batch": b, "t": tv, "max_abs": float(d.max()), "index": [int(v) for v in np.unravel_index(k, d.shape)],
                    "onnx": float(got.flat[k]), "torch": float(ref.flat[k])}
            rep.cases.append(case)
            rep.max_abs = max(rep.max_abs, case["max_abs"])
    return rep


def export_verified(model: torch.nn.Module, card: ModelCard, out_dir: str | os.PathLike, reference: str,
                    report: dict[str, Any], echo=lambda s: None) -> tuple[Path, ExportReport]:
    """Export → finalize → save ``out_dir/model.onnx`` → verify against ``model``; writes export_report.json
    (``report`` plus timings and the comparison) and raises ArtifactError with the worst case if it fails."""
    import time

    from ddpm_deploy.runtime.fileio import sha256_file

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    proto = finalize(export_torch(model, card.data.channels, card.data.image_size), card)
    onnx_path = save_onnx(proto, out_dir / "model.onnx")
    export_s = time.perf_counter() - t0
    echo(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB, {len(proto.graph.node)} nodes) in {export_s:.1f}s")
    rep = verify(onnx_path, model, card)
    report = ExportReport(onnx=onnx_path.name, source=report, export_seconds=export_s, verify_fp32=rep.to_dict(),
                          model_sha256=sha256_file(onnx_path))
    report.save(out_dir / "export_report.json")
    if not rep.passed:
        worst = max(rep.cases, key=lambda c: c["max_abs"])
        raise ArtifactError(
            f"ONNX Runtime and {reference} disagree: max |Δε| = {rep.max_abs:.3g} > tolerance {rep.atol:g} "
            f"(worst at batch {worst['batch']}, t={worst['t']}, index {worst['index']}: onnx {worst['onnx']:.6g} vs "
            f"torch {worst['torch']:.6g}); report: {out_dir / 'export_report.json'}"
        )
    echo(f"verified against {reference}: max |Δε| = {rep.max_abs:.2e} (tolerance {rep.atol:g}) at t ∈ "
         f"{sorted({c['t'] for c in rep.cases})}, batch {sorted({c['batch'] for c in rep.cases})}")
    return onnx_path, report
