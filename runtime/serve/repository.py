"""Write a Triton Inference Server model repository with one model, ``ddpm``, on Triton's Python backend:

    REPO/ddpm/config.pbtxt          inputs seed UINT64 [1], index INT64 [1], optional steps INT32 [1],
                                    optional scheduler UINT8 [1024] (UTF-8, zero-padded);
                                    output image UINT8 [H, W, C]; dynamic batching; instance_group; parameters
    REPO/ddpm/1/model.py            runtime/serve/triton_model.py (loads the artifact through our runtime)
    REPO/ddpm/1/model.onnx          the ε model travels in the repository (or model.plan + model.plan.json)

No torch, no Triton needed to write it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArtifactError, ConfigError
from ..fileio import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

MODEL_NAME = "ddpm"
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
DEFAULT_MAX_BATCH = 16          # ONNX models; a plan's default is its profile's max batch
DEFAULT_QUEUE_DELAY_US = 2000   # how long the dynamic batcher waits to fill a batch
TEMPLATE = Path(__file__).with_name("triton_model.py")


# The scheduler input: UTF-8 text (a name, or JSON) zero-padded to a fixed length, as UINT8. Fixed, so that
# requests of different schedulers batch together; UINT8, because the bundled Python backend reads tensors by DLPack
# (its BYTES deserialiser fails under NumPy 2, shared notes on Triton) and DLPack has no strings.
SCHEDULER_BYTES = 1024


@dataclass(frozen=True)
class RepoSettings:
    """How the repository serves the model. ``max_batch`` None: the plan's profile max, else 16."""

    instances: int = 1
    kind: str = "cpu"                      # cpu → KIND_CPU (ONNX Runtime CPU); gpu → KIND_GPU (ORT CUDA / TensorRT)
    max_batch: int | None = None
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    threads: int = 0                       # ONNX Runtime threads per instance; 0: the cores / instances
    default_steps: int | None = None       # steps when a request has none; None: all T (DDPM), else 20
    default_scheduler: str | None = None   # scheduler when a request has none (a name or JSON); None: ddpm

    def __post_init__(self):
        if self.instances < 1:
            raise ConfigError(f"instances must be >= 1, found {self.instances}")
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {sorted(KINDS)}, found {self.kind!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"max batch must be >= 1, found {self.max_batch}")
        if self.queue_delay_us < 0 or self.threads < 0:
            raise ConfigError(f"queue delay and threads must be >= 0, found {self.queue_delay_us}, {self.threads}")


def _artifact_info(model: Path, kind: str):
    """(card, precision, plan profile max or None, files to copy) of an ONNX file or a plan with its sidecar."""
    suffix = model.suffix.lower()
    if not model.is_file():
        raise ArtifactError(f"{model}: model not found; give an ONNX file from ddpm-export or a plan")
    if suffix == ".onnx":
        from ..backends.ort import OrtRunner

        with OrtRunner(model, threads=1) as runner:
            card, precision = runner.card, runner.precision
        if card is None:
            raise ArtifactError(f"{model}: has no ddpm-deploy metadata (ddpm_deploy.config); export it with ddpm-export")
        return card, precision, None, [model]
    if suffix in (".plan", ".engine"):
        if kind != "gpu":
            raise ConfigError(f"{model}: a TensorRT plan runs on a GPU only; use kind gpu (--triton-kind gpu / "
                              f"--kind gpu) or serve the ONNX file on the CPU")
        from ..config import ModelCard
        from ..plan import read_plan_sidecar, sidecar_path

        side_path = sidecar_path(model)
        side = read_plan_sidecar(model)
        return ModelCard.from_dict(side.ddpm), side.precision, int(side.profile["max"]), [model, side_path]
    raise ConfigError(f"{model}: expected a .onnx file or a .plan/.engine with its sidecar, found {suffix or 'no suffix'}")


