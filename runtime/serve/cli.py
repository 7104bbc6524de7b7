"""`ddpm-run serve` and `ddpm-run request`: commands of the runtime's `ddpm-run` group that need
no torch (registered on ``runtime.cli.main``; the console script's module, ``verify/cli.py``, imports this one)."""

from __future__ import annotations

import platform
import signal
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ..cli import CTX, main
from ..clitools import clean_errors, latest_run, setup_logging
from ..errors import ConfigError


@main.command(context_settings=CTX)
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A model repository from ddpm-export --triton-repo. Default: one written to a temporary folder "
                   "from --onnx / --engine.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX model to serve (without --repo). Default: runs/latest/export/model.onnx.")
@click.option("--engine", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT plan (+ sidecar) to serve on the GPU (without --repo).")
@click.option("--http-port", type=int, default=8000, help="HTTP/REST port (0: a free one).")
@click.option("--grpc-port", type=int, default=8001, help="gRPC port (0: a free one).")
@click.option("--metrics-port", type=int, default=8002, help="Prometheus metrics port (0: a free one).")
@click.option("--host", default="127.0.0.1", help="Address the server listens on (0.0.0.0: every interface).")
@click.option("--instances", type=int, default=1, help="Model instances (without --repo).")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Instance kind (without --repo). Default: gpu for --engine, else cpu.")
@click.option("--max-batch", type=int, default=None,
              help="Dynamic batching's largest batch (without --repo). Default: the plan's profile max, else 16.")
@click.option("--threads", type=int, default=0, help="ONNX Runtime threads per instance (0: cores / instances).")
@click.option("--ready-timeout", type=float, default=300.0, help="Seconds to wait for the model to load.")
@click.option("--scheduler", default=None, metavar="NAME|JSON",
              help="The repository's default scheduler for requests without one (without --repo): ddpm (default), "
                   "ddim, dpmsolver++, sde-dpmsolver++, unipc, JSON {\"scheduler\": NAME, \"options\": {...}}, or a "
                   "diffusers scheduler_config.json (its content goes into the repository).")
@click.option("--steps", type=int, default=None,
              help="The repository's default ε calls for requests without steps (default: T for ddpm, else 20).")
@click.option("-v", "--verbose", count=True, help="More logging.")
@clean_errors
def serve(repo, onnx_path, engine, http_port, grpc_port, metrics_port, host, instances, kind, max_batch, threads,
          ready_timeout, scheduler, steps, verbose):
    """Serve the model with Triton Inference Server until SIGINT or SIGTERM.

    \b
      ddpm-run serve --onnx model.onnx --instances 2      writes a repository, starts tritonserver
      ddpm-run serve --repo triton-repo                   a repository from ddpm-export --triton-repo

    One request = one image: inputs seed UINT64 [1], index INT64 [1], optional steps INT32 [1] and scheduler UINT8
    [1024] (a name or JSON, zero-padded UTF-8: `ddpm-run request --scheduler`); output image UINT8 [H, W, C]. The
    image equals `ddpm-run sample` for the same seed, index, scheduler and steps, bit for bit; requests of different
    schedulers and step counts share the model's ε calls.
    """
    setup_logging(verbose)
    from .repository import RepoSettings, write_repository
    from .server import TritonServer

    tmp = None
    if repo is None:
        if onnx_path is not None and engine is not None:
            raise ConfigError("give either --onnx or --engine, not both")
        model = Path(engine or onnx_path or latest_run() / "export" / "model.onnx")
        tmp = tempfile.TemporaryDirectory(prefix="ddpm-repo-")
        if scheduler is not None and not scheduler.lstrip().startswith("{") and Path(scheduler).is_file():
            import json

            from ..sampling.config import read_config_file

            scheduler = json.dumps(read_config_file(scheduler))  # the repository carries the config, not a path
        repo = write_repository(model, tmp.name, RepoSettings(
            instances=instances, kind=kind or ("gpu" if engine else "cpu"), max_batch=max_batch, threads=threads,
            default_scheduler=scheduler, default_steps=steps))
    elif scheduler is not None or steps is not None:
        raise ConfigError("--scheduler/--steps set the defaults of a repository ddpm-run serve writes; a --repo keeps "
                          "its own (ddpm-export --triton-repo)")
    ports = [p or None for p in (http_port, grpc_port, metrics_port)]
    server = TritonServer(repo, *ports, host=host)
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start(timeout=ready_timeout)
        click.echo(f"serving model ddpm from {repo}: HTTP {server.http_url}, gRPC {server.grpc_url}, "
                   f"metrics {server.host}:{server.metrics_port} (tritonserver pid {server.proc.pid}); "
                   f"Ctrl-C stops it", err=True)
        while stop["signal"] is None:
            if server.proc.poll() is not None:
                raise ConfigError(f"tritonserver exited with status {server.proc.returncode}:\n{server.log_tail()}")
            time.sleep(0.2)
        click.echo(f"stopping tritonserver ({signal.Signals(stop['signal']).name})", err=True)
    finally:
        rc = server.stop()
        for s, h in old.items():
            signal.signal(s, h)
        if tmp is not None:
            tmp.cleanup()
    click.echo(f"tritonserver stopped (exit status {rc})", err=True)


@main.command(context_settings=CTX)
@click.option("--url", default="127.0.0.1:8000",
              help="Server address: host:port, http://host:port or grpc://host:port.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default=None,
              help="Default: from the URL's scheme, else http.")
@click.option("--seed", type=int, default=0, help="Seed.")
@click.option("--index", "start_index", type=int, default=0, help="Index of the first image.")
@click.option("--num", "-n", type=int, default=1, help="Images: indices INDEX … INDEX+NUM-1, one request each.")
@click.option("--steps", type=int, default=None, help="ε calls per image. Default: the server's.")
@click.option("--scheduler", default=None, metavar="NAME|JSON",
              help="ddpm, ddim, dpmsolver++, sde-dpmsolver++, unipc, or JSON ({\"scheduler\": \"ddim\", \"options\": "
                   "{\"eta\": 0.5}} or a diffusers scheduler config). Default: the server's.")
@click.option("--concurrency", "-c", type=int, default=4, help="Requests in flight at once.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("served"),
              help="Output directory (grid.png, images/, samples.npz, run.json).")
@click.option("--no-pngs", is_flag=True, help="Skip images/NNNNNN.png.")
@click.option("--overwrite", is_flag=True, help="Replace the samples already in --out (otherwise refused).")
@clean_errors
def request(url, protocol, seed, start_index, num, steps, scheduler, concurrency, out, no_pngs, overwrite):
    """Fetch images from a served model (tritonclient) and write the usual sample outputs."""
    from .client import TritonImages

    if num < 1 or start_index < 0 or seed < 0:
        raise ConfigError(f"--num must be >= 1, --index and --seed >= 0; found {num}, {start_index}, {seed}")
    from ..output import SampleDir

    held = SampleDir(out).existing() if out.is_dir() else []
    if held and not overwrite:
        raise ConfigError(f"{out} already holds samples ({', '.join(held)}); replace them with --overwrite or choose "
                          f"another --out")
    with TritonImages(url, protocol) as client:
        params = client.parameters()
        got = client.fetch(seed, range(start_index, start_index + num), steps=steps, concurrency=concurrency,
                           scheduler=scheduler)
    h, w, c = got.images.shape[1:]
    folder = SampleDir(out).open()  # the folder lock: no sampling job writes there meanwhile
    try:
        held = folder.existing()
        if held and not overwrite:
            raise ConfigError(f"{out} already holds samples ({', '.join(held)}); replace them with --overwrite or "
                              f"choose another --out")
        if held:
            folder.remove_outputs()
        _write_served(out, num, c, h, w, no_pngs, got, params, client, seed, start_index, steps, concurrency,
                      scheduler)
    finally:
        folder.close(keep=True)
    lat = np.asarray(got.latencies) * 1e3
    click.echo(f"fetched {num} images from {client.protocol}://{client.url} in {got.seconds:.1f}s "
               f"({num / got.seconds:.2f} images/s, p50 {np.percentile(lat, 50):.0f} ms); wrote {out}")


def _write_served(out, num, c, h, w, no_pngs, got, params, client, seed, start_index, steps, concurrency,
                  scheduler=None) -> None:
    from ..contract import RunInfo
    from ..output import SampleWriter
    from .client import diffusion_of

    writer = SampleWriter(out, num, (c, h, w), write_pngs=not no_pngs)
    writer.add_uint8(got.images, range(start_index, start_index + num))
    lat = np.asarray(got.latencies) * 1e3
    T = int(params.get("num_timesteps") or 0)
    plan = _served_plan(params, scheduler, steps)
    writer.close(RunInfo(
        seed=seed, num=num, batch=1, start_index=start_index,
        steps=len(plan) if plan else int(steps or params.get("default_steps") or T), num_timesteps=T,
        scheduler=plan.describe() if plan else None,
        backend=f"triton-{client.protocol}", runner="tritonclient", loop="served", precision=params.get("precision", "?"),
        model=f"{client.protocol}://{client.url}/{params.get('artifact', '')}", diffusion=diffusion_of(params),
        total_seconds=got.seconds, images_per_second=num / got.seconds,
        timings={"requests": num, "concurrency": concurrency, "latency_ms_p50": float(np.percentile(lat, 50)),
                 "latency_ms_p99": float(np.percentile(lat, 99))},
        host={"machine": platform.machine(), "python": platform.python_version()},
        model_sha256=params.get("model_sha256") or None))


def _served_plan(params: dict, scheduler, steps):
    """The plan the server sampled along (computed here from its parameters), for run.json; None if unknown."""
    import json

    from ..errors import DDPMError
    from ..sampling.config import plan_for
    from ..schedule import DiffusionConfig
    from .handler import parse_scheduler

    try:
        diffusion = DiffusionConfig.from_dict(json.loads(params["diffusion"]))
        source, options = parse_scheduler(scheduler if scheduler is not None else params.get("default_scheduler") or None)
        default_steps = int(params["default_steps"]) if params.get("default_steps") else None
        return plan_for(diffusion, source, steps if steps is not None else default_steps, **options)
    except (KeyError, ValueError, TypeError, DDPMError):
        return None
