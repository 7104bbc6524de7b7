"""Write a Triton Inference Server model repository: the model ``ddpm`` that clients call, an ensemble of one step,
and ``ddpm_sampler``, the Python-backend model behind it:

    REPO/ddpm/config.pbtxt              ensemble: inputs seed UINT64 [-1, 1], index INT64 [-1, 1] (metadata shapes,
                                        the -1 being the request's batch), optional steps INT32 [-1, 1], optional
                                        scheduler UINT8 [-1, 1024] (UTF-8, zero-padded); output image UINT8
                                        [-1, H, W, C]; the parameters clients read
    REPO/ddpm/1/                        (empty: an ensemble has no files, Triton wants the version folder)
    REPO/ddpm_sampler/config.pbtxt      Python backend; dynamic batching; instance_group; parameters
    REPO/ddpm_sampler/1/model.py        runtime/serve/triton_model.py (loads the artifact through our runtime)
    REPO/ddpm_sampler/1/model.onnx      the ε model travels in the repository (or model.plan + model.plan.json)
    REPO/ddpm_stream/config.pbtxt       step-level batching (``batching="step"``): Python backend in decoupled mode,
                                        inputs seed UINT64 [-1], index INT64 [-1], optional steps INT32 [-1] and
                                        scheduler UINT8 [-1] (UTF-8); one response per image: image UINT8
                                        [1, H, W, C] and index INT64 [1]; parameters slots and queue_size
    REPO/ddpm_stream/1/model.py         the same model.py (it reads the decoupled policy); the artifact is
                                        ddpm_sampler's (parameter artifact ../../ddpm_sampler/1/model.onnx)

Two ways to batch (``RepoSettings.batching``): "request" writes ``ddpm`` + ``ddpm_sampler`` (Triton's dynamic batcher
batches whole requests); "step" adds ``ddpm_stream``, whose loop admits requests into free slots at every step.
A decoupled model is reached only by gRPC streaming and HTTP's generate / generate_stream endpoints (Triton's plain
infer endpoint refuses decoupled models), so ``ddpm`` stays beside it for plain HTTP/gRPC infer clients.

Why an ensemble: Triton's Python backend reports every request of an ``execute`` call as a success, including
those it answers with an error, so a bad request would count in ``nv_inference_request_success``. The ensemble
passes the sampler's error on with its code (INVALID_ARG: HTTP 400, gRPC INVALID_ARGUMENT) and counts the request
in ``nv_inference_request_failure`` of model ``ddpm``. Both models are pinned to version 1: other version folders a
user keeps in the repository are not loaded.

No torch, no Triton needed to write it. The repository is written by the project's output policy
(``runtime.outputs``): an existing ``ddpm``/``ddpm_sampler`` folder is refused unless ``overwrite``, and then only the
files listed above are replaced (other versions and other files stay); a failed write leaves nothing half-made.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArtifactError, ConfigError
from ..fileio import sha256_file

log = logging.getLogger(__name__)

MODEL_NAME = "ddpm"              # what clients call (an ensemble)
SAMPLER_NAME = "ddpm_sampler"    # the Python-backend model that samples
STREAM_NAME = "ddpm_stream"      # the step-level model (decoupled: gRPC streaming, HTTP generate)
BATCHING = ("step", "request")
DEFAULT_BATCHING = "step"       # see docs/scaling.md, "Step-level batching"
DEFAULT_QUEUE = 64              # step-level: requests that wait for a slot before the server answers "busy"
VERSION = "1"
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
    batching: str = DEFAULT_BATCHING       # step: add ddpm_stream (step-level); request: ddpm only
    queue_size: int = DEFAULT_QUEUE        # step-level: the wait queue's bound (past it: "busy")
    precision: str = "fp32"                # CPU: fp32 (the file on ONNX Runtime), bf16, int8, int8-bf16, auto or
    #                                        precision bands "bf16:0-99,int8-bf16:100-999" (OpenVINO), as sample

    def __post_init__(self):
        if self.precision != "fp32":
            from ..backends.base import PRECISIONS

            if self.kind != "cpu":
                raise ConfigError(f"precision {self.precision!r} runs OpenVINO on the CPU; it needs kind cpu")
            if ":" in self.precision:
                import re

                from ..backends.banded import parse_bands

                ends = [int(v) for v in re.findall(r"-(\d+)", self.precision)]
                parse_bands(self.precision, max(ends, default=0) + 1)  # the form; against T in write_repository
            elif self.precision not in PRECISIONS:
                raise ConfigError(f"precision must be one of {list(PRECISIONS)} or precision bands "
                                  f"(P:FIRST-LAST,...), found {self.precision!r}")
        if self.batching not in BATCHING:
            raise ConfigError(f"batching must be one of {list(BATCHING)}, found {self.batching!r}")
        if self.queue_size < 1:
            raise ConfigError(f"the queue size must be >= 1, found {self.queue_size}")
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


def _params(card, precision: str, artifact: str, settings: RepoSettings, sha256: str) -> dict[str, str]:
    c, s = card.data.channels, card.data.image_size
    return {"artifact": artifact, "threads": str(settings.threads),
            "default_steps": str(settings.default_steps or ""),
            "default_scheduler": settings.default_scheduler or "", "num_timesteps": str(card.diffusion.num_timesteps),
            "precision": precision if settings.precision == "fp32" else settings.precision, "model_sha256": sha256, "value_range": ",".join(map(str, card.data.value_range)),
            "diffusion": json.dumps(card.diffusion.to_dict(), sort_keys=True),
            "image_shape": f"{s},{s},{c}", "batching": settings.batching, "cpu_precision": settings.precision}


def _io_lines(card) -> list[str]:
    c, s = card.data.channels, card.data.image_size
    return [
        "input [",
        '  { name: "seed" data_type: TYPE_UINT64 dims: [ 1 ] },',
        '  { name: "index" data_type: TYPE_INT64 dims: [ 1 ] },',
        '  { name: "steps" data_type: TYPE_INT32 dims: [ 1 ] optional: true },',
        f'  {{ name: "scheduler" data_type: TYPE_UINT8 dims: [ {SCHEDULER_BYTES} ] optional: true }}',
        "]",
        "output [",
        f'  {{ name: "image" data_type: TYPE_UINT8 dims: [ {s}, {s}, {c} ] }}',
        "]",
    ]


def _param_lines(params: dict[str, str]) -> list[str]:
    return [f"parameters {{ key: {_pbtxt_str(k)} value {{ string_value: {_pbtxt_str(v)} }} }}"
            for k, v in params.items()]


def config_pbtxt(card, precision: str, artifact: str, settings: RepoSettings, max_batch: int, sha256: str) -> str:
    """The sampler's config (``ddpm_sampler``: Python backend, dynamic batching, instances)."""
    lines = [
        f'name: "{SAMPLER_NAME}"',
        'backend: "python"',
        f"max_batch_size: {max_batch}",
        f"version_policy: {{ specific {{ versions: [ {VERSION} ] }} }}",
        *_io_lines(card),
        f"instance_group [ {{ count: {settings.instances} kind: {KINDS[settings.kind]} }} ]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {settings.queue_delay_us} }}",
    ]
    return "\n".join(lines + _param_lines(_params(card, precision, artifact, settings, sha256))) + "\n"


