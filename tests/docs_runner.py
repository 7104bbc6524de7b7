"""Run the command blocks of README.md and docs/*.md as written, scaled down (tests/test_docs.py).

Every fenced ```bash block is split into command lines (``\\`` continuations joined, ``#`` comment lines dropped).
Each line is either RUN (after the substitutions of ``SUBS``, which only scale sizes down) or SKIPPED by one rule
of ``SKIPS``, with its reason. Lines run in order, one sandbox folder per document, each through ``bash -c``; a
``ddpm-run serve`` line starts in the background, the runner waits until the server is ready, runs the block's
next lines against it and stops it with SIGINT at the end of the block (or before the next serve line).
Files the text assumes (``model.onnx`` in the working folder, a CIFAR-10 folder, a diffusers model …) are made by
the steps of ``SETUP``, each before the first line that needs it. ```python blocks run as scripts unless their
first line says ``# abridged: …`` (a sketch: only checked to say so); one whose first line starts ``# no torch``
runs with every import of torch failing (``helpers.run_without_torch``'s blocker), and fails if torch got imported.

Every substitution, skip rule and setup step must be used by at least one line, so none can rot.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/scaling.md", "docs/architecture.md"]
BIN = Path(sys.executable).parent

# ------------------------------------------------------------------------------------------------ the scale-down
# The documented sizes scaled down (README "Tests"). Training: --steps N becomes N // TRAIN_SCALE (and
# checkpoints/step_N likewise), every new run checkpoints each (scaled) step as the preset's 500 would, and
# trains with T = DOCS_T diffusion steps on batches of 8, so a full ancestral sample is DOCS_T ε calls.
TRAIN_SCALE = 500
DOCS_T = 100
DOCS_NUM = 4  # images of a sampling job
DOCS_BATCH = 2  # images per model call
DOCS_REQUEST_NUM = 2  # images fetched from a server
DOCS_DEFAULT_TRAIN_STEPS = 2  # for a training line that gives no --steps (the preset's default is thousands)
DOCS_FID_REF = 48  # real digits in the FID reference that stands in for all 1,797

TRAINER = r"(?:\bddpm-train\b|ddpm_deploy\.trainer\.cli)"


def _scale(m: re.Match) -> str:
    return f"{m.group(1)}{max(1, int(m.group(2)) // TRAIN_SCALE)}"


def _new_run(line: str) -> str:
    extra = f" --num-timesteps {DOCS_T} --batch-size 8 --save-every 1 --sample-every 0"
    if not re.search(r"--steps\b", line):
        extra += f" --steps {DOCS_DEFAULT_TRAIN_STEPS}"
    return line + extra


@dataclass
class Sub:
    name: str
    when: str  # regex the line must match
    pattern: str  # regex replaced in the line ("" = the whole line goes through fn)
    repl: str | Callable = ""
    why: str = ""
    used: int = 0

    def apply(self, line: str) -> str:
        if not re.search(self.when, line):
            return line
        if not self.pattern:
            new = self.repl(line)
        else:
            new = re.sub(self.pattern, self.repl, line)
        if new != line:
            self.used += 1
        return new


def make_subs() -> list[Sub]:
    return [
        Sub("train-steps", TRAINER, r"(--steps )(\d+)", _scale, f"ddpm-train --steps N → N // {TRAIN_SCALE}"),
        Sub("train-checkpoint", TRAINER, r"(checkpoints/step_)(\d+)", _scale,
            f"--resume-from checkpoints/step_N → step_(N // {TRAIN_SCALE})"),
        Sub("export-checkpoint", r"ddpm-export", r"(--checkpoint step_)(\d+)", _scale,
            f"ddpm-export --checkpoint step_N → step_(N // {TRAIN_SCALE})"),
        Sub("train-new-run", TRAINER + r"(?!.*--resume)", "", _new_run,
            f"a new run: + --num-timesteps {DOCS_T} --batch-size 8 --save-every 1 (the preset's 500, scaled) "
            "--sample-every 0 (no sample grids: seconds of torch sampling each), and "
            f"--steps {DOCS_DEFAULT_TRAIN_STEPS} where the line gives none"),
        Sub("preset-cifar10", r".", r"--preset ddpm-cifar10\b", "--preset tiny", "--preset ddpm-cifar10 → tiny"),
        Sub("bench-presets", r"ddpm-run bench", r"--presets tiny,ddpm-cifar10\b", "--presets tiny",
            "bench --presets tiny,ddpm-cifar10 → tiny"),
        Sub("bench-batches", r"ddpm-run bench", r"--batches 1,8,64\b", "--batches 1", "bench --batches 1,8,64 → 1"),
        Sub("bench-compile", r"ddpm-run bench", r"torch-compile-fp32,", "",
            "bench: torch-compile-fp32 dropped (compiling takes minutes on 2 cores)"),
        Sub("bench-quick", r"ddpm-run bench", "", lambda line: line + " --repeat 1 --warmup 1 --e2e-steps 2 "
            "--no-engine-builds", "bench: + --repeat 1 --warmup 1 --e2e-steps 2 --no-engine-builds (engine builds "
            "are timed by the ddpm-export lines)"),
        Sub("sample-default-num", r"^ddpm-run sample\b(?!.*--num\b)", "", lambda line: line + f" --num {DOCS_NUM}",
            f"sample without --num (64 images) → + --num {DOCS_NUM}"),
        Sub("request-num", r"ddpm-run request", r"(--num )\d+", rf"\g<1>{DOCS_REQUEST_NUM}",
            f"request --num N → {DOCS_REQUEST_NUM}"),
        Sub("sample-num", r"ddpm-run sample|verify\.cli sample|fid-compare|verify\.fidelity", r"(--num )\d+",
            rf"\g<1>{DOCS_NUM}", f"sample / fid-compare / fidelity --num N → {DOCS_NUM}"),
        Sub("sample-batch", r"ddpm-run sample|verify\.fidelity", r"(--batch )\d+", rf"\g<1>{DOCS_BATCH}",
            f"--batch N → {DOCS_BATCH}"),
        Sub("fid-ref-digits", r"ddpm-run fid", r"(--ref |fid-stats )digits\b", r"\g<1>npz:digits-ref.npz",
            f"FID reference digits (1,797 images, minutes) → npz:digits-ref.npz (the first {DOCS_FID_REF})"),
    ]


# ------------------------------------------------------------------------------------------------ skip rules


def has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def gpu_missing() -> str | None:
    """Why the GPU lines (ONNX Runtime CUDA and the device loop) cannot run here, or None."""
    if not has_gpu():
        return "needs an NVIDIA GPU (none here)"
    import importlib.util

    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "needs onnxruntime-gpu (this venv has the CPU build)"
    if importlib.util.find_spec("cuda") is None:
        return "needs cuda-python (pip install '.[gpu]')"
    return None


def plan_gpu_missing() -> str | None:
    """Why sampling a plan cannot run here: the plans here are TensorRT-RTX's, which run on compute capability
    7.5/8.6/8.9/12.0 only (not A100/H100/B200), and TensorRT proper cannot be installed here."""
    import importlib.util

    why = gpu_missing()
    if why:
        return why
    if importlib.util.find_spec("tensorrt") is None:
        return "sampling a plan needs TensorRT proper on this GPU (TensorRT-RTX plans do not run on A100/H100/B200)"
    return None


def serve_unavailable() -> str | None:
    """Why the README's serve lines cannot run here (their ports are fixed: 8000-8002), or None."""
    try:
        from ddpm_deploy.runtime.serve.server import find_triton

        find_triton()
    except Exception as e:  # noqa: BLE001 - MissingDependencyError or a broken install: say which
        return f"no tritonserver here ({type(e).__name__}: {str(e).splitlines()[0]})"
    for port in (8000, 8001, 8002):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return f"port {port} (of the documented 8000-8002) is busy"
    return None