def _pbtxt_str(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_pbtxt(card, precision: str, artifact: str, settings: RepoSettings, max_batch: int, sha256: str) -> str:
    c, s = card.data.channels, card.data.image_size
    params = {"artifact": artifact, "threads": str(settings.threads),
              "default_steps": str(settings.default_steps or ""),
              "default_scheduler": settings.default_scheduler or "", "num_timesteps": str(card.diffusion.num_timesteps),
              "precision": precision, "model_sha256": sha256, "value_range": ",".join(map(str, card.data.value_range)),
              "diffusion": json.dumps(card.diffusion.to_dict(), sort_keys=True),
              "image_shape": f"{s},{s},{c}"}
    lines = [
        f'name: "{MODEL_NAME}"',
        'backend: "python"',
        f"max_batch_size: {max_batch}",
        "input [",
        '  { name: "seed" data_type: TYPE_UINT64 dims: [ 1 ] },',
        '  { name: "index" data_type: TYPE_INT64 dims: [ 1 ] },',
        '  { name: "steps" data_type: TYPE_INT32 dims: [ 1 ] optional: true },',
        f'  {{ name: "scheduler" data_type: TYPE_UINT8 dims: [ {SCHEDULER_BYTES} ] optional: true }}',
        "]",
        "output [",
        f'  {{ name: "image" data_type: TYPE_UINT8 dims: [ {s}, {s}, {c} ] }}',
        "]",
        f"instance_group [ {{ count: {settings.instances} kind: {KINDS[settings.kind]} }} ]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {settings.queue_delay_us} }}",
    ]
    lines += [f"parameters {{ key: {_pbtxt_str(k)} value {{ string_value: {_pbtxt_str(v)} }} }}"
              for k, v in params.items()]
    return "\n".join(lines) + "\n"


def write_repository(model: str | os.PathLike, repo: str | os.PathLike, settings: RepoSettings = RepoSettings()) -> Path:
    """Write REPO/ddpm/{config.pbtxt, 1/model.py, 1/<artifact>} for ``model`` (.onnx, or .plan + sidecar);
    returns REPO. An existing ``ddpm`` model folder in REPO is replaced."""
    model, repo = Path(model), Path(repo)
    card, precision, plan_max, files = _artifact_info(model, settings.kind)
    max_batch = settings.max_batch or plan_max or DEFAULT_MAX_BATCH
    if plan_max is not None and max_batch > plan_max:
        raise ConfigError(f"max batch {max_batch} exceeds the plan's profile max {plan_max}; rebuild the plan with "
                          f"--batch-max {max_batch} or serve with a max batch <= {plan_max}")
    if settings.default_steps is not None and not 1 <= settings.default_steps <= card.diffusion.num_timesteps:
        raise ConfigError(f"default steps must be between 1 and {card.diffusion.num_timesteps}, found "
                          f"{settings.default_steps}")
    if settings.default_scheduler or settings.default_steps:
        from ..sampling.config import plan_for
        from .handler import parse_scheduler

        source, options = parse_scheduler(settings.default_scheduler)
        plan_for(card.diffusion, source, settings.default_steps, allow_files=False, **options)  # refused now
    folder = repo / MODEL_NAME
    tmp = repo / f".{MODEL_NAME}.{os.getpid()}.tmp"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "1").mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, tmp / "1" / f.name)
        shutil.copyfile(TEMPLATE, tmp / "1" / "model.py")
        atomic_write_text(tmp / "config.pbtxt", config_pbtxt(card, precision, model.name, settings, max_batch,
                                                             sha256_file(model)))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"cannot write the model repository {repo}: {e}") from None
    log.info("wrote Triton model repository %s (%s, max batch %d, %d x %s)", repo, model.name, max_batch,
             settings.instances, KINDS[settings.kind])
    return repo


def read_parameters(repo: str | os.PathLike) -> dict[str, str]:
    """The ``parameters`` of REPO/ddpm/config.pbtxt (as written by ``write_repository``)."""
    import re

    path = Path(repo) / MODEL_NAME / "config.pbtxt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ArtifactError(f"{path}: not a ddpm-deploy Triton repository ({e.strerror}); write one with "
                            f"ddpm-export --triton-repo DIR") from None
    pat = r'parameters \{ key: "((?:[^"\\]|\\.)*)" value \{ string_value: "((?:[^"\\]|\\.)*)" \} \}'
    unesc = lambda s: s.replace('\\"', '"').replace("\\\\", "\\")  # noqa: E731
    return {unesc(k): unesc(v) for k, v in re.findall(pat, text)}