def stream_pbtxt(card, precision: str, artifact: str, settings: RepoSettings, max_batch: int, sha256: str) -> str:
    """The step-level model's config (``ddpm_stream``: Python backend, decoupled, no dynamic batcher: its own loop
    of ``max_batch`` slots batches the images)."""
    c, s = card.data.channels, card.data.image_size
    params = {**_params(card, precision, f"../../{SAMPLER_NAME}/{VERSION}/{artifact}", settings, sha256),
              "slots": str(max_batch), "queue_size": str(settings.queue_size)}
    lines = [
        f'name: "{STREAM_NAME}"',
        'backend: "python"',
        "max_batch_size: 0",
        f"version_policy: {{ specific {{ versions: [ {VERSION} ] }} }}",
        "model_transaction_policy { decoupled: true }",
        "input [",
        '  { name: "seed" data_type: TYPE_UINT64 dims: [ -1 ] },',
        '  { name: "index" data_type: TYPE_INT64 dims: [ -1 ] },',
        '  { name: "steps" data_type: TYPE_INT32 dims: [ -1 ] optional: true },',
        '  { name: "scheduler" data_type: TYPE_UINT8 dims: [ -1 ] optional: true }',
        "]",
        "output [",
        f'  {{ name: "image" data_type: TYPE_UINT8 dims: [ -1, {s}, {s}, {c} ] }},',
        '  { name: "index" data_type: TYPE_INT64 dims: [ -1 ] }',
        "]",
        f"instance_group [ {{ count: {settings.instances} kind: {KINDS[settings.kind]} }} ]",
    ]
    return "\n".join(lines + _param_lines(params)) + "\n"


