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


INTERFACE = """\b
    Two models, two ways to batch (the repository's --triton-batching; --batching here):
      ddpm_stream  step-level batching (written with --triton-batching step, the default): its loop admits
                   requests into free slots at every ε call, so a short request is not held by long ones and
                   a new one starts at the next step. Decoupled: reached by gRPC streaming (tritonclient
                   start_stream/async_stream_infer) and HTTP POST /v2/models/ddpm_stream/generate (JSON
                   {"seed": 5, "index": 3, "steps": 50}; generate_stream for several indices), not by the plain
                   infer endpoint. Inputs seed UINT64 [k], index INT64 [k], steps INT32 [1], scheduler UINT8 [n]
                   (UTF-8); one response per image: image UINT8 [1, H, W, C], index INT64 [1]. Past its wait
                   queue (--queue-size) a request is refused at once: "the server is busy" (gRPC UNAVAILABLE);
                   a cancelled request frees its slots at the next step. `ddpm-run request` uses it.
      ddpm         request-level batching (Triton's dynamic batcher; always there): for clients of the plain
                   HTTP/gRPC infer endpoint (POST /v2/models/ddpm/infer).
    Which when: ddpm_stream where requests differ in steps or arrive while others sample (latency); ddpm for
    plain infer clients and for uniform batch jobs (docs/scaling.md, "Step-level batching").
    `ddpm` is an ensemble over `ddpm_sampler`, the Python-backend model that samples.
    Its inputs, as its metadata shows them (-1: the request's batch k, 1 <= k <= the max batch):
      seed       UINT64 [-1, 1]     required
      index      INT64  [-1, 1]     required, 0 <= index <= 4294967295
      steps      INT32  [-1, 1]     optional: ε calls, 2..T for ddpm, 1..T for the others (default the
                                    repository's, else T for ddpm and 20 for the others)
      scheduler  UINT8  [-1, 1024]  optional: a name (ddpm, ddim, dpmsolver++, sde-dpmsolver++, unipc) or JSON,
                                    zero-padded UTF-8 (`ddpm-run request --scheduler` encodes it)
    Output: image UINT8 [-1, H, W, C]. One image: send shape [1, 1]; a batch of k indices: index [k, 1] with
    seed [k, 1] (and steps [k, 1], scheduler [k, 1024] when given). A bad input (a missing or unknown
    input, a wrong dtype or shape, index < 0, steps out of range, an unknown scheduler) is the client's error:
    HTTP 400 / gRPC INVALID_ARGUMENT, counted in nv_inference_request_failure; the server keeps serving."""


@main.command(context_settings=CTX)
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A model repository from ddpm-export --triton-repo (never modified: options given here are "
                   "applied to a temporary copy). Default: one written to a temporary folder from --onnx / --engine.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX model to serve (without --repo). Default: runs/latest/export/model.onnx.")