@dataclass
class Skip:
    name: str
    line: str  # regex on the line
    reason: str
    active: Callable[[], bool | str | None] = lambda: True  # false: the rule does not apply on this machine
    block: str | None = None  # regex on the whole block (e.g. a Slurm script)
    matched: int = 0


def make_skips() -> list[Skip]:
    gpu_why, plan_why = gpu_missing(), plan_gpu_missing()
    serve_why = serve_unavailable()
    return [
        Skip("install", r"^pip (install|uninstall)\b", "installation: the test runs in the installed venv"),
        Skip("demo", r"^bash scripts/demo\.sh", "the whole demo takes ~8 min on 2 cores; its steps are the "
             "Commands lines, which run here scaled down"),
        Skip("test-suite", r"^bash scripts/test\.sh", "the test suite this test is part of"),
        Skip("trtexec", r"^trtexec\b", "trtexec is TensorRT proper, which cannot be installed here"),
        Skip("adopt-trtexec-plan", r"--adopt-plan model\.plan", "adopts the plan of the trtexec line (skipped)"),
        Skip("slurm", r"^sbatch\b", "needs Slurm (sbatch)"),
        Skip("slurm-script", r".", "a Slurm batch script (needs sbatch)", block=r"^#SBATCH"),
        Skip("slurm-output", r"ddpm-run merge /scratch/", "merges the Slurm array's shards (skipped)"),
        Skip("int8-experiment", r"-m ddpm_deploy\.verify\.int8\b", "a ddpm-cifar10 (35.7 M) int8 quantization "
             "experiment: minutes on 2 cores"),
        Skip("gpu", r"--device cuda|--against-device cuda", gpu_why or "", lambda: gpu_why is not None),
        Skip("gpu-plan", r"ddpm-run sample --engine|--against \S+\.plan", plan_why or "",
             lambda: plan_why is not None),
        Skip("gpu-output", r"ddpm-run fid cifar10-samples|^ddpm-run merge job/all job/shard-\*$",
             "reads the samples of the GPU line before it (skipped)", lambda: gpu_why is not None),
        Skip("serve", r"(^|&&\s*)ddpm-run (serve|request)\b", serve_why or "", lambda: serve_why is not None),
    ]