def ensemble_pbtxt(card, precision: str, artifact: str, settings: RepoSettings, max_batch: int, sha256: str) -> str:
    """The config of ``ddpm``, the model clients call: an ensemble of one step, ``ddpm_sampler`` (see the module
    docstring: it makes a refused request a counted failure). It carries the same parameters, for clients."""
    step = " ".join(f'input_map {{ key: "{n}" value: "{n}" }}' for n in ("seed", "index", "steps", "scheduler"))
    lines = [
        f'name: "{MODEL_NAME}"',
        'platform: "ensemble"',
        f"max_batch_size: {max_batch}",
        f"version_policy: {{ specific {{ versions: [ {VERSION} ] }} }}",
        *_io_lines(card),
        f'ensemble_scheduling {{ step [ {{ model_name: "{SAMPLER_NAME}" model_version: {VERSION} {step} '
        'output_map { key: "image" value: "image" } } ] }',
    ]
    return "\n".join(lines + _param_lines(_params(card, precision, artifact, settings, sha256))) + "\n"


def int8_files(model: str | os.PathLike, precision: str) -> list[Path]:
    """The int8 model files beside ``model`` that serving at ``precision`` needs (they go into the repository beside
    the ONNX): for int8, int8-bf16 and bands naming them, and for auto where they exist (auto may choose them)."""
    from ..backends.base import INT8_MODEL, INT8_REPORT

    model = Path(model)
    xml = model.with_name(INT8_MODEL)
    files = [xml, xml.with_suffix(".bin"), model.with_name(INT8_REPORT)]
    if precision == "auto":
        return files if all(f.is_file() for f in files) else []
    if "int8" not in precision:
        return []
    missing = [f.name for f in files[:2] if not f.is_file()]
    if missing:
        raise ArtifactError(f"precision {precision!r} needs {' and '.join(missing)} beside {model}; write it with "
                            f"ddpm-export --onnx {model} --int8")
    return files if files[2].is_file() else files[:2]


def repository_files(repo: str | os.PathLike, model: str | os.PathLike, batching: str = DEFAULT_BATCHING,
                     precision: str = "fp32") -> list[Path]:
    """The files ``write_repository`` writes into ``repo`` for ``model`` (and only those are replaced): the ensemble's
    and the sampler's configs, model.py, the artifact (+ a plan's sidecar, + the int8 model ``precision`` needs),
    then with step-level batching the stream model's config and model.py."""
    repo, model = Path(repo), Path(model)
    v = repo / SAMPLER_NAME / VERSION
    files = [repo / MODEL_NAME / "config.pbtxt", repo / SAMPLER_NAME / "config.pbtxt", v / "model.py", v / model.name]
    if model.suffix.lower() in (".plan", ".engine"):
        from ..plan import sidecar_path

        files.append(v / sidecar_path(model).name)
    files += [v / f.name for f in int8_files(model, precision)]
    if batching == "step":
        files += [repo / STREAM_NAME / "config.pbtxt", repo / STREAM_NAME / VERSION / "model.py"]
    return files


def check_target(repo: str | os.PathLike, overwrite: bool = False, command: str = "ddpm-export --triton-repo") -> None:
    """Refuse (ConfigError, before any work) a repository that already holds our models, unless ``overwrite``."""
    from ..outputs import refuse_existing

    repo = Path(repo)
    if os.path.lexists(repo) and not repo.is_dir():
        raise ConfigError(f"{command} {repo}: expected a folder, found a file; choose another folder")
    if not overwrite:
        refuse_existing(command, [repo / MODEL_NAME, repo / SAMPLER_NAME, repo / STREAM_NAME], "--overwrite",
                        "choose another folder (with --overwrite only config.pbtxt and the files of version 1 that "
                        "ddpm-export writes are replaced; other versions and files stay)")


