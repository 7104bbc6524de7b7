"""fp32 ONNX → int8 OpenVINO IR by NNCF post-training quantization, calibrated over timesteps, with the ε error per
timestep bucket (``ddpm-export --onnx model.onnx --int8``).

Calibration data is the forward-process set the fp16 export builds (x_t of training images at timesteps spread over
[0, T−1] with both ends, plus pure noise at T−1). Kept in float (NNCF ``IgnoredScope``): the timestep embedding MLP
and every time projection into the residual blocks (t up to 999 enters there), the normalisation statistics (MVN),
the attention scores and softmax, the first and last convolution — the layers whose error reaches every pixel
or every timestep — and the element-wise Add and Multiply ops. NNCF's CPU configuration would quantize the inputs
of those too (the SiLU's x·σ(x), the GroupNorm affine, the residual sums, the inputs of every GroupNorm): measured
on the trained demo model, that alone put the ε error at 10–16 % for t ≥ 600 (0.6–0.7 % without it; 9.7 % → 2.5 %
over all t), while no single convolution kept in float moved it by more than 0.5 %. Only the convolutions and the
attention projections run in int8. SmoothQuant on the convolutions (α = 0.7: per input channel, activation range
moved into the weights before quantizing) lowers the ε error by a further ~25 % (2.0 % → 1.5 % over all t; 5.3 % →
4.1 % at t < 100) at no measured cost in speed (the scales fold into the weights); α 0.3/0.5/0.8/0.9 measured
worse. NNCF applies SmoothQuant only with ``model_type=TRANSFORMER``, which changes nothing else in our graph (the
same ε error with SmoothQuant off). Calibration: 303 samples (100 timesteps × 3 + pure noise; NNCF's default
subset is 300), which lowered the error slightly against 33. The result is ``model.int8.xml/.bin`` with our metadata in its rt_info and
``precision.int8.json`` (the same report and tolerance as fp16). No torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ddpm_deploy.runtime.backends.base import INT8_MODEL, INT8_REPORT
from ddpm_deploy.runtime.config import ModelCard
from ddpm_deploy.runtime.contract import package_versions, INPUT_T, INPUT_X, ONNX_METADATA_KEY, PRECISION_METADATA_KEY, PrecisionReport
from ddpm_deploy.runtime.errors import ArtifactError, lazy_import
from ddpm_deploy.runtime.fileio import sha256_file
from ddpm_deploy.runtime.tolerances import L2_EPS_FP16_REL_L2

from .fp16 import (DEFAULT_BUCKETS, DEFAULT_PER_BUCKET, calibration_batch, calibration_source,
                   eps_error_report)

log = logging.getLogger(__name__)

INT8_XML_NAME, INT8_JSON_NAME = INT8_MODEL, INT8_REPORT  # the names the runtime looks for beside the ONNX
INSTALL = "pip install 'ddpm-deploy[openvino,int8]'"
DEFAULT_INT8_CALIB_TIMESTEPS = 100
DEFAULT_INT8_CALIB_PER_T = 3
SMOOTH_QUANT_CONV_ALPHA = 0.7  # measured on the demo model, see the module docstring
# what stays float, as NNCF IgnoredScope entries (OpenVINO op types and friendly-name patterns of our export)
KEEP_FLOAT_TYPES = ("MVN", "Softmax")
# element-wise ops whose inputs NNCF would otherwise quantize (see the module docstring for what that cost)
KEEP_FLOAT_ELEMENTWISE = ("Add", "Multiply")
KEEP_FLOAT_PATTERNS = (r".*/temb/.*", r".*temb_proj.*", r".*/conv_in/.*", r".*/conv_out/.*", r".*attn.*/MatMul.*")


def quantize_int8(fp32_path: str | os.PathLike, out_xml: str | os.PathLike, calib_feeds: dict[str, np.ndarray],
                  keep_float: bool = True, preset: str = "mixed",
                  smooth_quant: float | None = SMOOTH_QUANT_CONV_ALPHA) -> dict[str, Any]:
    """NNCF PTQ of the ONNX at ``fp32_path`` into the OpenVINO IR ``out_xml`` (+ .bin); returns a report."""
    ov = lazy_import("openvino", "int8 quantization (OpenVINO)", INSTALL)
    nncf = lazy_import("nncf", "int8 quantization (NNCF)", INSTALL)
    fp32_path = Path(fp32_path)
    model = ov.Core().read_model(str(fp32_path))
    names = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    items = [{INPUT_X: calib_feeds[INPUT_X][i:i + 1], INPUT_T: calib_feeds[INPUT_T][i:i + 1]}
             for i in range(len(calib_feeds[INPUT_T]))]
    ignored = nncf.IgnoredScope(types=list(KEEP_FLOAT_TYPES + KEEP_FLOAT_ELEMENTWISE), patterns=list(KEEP_FLOAT_PATTERNS),
                                validate=False) if keep_float else None
    presets = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    extra: dict[str, Any] = {}
    if smooth_quant is not None:  # NNCF runs SmoothQuant only for model_type TRANSFORMER (matmul -1: off; our attention
        # MatMuls are kept float)
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

        extra = {"model_type": nncf.ModelType.TRANSFORMER, "advanced_parameters": AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=float(smooth_quant), matmul=-1))}
    t0 = time.perf_counter()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), _quiet_nncf():  # NNCF prints tables and progress bars
            quantized = nncf.quantize(model, nncf.Dataset(items), preset=presets[preset], subset_size=len(items),
                                      ignored_scope=ignored, **extra)
    except Exception as e:  # NNCF raises assorted errors
        raise ArtifactError(f"{fp32_path}: NNCF could not quantize this model ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:300]})") from e
    seconds = time.perf_counter() - t0
    log.debug("NNCF output:\n%s", printed.getvalue())
    src_meta = _onnx_metadata(model)
    for key, value in src_meta.items():
        quantized.set_rt_info(value, [key])
    quantized.set_rt_info("int8", [PRECISION_METADATA_KEY])
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_xml.parent, prefix=".int8-") as tmp:  # whole files or none
        tmp_xml = Path(tmp) / out_xml.name
        ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), out_xml.with_suffix(".bin"))
        os.replace(tmp_xml, out_xml)
    fq = [op.get_friendly_name() for op in quantized.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    kept = sorted(n for n, t in names.items() if t in ("Convolution", "MatMul") and _matches(n, t, keep_float))
    return {"tool": "NNCF post-training quantization (nncf.quantize) on OpenVINO",
            "versions": _versions(), "source": fp32_path.name, "output": out_xml.name, "seconds": seconds,
            "settings": {"preset": preset, "subset_size": len(items), "smooth_quant_convolution_alpha": smooth_quant, "keep_float_types": list(KEEP_FLOAT_TYPES + KEEP_FLOAT_ELEMENTWISE) if keep_float else [],
                         "keep_float_patterns": list(KEEP_FLOAT_PATTERNS) if keep_float else []},
            "fake_quantize_nodes": len(fq),
            "conv_matmul": {"total": sum(t in ("Convolution", "MatMul") for t in names.values()),
                            "kept_float": kept}}


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF's logger (and its rich progress bars) at WARNING for the call, then as it was."""
    lg = logging.getLogger("nncf")
    level = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(level)