@dataclass
class Expect:
    """A line that runs and ends with another status than 0 on this machine, by design (checked with its output)."""

    name: str
    line: str
    status: int
    output: str  # regex the output must match
    why: str
    active: Callable[[], bool] = lambda: True
    matched: int = 0


def make_expects() -> list[Expect]:
    plan_why = plan_gpu_missing()
    return [Expect("info-engine-not-runnable", r"^ddpm-run info --engine\b", 1, r"runnable here: no",
                   "where the plan cannot run (no GPU, or not one TensorRT-RTX supports) `ddpm-run info --engine` "
                   "prints the plan and exits 1 ('runnable here: no')", lambda: plan_why is not None)]


# ------------------------------------------------------------------------------------------------ extraction


@dataclass
class Block:
    doc: str
    lineno: int  # of the opening fence
    lang: str
    text: str
    heading: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.lineno}"


@dataclass
class Line:
    block: Block
    lineno: int
    text: str  # as written (continuations joined)
    run: str = ""  # after the substitutions
    status: str = ""  # ran, skipped, failed
    reason: str = ""
    seconds: float = 0.0


def blocks(doc: str) -> list[Block]:
    text = (ROOT / doc).read_text(encoding="utf-8")
    out, heading = [], ""
    for m in re.finditer(r"^(#{1,6} [^\n]*)$|^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1):
            heading = m.group(1).lstrip("# ")
            continue
        out.append(Block(doc, text[:m.start()].count("\n") + 1, m.group(2), m.group(3), heading))
    return out


def command_lines(block: Block) -> list[Line]:
    lines, cur, start = [], "", 0
    for i, raw in enumerate(block.text.splitlines()):
        n = block.lineno + 1 + i
        if not cur and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if not cur:
            start = n
        if raw.rstrip().endswith("\\"):
            cur += raw.rstrip()[:-1].rstrip() + " "
            continue
        lines.append(Line(block, start, (cur + raw.strip()).strip()))
        cur = ""
    assert not cur, f"{block.where}: a line ends with a continuation"
    return lines


def strip_comment(line: str) -> str:
    """The command without its trailing ``# comment`` (a ``#`` after whitespace, outside quotes)."""
    return re.split(r"\s+#\s", " " + line, maxsplit=1)[0].strip()


# ------------------------------------------------------------------------------------------------ setup steps


@dataclass
class Setup:
    name: str
    before: str  # regex: runs before the first line matching it (in any document)
    doc: str
    fn: Callable[["Sandbox"], None]
    why: str
    used: int = 0


def _copy_model_files(sb: "Sandbox") -> None:
    src = sb.find_export()
    for name in ("model.onnx", "model.fp16.onnx", "precision.json"):
        if (src / name).exists() and not (sb.cwd / name).exists():
            shutil.copy2(src / name, sb.cwd / name)


def _cifar10(sb: "Sandbox") -> None:
    """A CIFAR-10 "python version" folder in its real format (pickled dicts of uint8 rows), of random images."""
    import numpy as np

    d = sb.cwd / "data" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, 8).tolist(),
                 b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(8)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 8}, f)


def _digits_ref(sb: "Sandbox") -> None:
    import numpy as np

    from ddpm_deploy.trainer.data import load_dataset

    x = load_dataset("digits", image_size=16, channels=1).images[:DOCS_FID_REF]  # float [-1, 1], NCHW
    u8 = np.clip(np.round((np.asarray(x) + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.savez(sb.cwd / "digits-ref.npz", images=u8)


def _diffusers_model(sb: "Sandbox") -> None:
    """A local "google/ddpm-cifar10-32": its block structure at a fraction of the width, random weights, T = DOCS_T."""
    import torch
    from diffusers import UNet2DModel

    root = sb.cwd / "ddpm-cifar10-32"
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(8, 16, 16, 16), norm_num_groups=4, norm_eps=1e-6,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       downsample_padding=0, flip_sin_to_cos=False, freq_shift=1).eval()
    unet.save_pretrained(str(root), safe_serialization=True)
    (root / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.0", "beta_end": 0.02, "beta_schedule": "linear",
         "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": DOCS_T, "trained_betas": None,
         "variance_type": "fixed_large"}, indent=2))