def write_repository(model: str | os.PathLike, repo: str | os.PathLike, settings: RepoSettings = RepoSettings(),
                     overwrite: bool = False, command: str = "ddpm-export --triton-repo") -> Path:
    """Write REPO/ddpm (the ensemble clients call) and REPO/ddpm_sampler/{config.pbtxt, 1/model.py, 1/<artifact>}
    for ``model`` (.onnx, or .plan + sidecar); returns REPO. Existing models are refused unless ``overwrite``; with
    it only those files are replaced (other versions and files stay). A failure leaves nothing half-made."""
    from ..outputs import Outputs

    model, repo = Path(model), Path(repo)
    check_target(repo, overwrite, command)
    card, precision, plan_max, files = _artifact_info(model, settings.kind)
    max_batch = settings.max_batch or plan_max or DEFAULT_MAX_BATCH
    if plan_max is not None and max_batch > plan_max:
        raise ConfigError(f"max batch {max_batch} exceeds the plan's profile max {plan_max}; rebuild the plan with "
                          f"--batch-max {max_batch} or serve with a max batch <= {plan_max}")
    check_defaults(card.diffusion, settings.default_scheduler, settings.default_steps)
    if ":" in settings.precision:
        from ..backends.banded import parse_bands

        parse_bands(settings.precision, card.diffusion.num_timesteps)  # every timestep of this model in one band
    files = files + int8_files(model, settings.precision)
    sha = sha256_file(model)
    targets = repository_files(repo, model, settings.batching, settings.precision)
    stream = targets[-2:] if settings.batching == "step" else []
    ens_cfg, cfg, py, *artifacts = targets[:len(targets) - len(stream)]
    try:
        with Outputs(command, targets, overwrite=True, hint="choose another folder") as out:
            if stream:
                out.stage(stream[0]).write_text(stream_pbtxt(card, precision, model.name, settings, max_batch, sha),
                                                encoding="utf-8")
                shutil.copyfile(TEMPLATE, out.stage(stream[1]))
            out.mkdir(repo / MODEL_NAME / VERSION)  # an ensemble's version folder holds nothing
            for src, dst in zip(files, artifacts):
                shutil.copyfile(src, out.stage(dst))
            shutil.copyfile(TEMPLATE, out.stage(py))
            out.stage(cfg).write_text(config_pbtxt(card, precision, model.name, settings, max_batch, sha),
                                      encoding="utf-8")
            out.stage(ens_cfg).write_text(ensemble_pbtxt(card, precision, model.name, settings, max_batch, sha),
                                          encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write the model repository {repo}: {e}; files that were there before are "
                          f"unchanged") from None
    log.info("wrote Triton model repository %s (%s, %s-level batching, max batch %d, %d x %s)", repo, model.name,
             settings.batching, max_batch, settings.instances, KINDS[settings.kind])
    return repo


def check_defaults(diffusion, scheduler: str | None, steps: int | None) -> None:
    """Refuse (ConfigError) a repository default scheduler/steps no request could use."""
    if steps is not None and not 1 <= steps <= diffusion.num_timesteps:
        raise ConfigError(f"default steps must be between 1 and {diffusion.num_timesteps}, found {steps}")
    if scheduler or steps:
        from ..errors import DDPMError
        from ..sampling.config import plan_for
        from .handler import parse_scheduler

        try:
            source, options = parse_scheduler(scheduler)
            plan_for(diffusion, source, steps, allow_files=False, **options)  # refused now
        except (DDPMError, TypeError, ValueError) as e:
            raise ConfigError(f"the repository's default scheduler/steps: {e}") from None


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


def _set_param(text: str, key: str, value: str) -> str:
    import re

    pat = re.compile(r'parameters \{ key: ' + re.escape(_pbtxt_str(key)) + r' value \{ string_value: "(?:[^"\\]|\\.)*" \} \}')
    new = f"parameters {{ key: {_pbtxt_str(key)} value {{ string_value: {_pbtxt_str(value)} }} }}"
    if pat.search(text):
        return pat.sub(lambda m: new, text, count=1)
    return text.rstrip("\n") + "\n" + new + "\n"


def _sub_once(text: str, pattern: str, repl: str, path: Path, what: str) -> str:
    import re

    new, n = re.subn(pattern, repl, text, count=1)
    if n != 1:
        raise _unlike_ours(path, what)
    return new


def _unlike_ours(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path}: cannot set {what}: the config has no line as ddpm-export writes it; write the "
                          f"repository again with ddpm-export --triton-repo DIR --overwrite and its --triton-* options")