def _matches(name: str, op_type: str, keep_float: bool) -> bool:
    import re

    return keep_float and (op_type in KEEP_FLOAT_TYPES or any(re.fullmatch(p, name) for p in KEEP_FLOAT_PATTERNS))


def _onnx_metadata(model) -> dict[str, str]:
    out = {}
    for key in (ONNX_METADATA_KEY,):
        try:
            out[key] = model.get_rt_info(["framework", key]).astype(str)
        except Exception:
            continue
    return out


def _versions() -> dict[str, str]:
    return {k: v for k, v in package_versions().items() if k in ("openvino", "nncf", "onnxruntime")}


def export_int8(fp32_path: str | os.PathLike, out_dir: str | os.PathLike, card: ModelCard | None = None,
                images: np.ndarray | None = None, dataset: str | None = None, tol: float = L2_EPS_FP16_REL_L2,
                n_timesteps: int = DEFAULT_INT8_CALIB_TIMESTEPS, per_t: int = DEFAULT_INT8_CALIB_PER_T,
                calib_seed: int = 0, buckets: int = DEFAULT_BUCKETS, per_bucket: int = DEFAULT_PER_BUCKET,
                keep_float: bool = True) -> tuple[Path, PrecisionReport]:
    """fp32 ONNX → ``out_dir/model.int8.xml`` + ``precision.int8.json``; returns (path, report).

    The ε error per timestep bucket is measured against ``tol`` (the fp16 tolerance) and reported (``passed``);
    unlike fp16 it does not decide alone: int8 changes ε by several percent by nature, so whether int8 is good
    enough is decided by the sample fidelity (``python -m ddpm_deploy.verify.fidelity``: the same seeds sampled
    in fp32 and int8, PSNR of the images and the quality score, against the spread between two fp32 seeds).
    """
    fp32_path, out_dir = Path(fp32_path), Path(out_dir)
    card, images, source = calibration_source(fp32_path, card, images, dataset)
    feeds = calibration_batch(card, images, n_timesteps=n_timesteps, per_t=per_t, seed=calib_seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    candidate = out_dir / ".model.int8.candidate.xml"
    try:
        conv = quantize_int8(fp32_path, candidate, feeds, keep_float=keep_float)
        err = eps_error_report(fp32_path, card, images, _openvino_eps(candidate), label="int8", buckets=buckets,
                               per_bucket=per_bucket, tol=tol, backend="openvino-cpu (int8 IR) vs onnxruntime-cpu fp32")
        final = out_dir / INT8_XML_NAME
        os.replace(candidate.with_suffix(".bin"), final.with_suffix(".bin"))
        os.replace(candidate, final)
        report = PrecisionReport(
            precision="int8", onnx_fp32=fp32_path.name, onnx_mixed=INT8_XML_NAME,
            passed=err["passed"], tolerance={"name": "L2_EPS_FP16_REL_L2", "metric": "rel_l2", "value": tol},
            calibration={"samples": int(len(feeds[INPUT_T])), "timesteps": sorted({int(v) for v in feeds[INPUT_T]}),
                         "per_t": per_t, "pure_noise_at": card.diffusion.num_timesteps - 1, "seed": calib_seed,
                         "dataset": source},
            conversion=conv, error=err, model_sha256=sha256_file(fp32_path))
        report.save(out_dir / INT8_JSON_NAME)
    finally:
        candidate.unlink(missing_ok=True)
        candidate.with_suffix(".bin").unlink(missing_ok=True)
    log.info("int8: wrote %s; worst bucket ε rel L2 %.3g (fp16 tolerance %g: %s)", final, err["worst_rel_l2"], tol,
             "within" if err["passed"] else "exceeded; judge it by sample fidelity")
    return final, report


def _openvino_eps(xml: Path):
    from ddpm_deploy.runtime.backends.openvino import OpenVinoRunner

    def eps(x, t):
        runner = OpenVinoRunner(xml, cache_dir=False)
        try:
            return runner.eps(x, t)
        finally:
            runner.close()

    return eps