def _diffusers_named_onnx(sb: "Sandbox") -> None:
    """unet-onnx/model.onnx as other tools export a diffusers UNet (optimum, diffusers' ONNX scripts): inputs sample,
    timestep int64 [B], output out_sample; the pipeline's scheduler_config.json beside it."""
    import torch
    from diffusers import UNet2DModel
    from parity.google_ddpm import export_diffusers_named

    unet = UNet2DModel.from_pretrained(str(sb.cwd / "ddpm-digits" / "unet"))
    out = sb.cwd / "unet-onnx"
    out.mkdir()
    export_diffusers_named(unet, out / "model.onnx", torch.tensor([1, 2]), {"timestep": {0: "batch"}})
    shutil.copy(sb.cwd / "ddpm-digits" / "scheduler" / "scheduler_config.json", out / "scheduler_config.json")


def _scheduler_config(sb: "Sandbox") -> None:
    """scheduler_config.json as diffusers writes it (DPMSolverMultistepScheduler, the model's β schedule)."""
    from diffusers import DPMSolverMultistepScheduler

    DPMSolverMultistepScheduler(num_train_timesteps=DOCS_T).save_config(str(sb.cwd))


def make_setup() -> list[Setup]:
    return [
        Setup("model-files", r"(?<![\w/.-])model\.(fp16\.)?onnx\b", "*", _copy_model_files,
              "model.onnx, model.fp16.onnx, precision.json in the working folder: copies of the README's "
              "runs/latest/export/ (from its ddpm-export lines)"),
        Setup("cifar10", r"cifar10:data/cifar-10-batches-py", "README.md", _cifar10,
              "data/cifar-10-batches-py: the CIFAR-10 python-version layout (pickled batches), 8 random images "
              "per batch file"),
        Setup("digits-ref", r"--ref digits|fid-stats digits", "README.md", _digits_ref,
              f"digits-ref.npz: the first {DOCS_FID_REF} real digits at 16×16 (for --ref digits)"),
        Setup("diffusers-model", r"--from-diffusers ddpm-cifar10-32", "README.md", _diffusers_model,
              "ddpm-cifar10-32/: a UNet2DModel of google/ddpm-cifar10-32's blocks at widths 8/16/16/16, random "
              f"weights, its scheduler_config.json with T = {DOCS_T}"),
        Setup("diffusers-named-onnx", r"unet-onnx/model\.onnx", "README.md", _diffusers_named_onnx,
              "unet-onnx/: the README's ddpm-digits UNet exported by torch.onnx.export with diffusers' I/O names "
              "(sample, timestep int64 [B] → out_sample), its scheduler_config.json beside it"),
        Setup("scheduler-config", r"--scheduler-config scheduler_config\.json", "README.md", _scheduler_config,
              f"scheduler_config.json: diffusers' DPMSolverMultistepScheduler defaults (T = {DOCS_T})"),
    ]


# ------------------------------------------------------------------------------------------------ the runner