def serving_copy(repo: str | os.PathLike, dst: str | os.PathLike, instances: int | None = None,
                 max_batch: int | None = None, kind: str | None = None, threads: int | None = None,
                 default_steps: int | None = None, default_scheduler: str | None = None, batching: str | None = None,
                 queue_size: int | None = None) -> Path:
    """A copy of ``repo`` in ``dst`` with the given settings applied (``ddpm-run serve --repo R --instances N …``):
    the configs are rewritten, every other file is linked, ``repo`` is not touched. Values are checked against the
    repository (steps and scheduler against its diffusion schedule, the max batch against a plan's profile)."""
    import re

    repo, dst = Path(repo), Path(dst)
    sampler = SAMPLER_NAME if (repo / SAMPLER_NAME / "config.pbtxt").is_file() else MODEL_NAME  # older repositories
    params = read_parameters(repo)
    RepoSettings(instances=instances or 1, kind=kind or "cpu", max_batch=max_batch, threads=threads or 0,
                 batching=batching or "request", queue_size=1 if queue_size is None else queue_size)  # ranges
    has_stream = (repo / STREAM_NAME / "config.pbtxt").is_file()
    if (batching == "step" or (batching is None and queue_size is not None)) and not has_stream:
        raise ConfigError(f"{repo} has no step-level model ({STREAM_NAME}); write the repository again with "
                          f"ddpm-export --triton-repo {repo} --triton-batching step --overwrite, or serve it with "
                          f"--batching request")
    if default_steps is not None or default_scheduler is not None:
        from ..schedule import DiffusionConfig

        try:
            diffusion = DiffusionConfig.from_dict(json.loads(params["diffusion"]))
        except (KeyError, ValueError, TypeError) as e:
            raise ArtifactError(f"{repo / MODEL_NAME / 'config.pbtxt'}: no diffusion parameter ({e}); write the "
                                f"repository again with ddpm-export --triton-repo") from None
        steps = default_steps if default_steps is not None else (int(params["default_steps"])
                                                                 if params.get("default_steps") else None)
        sched = default_scheduler if default_scheduler is not None else (params.get("default_scheduler") or None)
        check_defaults(diffusion, sched, steps)
    artifact = params.get("artifact", "")
    if artifact.endswith((".plan", ".engine")):
        if kind == "cpu":
            raise ConfigError(f"{repo} serves a TensorRT plan, which runs on a GPU only; --kind cpu needs a "
                              f"repository of the ONNX file")
        if max_batch is not None:
            from ..plan import read_plan_sidecar

            prof = int(read_plan_sidecar(repo / sampler / VERSION / artifact).profile["max"])
            if max_batch > prof:
                raise ConfigError(f"--max-batch {max_batch} exceeds the plan's profile max {prof}; rebuild the plan "
                                  f"with --batch-max {max_batch} or serve with --max-batch <= {prof}")
    step = has_stream and (batching or params.get("batching", "request")) == "step"
    for name in dict.fromkeys([MODEL_NAME, sampler] + ([STREAM_NAME] if step else [])):
        src, out = repo / name, dst / name
        out.mkdir(parents=True)
        for entry in src.iterdir():
            if entry.is_dir() and entry.name.isdigit():  # a version: its own folder here, so that Python's
                (out / entry.name).mkdir()               # __pycache__ of model.py is not written into R
                for f in entry.iterdir():
                    if f.name == "__pycache__":
                        continue
                    if f.suffix == ".py":
                        shutil.copyfile(f, out / entry.name / f.name)
                    else:
                        os.symlink(f.resolve(), out / entry.name / f.name)
            elif entry.name != "config.pbtxt":
                os.symlink(entry.resolve(), out / entry.name)
        path = src / "config.pbtxt"
        text = path.read_text(encoding="utf-8")
        if max_batch is not None and name == STREAM_NAME:
            text = _set_param(text, "slots", str(max_batch))
        elif max_batch is not None:
            text = _sub_once(text, r"max_batch_size: \d+", f"max_batch_size: {max_batch}", path, "--max-batch")
        if name == STREAM_NAME and queue_size is not None:
            text = _set_param(text, "queue_size", str(queue_size))
        if name == MODEL_NAME and batching is not None:
            text = _set_param(text, "batching", "step" if step else "request")
        if name in (sampler, STREAM_NAME):
            if instances is not None or kind is not None:
                m = re.search(r"instance_group \[ \{ count: (\d+) kind: (KIND_\w+) \} \]", text)
                if m is None:
                    raise _unlike_ours(path, "--instances/--kind")
                text = text.replace(m.group(0), f"instance_group [ {{ count: {instances or m.group(1)} kind: "
                                                f"{KINDS[kind] if kind else m.group(2)} }} ]")
            if threads is not None:
                text = _set_param(text, "threads", str(threads))
        for key, value in (("default_steps", default_steps), ("default_scheduler", default_scheduler)):
            if value is not None:
                text = _set_param(text, key, str(value))
        (out / "config.pbtxt").write_text(text, encoding="utf-8")
    return dst
