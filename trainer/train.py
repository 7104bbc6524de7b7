"""The training loop: L_simple (ε-MSE, uniform t), Adam with warm-up, grad clipping, EMA, optional flips and
bf16 autocast; seeded so that every step's randomness is a function of (seed, step) only — which makes
``--resume`` exact and lets DistributedDataParallel ranks take disjoint slices of one global batch.

Runs unchanged under ``torchrun`` (gloo on CPU, NCCL on GPU); only rank 0 writes files.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ddpm_deploy.runtime.config import DataSpec, ModelCard
from ddpm_deploy.runtime.errors import ArtifactError, ConfigError, DataError
from ddpm_deploy.runtime.fileio import atomic_write_text
from ddpm_deploy.runtime.imageio import grid_scale, make_grid, save_png, to_uint8
from ddpm_deploy.runtime.sampling.config import plan_for
from ddpm_deploy.runtime.schedule import DiffusionConfig, Schedule

from . import checkpoint as ckpt
from .config import TrainConfig
from .sample import sample_torch
from .unet import UNet, UNetConfig, count_parameters

log = logging.getLogger(__name__)

_MIX = 0x9E3779B97F4A7C15


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed derived from (seed, step, stream); all per-step randomness comes from it."""
    h = (seed * _MIX + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & ((1 << 64) - 1)
    h ^= h >> 31
    return h & ((1 << 63) - 1)


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    steps_per_s: float


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_loss: float
    seconds: float
    steps_per_s: float
    images_per_s: float
    interrupted: bool = False
    samples: list[Path] = field(default_factory=list)


class DistEnv:
    """torchrun's environment, or a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """Rank 0's value of a picklable object on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        unet_cfg: UNetConfig,
        train_cfg: TrainConfig,
        diffusion_cfg: DiffusionConfig,
        images: np.ndarray,
        dataset_name: str,
        preset: str = "custom",
        resume: bool = False,
        callback: Callable[[StepInfo], None] | None = None,
        env: "DistEnv | None" = None,
        resume_from: str | os.PathLike | None = None,
        warn: Callable[[str], None] = log.warning,
    ):
        self.run_dir = Path(run_dir)
        self.ucfg, self.tcfg, self.dcfg = unet_cfg, train_cfg, diffusion_cfg
        if images.ndim != 4 or images.shape[1:] != (unet_cfg.in_channels, unet_cfg.image_size, unet_cfg.image_size):
            raise DataError(
                f"dataset {dataset_name}: images have shape {tuple(images.shape[1:])}, the model expects "
                f"{(unet_cfg.in_channels, unet_cfg.image_size, unet_cfg.image_size)} (C,H,W); pass --channels / "
                f"--set image_size=… to match, or choose another preset"
            )
        self.dataset_name = dataset_name
        self.preset = preset
        self.callback = callback
        self.warn = warn
        self.stop_requested = False
        self.env = env or DistEnv()
        if train_cfg.batch_size % self.env.world:
            raise ConfigError(f"batch_size {train_cfg.batch_size} must be divisible by the {self.env.world} ranks")
        self.local_batch = train_cfg.batch_size // self.env.world
        self.data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        self.schedule = Schedule(diffusion_cfg)
        abar = torch.from_numpy(self.schedule.base_alphas_cumprod)
        self.sqrt_abar = abar.sqrt().float().to(self.env.device)
        self.sqrt_1m_abar = (1.0 - abar).sqrt().float().to(self.env.device)

        torch.manual_seed(train_cfg.seed)
        self.model = UNet(unet_cfg).to(self.env.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=train_cfg.lr)
        self.step = 0
        self.card = ModelCard(
            diffusion=diffusion_cfg,
            data=DataSpec(unet_cfg.in_channels, unet_cfg.image_size),
            architecture={"type": "ddpm-unet", **unet_cfg.to_dict()},
            training={**train_cfg.to_dict(), "dataset": dataset_name, "preset": preset,
                      "num_images": int(images.shape[0]), "parameters": count_parameters(self.model)},
        )
        if resume or resume_from is not None:
            self._resume(resume_from)
        self.ddp = self.model
        if self.env.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.env.device] if self.env.device.type == "cuda" else None
            )

    # -- state -----------------------------------------------------------------------------------
    def _resume(self, resume_from=None):
        last = ckpt.find_checkpoint(self.run_dir, resume_from)
        wpath = last / ckpt.WEIGHTS
        raw, step = ckpt.load_weights(wpath, "raw")
        ema, _ = ckpt.load_weights(wpath, "ema")
        for sd in (raw, ema):
            ckpt.check_weights(self.model, sd, wpath, self.run_dir / ckpt.MODEL_JSON, self.ucfg)
        state = ckpt.load_state(last / ckpt.STATE)
        done = int(state["step"])
        if self.tcfg.steps < done:
            raise ConfigError(
                f"--steps {self.tcfg.steps} is below the {done} steps already done in {self.run_dir} "
                f"({ckpt.CKPT_DIR}/{last.name}); give --steps {done} or more to continue the run "
                f"(its model.json is unchanged)"
            )
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ArtifactError(f"{last / ckpt.STATE}: optimizer state does not fit the model ({str(e)[:200]}); "
                                f"resume from another checkpoint with --resume-from {ckpt.CKPT_DIR}/step_N") from None
        self.model.load_state_dict(raw)
        self.ema.load_state_dict(ema)
        self.step = done
        log.info("resumed %s at step %d", last, self.step)
        if self.env.is_main:
            for p in ckpt.clean_temp_files(self.run_dir):
                self.warn(f"removed {p}, left by an interrupted write")
            moved = ckpt.set_aside_newer(self.run_dir, done)
            if moved:
                self.warn(f"resuming from step {done}: moved the {len(moved)} newer checkpoint(s) "
                          f"({', '.join(m.name for m in moved)}) to {moved[0].parent} so that no later --resume or "
                          f"pruning mixes them with this run; delete that folder when you do not need it")
            self._trim_log()

    def _trim_log(self):
        """Drop loss.jsonl lines past the checkpoint (they will be re-done) and a torn last line (a killed write)."""
        lp = self.run_dir / "loss.jsonl"
        if not lp.exists():
            return
        keep, torn = [], []
        lines = lp.read_bytes().decode("utf-8", "replace").splitlines()
        for i, ln in enumerate(lines):
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
                s = int(row["step"])
            except (ValueError, KeyError, TypeError):
                if i == len(lines) - 1:
                    torn.append(ln)
                    continue
                raise ArtifactError(f"{lp}: line {i + 1} is not a loss record ({ln[:80]!r}); the file is corrupt "
                                    f"(only a torn last line is repaired) — remove that line to resume") from None
            if s <= self.step:
                keep.append(ln)
        if torn:
            self.warn(f"{lp}: removed a torn last line ({torn[0][:60]!r}), left by an interrupted write")
        atomic_write_text(lp, "".join(ln + "\n" for ln in keep))

    def save(self):
        if self.env.is_main:
            self._write_card()
            ckpt.save_checkpoint(self.run_dir, self.model, self.ema, self.opt, self.step, self.tcfg.keep)
        if self.env.world > 1:
            dist.barrier()

    def _write_card(self):
        try:
            ckpt.write_model_json(self.run_dir, self.card)
        except OSError as e:
            raise ckpt.CheckpointWriteError(
                e.errno, f"{e.strerror or e} while writing model.json at step {self.step}; "
                f"{ckpt.kept_message(self.run_dir, -1)}", str(e.filename or self.run_dir / ckpt.MODEL_JSON)) from None

    # -- one step --------------------------------------------------------------------------------
    def global_batch(self, step: int):
        """(x0, t, noise) for the whole global batch of ``step``; a pure function of (seed, step)."""
        g = torch.Generator().manual_seed(step_seed(self.tcfg.seed, step))
        B, T = self.tcfg.batch_size, self.dcfg.num_timesteps
        idx = torch.randint(self.data.shape[0], (B,), generator=g)
        t = torch.randint(T, (B,), generator=g)
        noise = torch.randn((B, *self.data.shape[1:]), generator=g)
        x0 = self.data[idx]
        if self.tcfg.flip:
            flip = torch.rand(B, generator=g) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        return x0, t, noise

    def lr_at(self, step: int) -> float:
        w = self.tcfg.warmup_steps
        return self.tcfg.lr * (min(1.0, (step + 1) / w) if w > 0 else 1.0)

    def train_step(self) -> float:
        x0, t, noise = self.global_batch(self.step)
        lo = self.env.rank * self.local_batch
        sl = slice(lo, lo + self.local_batch)
        dev = self.env.device
        x0, t, noise = x0[sl].to(dev), t[sl].to(dev), noise[sl].to(dev)
        xt = self.sqrt_abar[t, None, None, None] * x0 + self.sqrt_1m_abar[t, None, None, None] * noise
        torch.manual_seed(step_seed(self.tcfg.seed, self.step, 1 + self.env.rank))  # dropout
        self.ddp.train()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.tcfg.bf16):
            pred = self.ddp(xt, t.to(torch.int32))
        loss = F.mse_loss(pred.float(), noise)  # L_simple (eq. 14)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
        lr = self.lr_at(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            d = self.tcfg.ema_decay
            for pe, p in zip(self.ema.parameters(), self.model.parameters()):
                pe.lerp_(p, 1.0 - d)
        self.step += 1
        if not math.isfinite(loss.item()):
            raise DataError(f"loss became {loss.item()} at step {self.step}; lower --lr or check the data range")
        return loss.detach()

    def sample_grid(self) -> Path | None:
        if not self.env.is_main:
            return None
        plan = plan_for(self.dcfg, "ddpm", steps=min(self.tcfg.sample_steps, self.dcfg.num_timesteps))
        n = self.tcfg.num_samples
        x = sample_torch(self.ema, plan, self.data.shape[1:], seed=self.tcfg.seed, indices=range(n))
        grid = make_grid(to_uint8(np.clip(x, -1, 1)))
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        save_png(path, grid, scale=grid_scale(self.ucfg.image_size))
        save_png(self.run_dir / "samples" / "latest.png", grid, scale=grid_scale(self.ucfg.image_size))
        return path

    # -- loop ------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            return self._run()
        except ckpt.CheckpointWriteError:
            raise
        except OSError as e:  # a fault of the machine while writing the log, a grid or the plot: name the place
            raise ckpt.CheckpointWriteError(
                e.errno, f"{e.strerror or e} at step {self.step}; {ckpt.kept_message(self.run_dir, -1)}",
                str(e.filename or self.run_dir)) from None

    def _run(self) -> TrainResult:
        cfg = self.tcfg
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_card()
        start_step, t0 = self.step, time.perf_counter()
        acc, acc_n, last_loss = 0.0, 0, float("nan")
        samples: list[Path] = []
        logf = open(self.run_dir / "loss.jsonl", "a") if self.env.is_main else None
        try:
            while self.step < cfg.steps:
                if self.stop_requested:
                    break
                loss = self.train_step()
                acc, acc_n = acc + float(loss), acc_n + 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    mean = torch.tensor(acc / acc_n)
                    if self.env.world > 1:
                        dist.all_reduce(mean)
                        mean /= self.env.world
                    last_loss, acc, acc_n = float(mean), 0.0, 0
                    elapsed = time.perf_counter() - t0
                    sps = (self.step - start_step) / max(elapsed, 1e-9)
                    log.debug("step %d/%d loss %.4f", self.step, cfg.steps, last_loss)
                    if logf:
                        try:
                            logf.write(json.dumps({"step": self.step, "loss": last_loss,
                                                   "lr": self.lr_at(self.step - 1), "time": round(elapsed, 3)}) + "\n")
                            logf.flush()
                        except OSError as e:
                            e.filename = e.filename or str(self.run_dir / "loss.jsonl")
                            raise
                    if self.callback:
                        self.callback(StepInfo(self.step, cfg.steps, last_loss, self.lr_at(self.step - 1), sps))
                if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < cfg.steps:
                    p = self.sample_grid()
                    if p:
                        samples.append(p)
        finally:
            if logf:
                logf.close()
        elapsed = time.perf_counter() - t0
        interrupted = self.step < cfg.steps
        self.save()
        if self.env.is_main:
            if not interrupted and cfg.sample_every:
                p = self.sample_grid()
                if p:
                    samples.append(p)
            plot_loss(self.run_dir)
        done = self.step - start_step
        return TrainResult(
            run_dir=self.run_dir, step=self.step, final_loss=last_loss, seconds=elapsed,
            steps_per_s=done / max(elapsed, 1e-9), images_per_s=done * cfg.batch_size / max(elapsed, 1e-9),
            interrupted=interrupted, samples=samples,
        )


def plot_loss(run_dir: Path) -> Path | None:
    """loss.jsonl → loss.png (log-scale loss vs step, with a moving average)."""
    lp = Path(run_dir) / "loss.jsonl"
    if not lp.exists():
        return None
    rows = [json.loads(ln) for ln in lp.read_text().splitlines() if ln.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from ddpm_deploy.runtime.fileio import atomic_write_bytes

    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    k = max(1, len(loss) // 20)
    if k > 1:
        ma = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], ma, lw=1.5, label=f"moving average ({k})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("ε-MSE (L_simple)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(run_dir) / "loss.png", buf.getvalue())
    return Path(run_dir) / "loss.png"
