"""The diffusers reference sampler: diffusers' own ``DDPMScheduler`` (its tables, its ``step``) driven with our
counter-based noise, so the parity suite compares our runtime with the library users would pick instead."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import numpy as np
import torch

from ddpm_deploy.export.from_diffusers import BETA_SCHEDULES, INSTALL
from ddpm_deploy.runtime.errors import lazy_import
from ddpm_deploy.runtime.schedule import DiffusionConfig


def scheduler_for(cfg: DiffusionConfig, float64_betas: np.ndarray | None = None):
    """diffusers' DDPMScheduler for our DiffusionConfig; with ``float64_betas`` its own formulas run on float64
    tables (diffusers builds β in float32 by design)."""
    diffusers = lazy_import("diffusers", "The diffusers reference scheduler", INSTALL)
    s = diffusers.DDPMScheduler(
        num_train_timesteps=cfg.num_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule={v: k for k, v in BETA_SCHEDULES.items()}[cfg.schedule], variance_type=cfg.variance_type,
        clip_sample=cfg.clip_denoised)
    if float64_betas is not None:
        s.betas = torch.from_numpy(np.asarray(float64_betas, np.float64))
        s.alphas = 1.0 - s.betas
        s.alphas_cumprod = torch.cumprod(s.alphas, 0)
        s.one = torch.tensor(1.0, dtype=torch.float64)
    return s


def make_scheduler(scheduler_cfg: dict[str, Any]):
    """A DDPMScheduler from a scheduler config (legacy 'timesteps' key mapped as diffusers' loader does not)."""
    diffusers = lazy_import("diffusers", "The diffusers reference sampler", INSTALL)
    cfg = {k: v for k, v in scheduler_cfg.items() if not k.startswith("_")}
    if "timesteps" in cfg and "num_train_timesteps" not in cfg:
        cfg["num_train_timesteps"] = cfg.pop("timesteps")
    return diffusers.DDPMScheduler.from_config(cfg)


@contextlib.contextmanager
def _injected_randn(module, noise: torch.Tensor):
    orig = module.randn_tensor

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        if tuple(shape) != tuple(noise.shape):
            raise ValueError(f"injected noise has shape {tuple(noise.shape)}, the scheduler asked for {tuple(shape)}")
        return noise.to(device=device or noise.device, dtype=dtype or noise.dtype)

    module.randn_tensor = fake
    try:
        yield
    finally:
        module.randn_tensor = orig


def step_with_noise(scheduler, eps: torch.Tensor, t: int, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """``scheduler.step(eps, t, x)`` with z = ``noise`` instead of a fresh ``randn_tensor`` draw; returns x_{t-1}.

    Uses ``variance_noise=`` where the installed diffusers has it, else swaps the module's ``randn_tensor``.
    """
    if noise is None:
        noise = torch.zeros_like(x)
    if "variance_noise" in inspect.signature(scheduler.step).parameters:
        return scheduler.step(eps, t, x, variance_noise=noise).prev_sample
    module = inspect.getmodule(type(scheduler))
    with _injected_randn(module, noise):
        return scheduler.step(eps, t, x).prev_sample


@torch.no_grad()
def sample_diffusers(model: torch.nn.Module, scheduler, timesteps: np.ndarray, shape, seed: int, indices,
                     eps_hook=None) -> np.ndarray:
    """diffusers' DDPM loop (``scheduler.step`` at ``timesteps``, ascending kept steps) with our counter-based noise.

    x_T and z come from ``runtime.rng`` exactly as the runtime draws them, so the result is comparable sample by
    sample. ``eps_hook(t, eps)`` sees every ε (for per-timestep error tables).
    """
    from ddpm_deploy.runtime import rng

    idx = np.asarray(indices, dtype=np.int64)
    shape = tuple(int(s) for s in shape)
    T = scheduler.config.num_train_timesteps
    ts = [int(v) for v in np.asarray(timesteps)[::-1]]
    if len(ts) == T:
        scheduler.set_timesteps(T)  # what DDPMPipeline does: T−1 … 0
    else:
        scheduler.set_timesteps(timesteps=ts)  # respaced: diffusers' custom timesteps (ᾱ-ratio β, like ours)
    x = torch.from_numpy(rng.normals(seed, idx, rng.INITIAL_STEP, shape))
    for t in scheduler.timesteps:
        t = int(t)
        eps = model(x, torch.full((len(idx),), t, dtype=torch.int32)).float()
        if eps_hook is not None:
            eps_hook(t, eps.numpy())
        z = torch.from_numpy(rng.normals(seed, idx, t, shape)) if t > 0 else None
        x = step_with_noise(scheduler, eps, t, x, z)
    return x.numpy()


# --- every scheduler: diffusers' own class driven along one of our plans -----------------------------------------

PREVIOUS_TIMESTEP_BUG = ("diffusers steps DDIM/DDPM to t − T // N, not to the next timestep called "
                         "(huggingface/diffusers #9261, #11347, #12633): it differs from the timestep list for "
                         "linspace spacing and for trailing when N does not divide T; ddpm-deploy follows the list")


def diffusers_agrees(plan, T: int) -> tuple[bool, str]:
    """Whether diffusers computes this plan as we do (False, with the reason, where diffusers is known wrong)."""
    if plan.scheduler != "DDIMScheduler" or len(plan) == T:
        return True, ""  # DDPM: sample_with_scheduler gives diffusers our list as custom timesteps (then it agrees)
    spacing = plan.options.get("timestep_spacing")
    if spacing == "leading" or (spacing == "trailing" and T % len(plan) == 0):
        return True, ""
    return False, PREVIOUS_TIMESTEP_BUG


def diffusers_scheduler(plan, cfg: DiffusionConfig):
    """diffusers' class of ``plan.scheduler`` with the plan's options and the model's forward process; returns
    (scheduler, step keyword arguments)."""
    diffusers = lazy_import("diffusers", "The diffusers reference scheduler", INSTALL)
    opts = dict(plan.options)
    step_kw = {}
    if "eta" in opts:
        step_kw["eta"] = opts.pop("eta")
    if "disable_corrector" in opts:
        opts["disable_corrector"] = list(opts["disable_corrector"])
    if opts.get("lambda_min_clipped", 0) is None:  # run.json's null: −∞, diffusers' default
        opts["lambda_min_clipped"] = -float("inf")
    cls = getattr(diffusers, plan.scheduler)
    s = cls(num_train_timesteps=cfg.num_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
            beta_schedule={v: k for k, v in BETA_SCHEDULES.items()}[cfg.schedule], **opts)
    return s, step_kw


@torch.no_grad()
def sample_with_scheduler(eps_fn, plan, cfg: DiffusionConfig, shape, seed: int, indices,
                          dtype=torch.float64) -> np.ndarray:
    """diffusers' own scheduler stepping along ``plan``'s options with x_T and every z from ``runtime.rng`` (as the
    runtime draws them: ``variance_noise``, or the DDPM step's ``randn_tensor``). ``eps_fn(x, t)`` on float32 NumPy
    arrays (a model or a dummy). ValueError if diffusers' timesteps are not the plan's."""
    from ddpm_deploy.runtime import rng

    idx = np.asarray(indices, dtype=np.int64)
    shape = tuple(int(s) for s in shape)
    s, step_kw = diffusers_scheduler(plan, cfg)
    if plan.scheduler == "DDPMScheduler" and plan.options.get("timestep_spacing") != "leading" and len(plan) != \
            cfg.num_timesteps:
        s.set_timesteps(timesteps=[int(t) for t in plan.timesteps])  # our respacing as diffusers' custom list
    else:
        s.set_timesteps(len(plan))
    ts = s.timesteps.numpy().astype(np.int64)
    if not np.array_equal(ts, plan.timesteps):
        raise ValueError(f"diffusers' timesteps {ts.tolist()} are not the plan's {plan.timesteps.tolist()}")
    x = torch.from_numpy(rng.normals(seed, idx, rng.INITIAL_STEP, shape)).to(dtype)
    for k, t in enumerate(s.timesteps):
        t = int(t)
        eps = torch.from_numpy(eps_fn(x.float().numpy(), np.full(len(idx), t, np.int32))).to(dtype)
        z = torch.from_numpy(rng.normals(seed, idx, int(plan.noise_ids[k]), shape)).to(dtype)
        if plan.scheduler == "DDPMScheduler":
            x = step_with_noise(s, eps, t, x, z if k + 1 < len(plan) else None)
        elif "variance_noise" in inspect.signature(s.step).parameters:
            x = s.step(eps, t, x, variance_noise=z, **step_kw).prev_sample
        else:
            x = s.step(eps, t, x, **step_kw).prev_sample
    return x.float().numpy()


@torch.no_grad()
def pipeline_with_noise(pipe, plan, seed: int, indices, **call) -> np.ndarray:
    """diffusers' own ``DDPMPipeline.__call__`` (its loop, its scheduler's ``step``, its output conversion) with x_T
    and every step's z taken from ``runtime.rng`` as our sampler draws them along ``plan``: the pipeline's and the
    scheduler's ``randn_tensor`` are swapped for the duration of the call. ``call``: the pipeline's keywords
    (``num_inference_steps`` must give the plan's timesteps: checked). Returns ``.images``."""
    from ddpm_deploy.runtime import rng

    idx = np.asarray(indices, dtype=np.int64)
    unet = pipe.unet.config
    shape = (unet.in_channels, unet.sample_size, unet.sample_size)
    draws = [rng.normals(seed, idx, rng.INITIAL_STEP, shape)]
    draws += [rng.normals(seed, idx, int(n), shape) for n, t in zip(plan.noise_ids, plan.timesteps) if t > 0]
    queue = [torch.from_numpy(d) for d in draws]

    def fake(shape_, generator=None, device=None, dtype=None, layout=None):
        if not queue:
            raise ValueError("the pipeline drew more noise than the plan has steps")
        z = queue.pop(0)
        if tuple(shape_) != tuple(z.shape):
            raise ValueError(f"injected noise has shape {tuple(z.shape)}, the pipeline asked for {tuple(shape_)}")
        return z.to(device=device or z.device, dtype=dtype or z.dtype)

    modules = [inspect.getmodule(type(pipe)), inspect.getmodule(type(pipe.scheduler))]
    origs = [m.randn_tensor for m in modules]
    for m in modules:
        m.randn_tensor = fake
    try:
        out = pipe(batch_size=len(idx), **call).images
    finally:
        for m, o in zip(modules, origs):
            m.randn_tensor = o
    ts = pipe.scheduler.timesteps.numpy().astype(np.int64)
    if not np.array_equal(ts, plan.timesteps) or queue:
        raise ValueError(f"the pipeline stepped along {ts.tolist()}, the plan along {plan.timesteps.tolist()} "
                         f"({len(queue)} draws left)")
    return np.asarray(out)
