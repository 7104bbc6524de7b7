"""How close a ``--diffusers-out`` folder is to our model, measured with diffusers' own code (README "diffusers, both
ways"; the tests in tests/parity/test_diffusers_out.py assert the same numbers against their tolerances)::

    python -m ddpm_deploy.verify.diffusers_out RUN_DIR [--cifar10-random] [--steps 5,50]

prints, as JSON: ``DDPMPipeline.from_pretrained(DIR)``'s UNet ε vs our ONNX (max |Δε| / max |ε| at t ∈ {0, 1, T/2,
T−1}), the round trip ``--diffusers-out`` → ``--from-diffusers`` (the same measure), and the pipeline's own loop
with our noise injected vs our sampler (max |Δ| of the [0, 1] images) at each step count.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ddpm_deploy.runtime.tolerances import Comparison, compare


def timesteps(T: int) -> tuple[int, ...]:
    return (0, 1, T // 2, T - 1)


def unet_eps(unet):
    """diffusers' ``unet(x, t).sample`` as a NumPy ε function."""
    @torch.no_grad()
    def eps(x, t):
        return unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    return eps


def eps_errors(got, want, shape, T: int, batch: int = 2, seed: int = 0) -> list[Comparison]:
    """ε functions ``got(x, t)`` vs ``want(x, t)`` (NumPy; a runner's ``eps``, or ``unet_eps``) at t ∈ {0, 1, T/2,
    T−1}, each on its own seeded x (metric rel_max: max |Δε| / max |ε|)."""
    g = np.random.default_rng(seed)
    out = []
    for t in timesteps(T):
        x = g.standard_normal((batch, *shape)).astype(np.float32)
        tt = np.full(batch, t, np.int32)
        out.append(compare(f"t={t}", got(x, tt), want(x, tt), 0.0, "rel_max"))
    return out


def measure(run_dir: Path, work: Path, steps=(5, 50), cifar10_random: bool = False) -> dict:
    from diffusers import DDPMPipeline

    from ddpm_deploy.export.cli import export_diffusers_from_run, export_onnx_from_run
    from ddpm_deploy.export.from_diffusers import export_diffusers
    from ddpm_deploy.runtime.api import Sampler
    from ddpm_deploy.runtime.backends.ort import OrtRunner

    from .diffusers_ref import pipeline_with_noise

    onnx, _ = export_onnx_from_run(run_dir, work / "export")
    export_diffusers_from_run(run_dir, work / "pipe")
    pipe = DDPMPipeline.from_pretrained(str(work / "pipe"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ours = OrtRunner(onnx, threads=1)
    T = ours.card.diffusion.num_timesteps
    rep: dict = {"run": str(run_dir), "timesteps": list(timesteps(T))}
    rep["pipeline_unet_eps_rel_max"] = [c.value for c in eps_errors(unet_eps(pipe.unet), ours.eps, ours.sample_shape,
                                                                    T, 3)]
    back, _ = export_diffusers(work / "pipe", work / "back")
    rep["round_trip_eps_rel_max"] = [c.value for c in eps_errors(OrtRunner(back, threads=1).eps, ours.eps,
                                                                  ours.sample_shape, T, seed=1)]
    rep["pipeline_loop_max_abs"] = {}
    with Sampler.from_pretrained(work / "pipe", threads=1, cache_dir=work / "cache") as s:
        for k in steps:
            got = s(batch_size=3, num_inference_steps=k, output_type="np", generator=11)
            want = pipeline_with_noise(pipe, s.plan(k), 11, range(3), num_inference_steps=k, output_type="np")
            rep["pipeline_loop_max_abs"][k] = float(np.abs(got - want).max())
    if cifar10_random:
        from ddpm_deploy.export.to_diffusers import write_pipeline

        from .models import preset_card, random_preset_model, random_preset_onnx

        model, _ = random_preset_model("ddpm-cifar10")
        write_pipeline(model.state_dict(), preset_card("ddpm-cifar10"), work / "cifar10-pipe")
        c_onnx, _ = random_preset_onnx("ddpm-cifar10", work / "cifar10.onnx")
        c_pipe = DDPMPipeline.from_pretrained(str(work / "cifar10-pipe"), local_files_only=True)
        rep["cifar10_random_eps_rel_max"] = [c.value for c in eps_errors(unet_eps(c_pipe.unet), OrtRunner(c_onnx).eps,
                                                                         (3, 32, 32), 1000)]
    return rep


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("::")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a ddpm-train run")
    ap.add_argument("--cifar10-random", action="store_true", help="also ddpm-cifar10 with seeded random weights")
    ap.add_argument("--steps", default="5,50", help="pipeline loop step counts (default 5,50)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="diffusers-out-") as work:
        rep = measure(a.run_dir, Path(work), [int(s) for s in a.steps.split(",")], a.cifar10_random)
    print(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()