class Sandbox:
    def __init__(self, root: Path, doc: str, env: dict, shared: dict):
        self.doc = doc
        self.cwd = root / re.sub(r"\W", "_", doc)
        self.cwd.mkdir(parents=True)
        self.env = {**env, "DDPM_RUNS_DIR": str(self.cwd / "runs")}
        self.shared = shared  # across documents: the README's export folder
        self.server: subprocess.Popen | None = None
        self.server_log = None
        self.done: set[str] = set()  # setup steps done in this sandbox

    def find_export(self) -> Path:
        own = self.cwd / "runs" / "latest" / "export"
        return own if (own / "model.onnx").exists() else self.shared["export"]

    def bash(self, cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", cmd], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start_server(self, cmd: str, timeout: float = 240) -> tuple[bool, str]:
        self.stop_server()
        self.server_log = open(self.cwd / f"serve-{time.time_ns()}.log", "w+")
        self.server = subprocess.Popen(["bash", "-c", cmd], cwd=self.cwd, env=self.env, stdout=self.server_log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.server.poll() is not None:
                return False, f"exited with status {self.server.returncode}:\n{self._log()}"
            try:
                with urllib.request.urlopen("http://127.0.0.1:8000/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return True, ""
            except OSError:
                pass
            time.sleep(0.5)
        return False, f"not ready within {timeout:.0f}s:\n{self._log()}"

    def _log(self) -> str:
        self.server_log.flush()
        self.server_log.seek(0)
        return self.server_log.read()[-3000:]

    def stop_server(self) -> None:
        if self.server is None:
            return
        if self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGINT)
            try:
                self.server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait(10)
        self.server_log.close()
        self.server = None


def plan(docs=DOCS) -> list[tuple[Block, list[Line]]]:
    return [(b, command_lines(b) if b.lang == "bash" else []) for d in docs for b in blocks(d)]


def run_docs(root: Path, env: dict, log=print, docs=DOCS):
    """Run every block of ``docs``; returns (lines, python block results, subs, skips, setup, expects)."""
    subs, skips, setups, expects = make_subs(), make_skips(), make_setup(), make_expects()
    shared: dict = {}
    results: list[Line] = []
    py_results: list[tuple[Block, str, str]] = []
    for doc in docs:
        sb = Sandbox(root, doc, env, shared)
        try:
            for block in blocks(doc):
                if block.lang == "python":
                    py_results.append(_python_block(sb, block, setups, log))
                    continue
                if block.lang != "bash":
                    continue
                for line in command_lines(block):
                    results.append(line)
                    _run_line(sb, line, subs, skips, setups, expects, log)
                sb.stop_server()
        finally:
            sb.stop_server()
        if doc == "README.md":
            shared["export"] = sb.cwd / "runs" / "latest" / "export"
    return results, py_results, subs, skips, setups, expects


def _do_setup(sb: Sandbox, text: str, setups: list[Setup], log) -> None:
    for s in setups:
        if (s.name in sb.done or s.doc not in ("*", sb.doc)) or not re.search(s.before, text, re.M):
            continue
        sb.done.add(s.name)
        s.fn(sb)
        s.used += 1
        log(f"  setup {s.name}: {s.why}")


def _python_block(sb: Sandbox, block: Block, setups, log) -> tuple[Block, str, str]:
    first = block.text.splitlines()[0]
    if first.startswith("# abridged:"):
        return block, "sketch", first
    _do_setup(sb, block.text, setups, log)
    script = sb.cwd / f"block_{block.lineno}.py"
    text = block.text
    if re.match(r"# no torch\b", first):  # the runtime half: any import of torch fails, and none happened
        from helpers import _BLOCK_TORCH

        text = _BLOCK_TORCH + text + "\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    script.write_text(text)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, script.name], cwd=sb.cwd, env=sb.env, capture_output=True, text=True,
                       timeout=600)
    status = "ran" if r.returncode == 0 else "failed"
    log(f"{status:7} {time.monotonic() - t0:6.1f}s {block.where} python block")
    return block, status, (r.stdout + r.stderr)[-3000:]


def _run_line(sb: Sandbox, line: Line, subs, skips, setups, expects, log) -> None:
    for rule in skips:
        if re.search(rule.line, line.text) and (rule.block is None or re.search(rule.block, line.block.text, re.M)):
            rule.matched += 1
            if rule.active():
                line.status, line.reason = "skipped", f"{rule.name}: {rule.reason}"
                log(f"skipped         {line.block.doc}:{line.lineno} {line.text[:90]}  [{rule.name}]")
                return
            break
    cmd = strip_comment(line.text)
    for s in subs:
        cmd = s.apply(cmd)
    line.run = cmd
    _do_setup(sb, strip_comment(line.text) + "\n" + cmd, setups, log)
    t0 = time.monotonic()
    if re.search(r"(^|&&\s*)ddpm-run serve\b", cmd):
        ok, why = sb.start_server(cmd)
        line.status, line.reason = ("ran", "server ready") if ok else ("failed", why)
    else:
        try:
            r = sb.bash(cmd)
            status, why = 0, ""
            for e in expects:
                if re.search(e.line, line.text) and e.active():
                    e.matched += 1
                    status, why = e.status, e.why
                    if not re.search(e.output, r.stdout + r.stderr):
                        status = None  # the output is not the expected one: failed
            ok = r.returncode == status
            line.status = "ran" if ok else "failed"
            line.reason = why if ok else f"exit {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}"
        except subprocess.TimeoutExpired:
            line.status, line.reason = "failed", "timed out"
    line.seconds = time.monotonic() - t0
    log(f"{line.status:7} {line.seconds:6.1f}s {line.block.doc}:{line.lineno} {cmd[:110]}")
    if line.status == "failed":
        log("    " + line.reason.replace("\n", "\n    ")[-1500:])
