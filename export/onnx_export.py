"""PyTorch UNet → ONNX: export, embed the DDPM config, check, fold constants, clean, verify against PyTorch.

A chain of small steps (Polygraphy-style): ``export_torch`` → ``finalize`` (metadata, checker, shape
inference, graph-surgeon fold/cleanup; torch-free, in ``onnx_io``) → ``verify`` (ONNX Runtime vs PyTorch on
seeded inputs).
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
from ddpm_deploy.runtime.contract import INPUT_NAMES, OUTPUT_NAMES, ExportReport
from ddpm_deploy.runtime.errors import ArtifactError

# the torch-free ONNX steps, re-exported here for the export chain's callers
from .onnx_io import cleanup, finalize, load_onnx, read_card, save_onnx, set_card, set_metadata, set_precision  # noqa: F401

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
    report.save(out_dir / "export_report.json")  # atomic; a fault names the file
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