@click.option("--engine", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT plan (+ sidecar) to serve on the GPU (without --repo).")
@click.option("--http-port", type=int, default=8000, help="HTTP/REST port (0: a free one).")
@click.option("--grpc-port", type=int, default=8001, help="gRPC port (0: a free one).")
@click.option("--metrics-port", type=int, default=8002,
              help="Prometheus metrics port (0: a free one). The three ports must differ and be free; checked "
                   "before anything starts.")
@click.option("--host", default="127.0.0.1", help="Address the server listens on (0.0.0.0: every interface).")
@click.option("--instances", type=int, default=None, help="Model instances. Default: 1, or the --repo's.")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Instance kind. Default: gpu for --engine, else cpu, or the --repo's.")
@click.option("--max-batch", type=int, default=None,
              help="Dynamic batching's largest batch. Default: the plan's profile max, else 16, or the --repo's.")
@click.option("--threads", type=int, default=None,
              help="ONNX Runtime threads per instance (0: cores / instances). Default: 0, or the --repo's.")
@click.option("--ready-timeout", type=float, default=300.0, help="Seconds to wait for the model to load.")
@click.option("--scheduler", default=None, metavar="NAME|JSON",
              help="The default scheduler for requests without one: ddpm (default), ddim, dpmsolver++, "
                   "sde-dpmsolver++, unipc, JSON {\"scheduler\": NAME, \"options\": {...}}, or a diffusers "
                   "scheduler_config.json (its content goes into the repository). Default: the --repo's.")
@click.option("--steps", type=int, default=None,
              help="The default ε calls for requests without steps (default: T for ddpm, else 20, or the --repo's).")
@click.option("--batching", type=click.Choice(["step", "request"]), default=None,
              help="step: serve ddpm_stream (step-level batching) beside ddpm; request: ddpm only. Default: step, or "
                   "the --repo's (a repository written with --triton-batching request has no ddpm_stream).")
@click.option("--queue-size", type=int, default=None,
              help="Step-level: requests that may wait for a slot before the server answers 'busy'. Default: 64, or "
                   "the --repo's.")
@click.option("--precision", default=None, metavar="PRECISION|BANDS",
              help="With --onnx on the CPU: OpenVINO bf16, int8, int8-bf16, auto, or precision bands such as "
                   "bf16:0-99,int8-bf16:100-999 (as ddpm-run sample's --precision/--precision-bands; int8 needs the "
                   "model.int8.xml beside the ONNX). Default: fp32 on ONNX Runtime. A --repo serves the precision "
                   "it was written with (ddpm-export --triton-precision).")
@click.option("-v", "--verbose", count=True, help="More logging.")
@clean_errors
def serve(repo, onnx_path, engine, http_port, grpc_port, metrics_port, host, instances, kind, max_batch, threads,
          ready_timeout, scheduler, steps, batching, queue_size, precision, verbose):
    """Serve the model with Triton Inference Server until SIGINT, SIGTERM or SIGHUP.

    \b
      ddpm-run serve --onnx model.onnx --instances 2      writes a repository, starts tritonserver
      ddpm-run serve --repo triton-repo                   a repository from ddpm-export --triton-repo
      ddpm-run serve --repo triton-repo --instances 2 --max-batch 8 --steps 50    the same with other settings

    The image of (seed, index) equals `ddpm-run sample` for the same seed, index, scheduler and steps, bit for
    bit; requests of different schedulers and step counts share the model's ε calls.

    {interface}

    The server never outlives this command: SIGINT/SIGTERM/SIGHUP stop it cleanly; if this command is killed
    (SIGKILL included), tritonserver gets SIGTERM from the kernel and a watchdog ends its processes and removes
    its temporary folders.
    """
    setup_logging(verbose)
    from .repository import RepoSettings, serving_copy, write_repository
    from .server import PORT_FLAGS, check_ports

    check_ports(host, dict(zip(PORT_FLAGS, (http_port, grpc_port, metrics_port))))  # before anything starts
    for flag, value, low in (("--instances", instances, 1), ("--max-batch", max_batch, 1), ("--threads", threads, 0),
                             ("--steps", steps, 1), ("--queue-size", queue_size, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be >= {low}, found {value}")
    if not ready_timeout > 0:
        raise ConfigError(f"--ready-timeout must be > 0 seconds, found {ready_timeout}")
    if scheduler is not None and not scheduler.lstrip().startswith("{") and Path(scheduler).is_file():
        import json

        from ..sampling.config import read_config_file

        scheduler = json.dumps(read_config_file(scheduler))  # the repository carries the config, not a path
    tmp = tempfile.mkdtemp(prefix="ddpm-repo-")
    try:
        if repo is None:
            if onnx_path is not None and engine is not None:
                raise ConfigError("give either --onnx or --engine, not both")
            model = Path(engine or onnx_path or latest_run() / "export" / "model.onnx")
            from .repository import DEFAULT_BATCHING, DEFAULT_QUEUE

            if queue_size is not None and batching == "request":
                raise ConfigError("--queue-size bounds the step-level model's wait queue; it needs --batching step")
            served = write_repository(model, tmp, RepoSettings(
                instances=instances or 1, kind=kind or ("gpu" if engine else "cpu"), max_batch=max_batch,
                threads=threads or 0, default_scheduler=scheduler, default_steps=steps,
                batching=batching or DEFAULT_BATCHING, queue_size=DEFAULT_QUEUE if queue_size is None else queue_size,
                precision=precision or "fp32"), command="ddpm-run serve")
        else:
            if onnx_path is not None or engine is not None:
                raise ConfigError("--repo serves the model of the repository; --onnx/--engine write a new one: give "
                                  "one of them")
            if precision is not None:
                raise ConfigError(f"--precision applies to --onnx; --repo {repo} serves the precision it was written "
                                  f"with (ddpm-export --triton-precision … --triton-repo {repo} --overwrite)")
            from .repository import MODEL_NAME

            if not (repo / MODEL_NAME / "config.pbtxt").is_file():
                raise ConfigError(f"--repo {repo}: expected a Triton model repository with {MODEL_NAME}/config.pbtxt, "
                                  f"found {'no folder' if not repo.exists() else 'none'}; write one with ddpm-export "
                                  f"--triton-repo {repo}")
            given = (instances, max_batch, kind, threads, steps, scheduler, batching, queue_size)
            served = serving_copy(repo, Path(tmp) / "repo", instances, max_batch, kind, threads, steps, scheduler,
                                  batching, queue_size) if any(v is not None for v in given) else repo
        _serve(served, repo or served, tmp, http_port, grpc_port, metrics_port, host, ready_timeout)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


serve.help = serve.help.replace("{interface}", INTERFACE.replace("\\b\n    ", "").strip())


def _serve(served, shown, tmp, http_port, grpc_port, metrics_port, host, ready_timeout) -> None:
    from .server import TritonServer

    ports = [p or None for p in (http_port, grpc_port, metrics_port)]
    server = TritonServer(served, *ports, host=host, remove_on_exit=(tmp,))
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        server.start(timeout=ready_timeout)
        stream = f" (and {server.models[1]}: step-level batching)" if len(server.models) > 1 else ""
        click.echo(f"serving model {server.models[0]}{stream} from {shown}: HTTP {server.http_url}, gRPC {server.grpc_url}, "
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
@click.option("--batching", type=click.Choice(["step", "request"]), default=None,
              help="step: the step-level model ddpm_stream (gRPC: a stream; HTTP: the generate endpoint); request: "
                   "ddpm through the plain infer endpoint. Default: step if the server serves ddpm_stream.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("served"),
              help="Output directory (grid.png, images/, samples.npz, run.json).")
@click.option("--no-pngs", is_flag=True, help="Skip images/NNNNNN.png.")
@click.option("--overwrite", is_flag=True, help="Replace the samples already in --out (otherwise refused).")
@clean_errors
def request(url, protocol, seed, start_index, num, steps, scheduler, concurrency, batching, out, no_pngs, overwrite):
    """Fetch images from a served model (tritonclient) and write the usual sample outputs.

    One request per image, NUM requests for indices INDEX … INDEX+NUM-1, CONCURRENCY at a time. To a server that
    serves ddpm_stream (step-level batching, the default) each goes over a gRPC stream or HTTP's generate
    endpoint; to ddpm (--batching request, or a repository without ddpm_stream) through the plain infer endpoint
    (seed UINT64 [1, 1], index INT64 [1, 1], steps INT32 [1, 1] / scheduler UINT8 [1, 1024] when given). See
    `ddpm-run serve --help` for the models' interfaces and which to use when. A request the server refuses (steps out of range, an
    unknown scheduler) ends the command with one error line and writes nothing.
    """
    from .client import TritonImages

    from .client import encode_scheduler, split_url
    from .handler import MAX_INDEX

    if num < 1 or start_index < 0 or seed < 0:
        raise ConfigError(f"--num must be >= 1, --index and --seed >= 0; found {num}, {start_index}, {seed}")
    if seed >= 2**64:
        raise ConfigError(f"--seed must be below 2**64 (the model's seed is UINT64), found {seed}")
    if start_index + num - 1 > MAX_INDEX:
        raise ConfigError(f"--index + --num - 1 must be <= {MAX_INDEX} (sample indices are 32-bit), found "
                          f"{start_index + num - 1}")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be >= 1, found {steps}")
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, found {concurrency}")
    if scheduler is not None:
        encode_scheduler(scheduler)  # too long, NUL: refused before any request
    address, _ = split_url(url, protocol)
    host, sep, port = address.rpartition(":")
    if not sep or not host or "/" in address or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--url {url}: expected host:port, http://host:port or grpc://host:port (port 1-65535)")
    from ..output import SampleDir

    held = SampleDir(out).existing() if out.is_dir() else []
    if held and not overwrite:
        raise ConfigError(f"{out} already holds samples ({', '.join(held)}); replace them with --overwrite or choose "
                          f"another --out")
    with TritonImages(url, protocol, batching=batching) as client:
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
        timings={"requests": num, "concurrency": concurrency, "batching": client.batching, "latency_ms_p50": float(np.percentile(lat, 50)),
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
