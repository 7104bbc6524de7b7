"""The Python API: ``from ddpm_deploy import Sampler`` — images from a model in three lines, no torch.

    with Sampler.from_onnx("model.onnx", threads=2, scheduler="dpmsolver++") as sampler:
        images = sampler(16, seed=0, steps=20)        # uint8 [16, H, W, C]

    with Sampler.from_pretrained("ddpm-digits") as sampler:      # a run, an export, an ONNX, a plan, a diffusers folder
        images = sampler(batch_size=4, num_inference_steps=50, output_type="np", generator=0)

A ``Sampler`` owns one runner (ONNX Runtime CPU/CUDA, OpenVINO fp32/bf16/int8, TensorRT), opened as ``ddpm-run
sample`` opens it (``backends.banded.open_precision``: ``resolve_model`` + ``open_runner``, or bands), and drives it with the same loop
(``sampling.open_loop``), so image i of seed s is the one the CLI, the Triton server and every shard produce. (Its
loop implements ``sampling.base.Loop``.)

Errors are ``DDPMError`` subclasses (``runtime.errors``) whose messages name this API's arguments (``steps``,
``batch=8``), not the CLI's flags: ``ConfigError`` (an argument), ``ArtifactError`` (a file), ``SamplingError``
(non-finite ε), ``OutOfMemoryError`` (a batch that did not fit; the message says which batch to try),
``SamplerClosedError`` (used after ``close()``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .backends.base import Runner, open_runner
from .errors import ArtifactError, ConfigError, SamplerClosedError, invalid, out_of_memory
from .imageio import to_uint8, to_unit
from .rng import MAX_SEED, MAX_WORD
from .sampling.config import SCHEDULERS, plan_for, scheduler_config
from .sampling.open import open_loop

__all__ = ["Sampler"]

DIFFUSERS_SOURCES = ("diffusers", "diffusers-onnx")  # ModelCard.source of models whose card holds their scheduler
OUTPUT_TYPES = ("uint8", "np", "pil")


class Sampler:
    """Sample uint8 images from a DDPM ε model; a context manager (``close()`` at the end of the ``with`` block;
    a closed sampler raises ``SamplerClosedError``). Build it with ``from_pretrained`` (any artifact, or a diffusers
    folder), ``from_onnx``, ``from_engine`` or ``from_run``; call it: ``sampler(num, seed=0, start_index=0,
    steps=None, batch=None, pil=False, progress=None)``, or with diffusers' keywords: ``sampler(batch_size=4,
    num_inference_steps=50, output_type="np", generator=0)`` (see ``__call__`` for where the meanings differ).

    ``scheduler``: "ddpm" (default), "ddim", "dpmsolver++", "sde-dpmsolver++", "unipc", a diffusers class name, a
    ``scheduler_config.json`` path or dict, or a config object (``sampling.config.make_scheduler``); options as
    keywords of the call (``sampler(8, scheduler="ddim", eta=0.5)``) or in ``scheduler_options``."""

    def __init__(self, runner: Runner, batch: int = 16, steps: int | None = None, cuda_graph: bool = True,
                 scheduler=None, scheduler_options: dict | None = None):
        if runner.card is None:
            runner.close()
            raise ArtifactError(f"{runner.path}: has no ddpm-deploy metadata (ddpm_deploy.config); export it with "
                                f"ddpm-export")
        self._closed = False
        if not _is_int(batch) or batch < 1:
            runner.close()
            raise ConfigError(invalid("batch", batch, "must be an integer >= 1 (images per model call)"))
        self.runner, self.batch, self.steps, self.cuda_graph = runner, int(batch), steps, cuda_graph
        self.card = runner.card
        c, s = self.card.data.channels, self.card.data.image_size
        self.sample_shape = (c, s, s)
        try:
            self.scheduler = scheduler_config(scheduler, self.card.diffusion, **(scheduler_options or {}))
        except BaseException:
            runner.close()
            raise
        self._loop = None

    # --- constructors ---------------------------------------------------------------------------------------

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, device: str = "cpu", threads: int = 0, batch: int = 16,
                  steps: int | None = None, device_id: int = 0, scheduler=None, backend: str | None = None,
                  precision: str = "fp32", **scheduler_options) -> "Sampler":
        """An ONNX file from ddpm-export (or an OpenVINO IR ``.xml``); the same backends as ``ddpm-run sample``:

        - ``device`` 'cpu': ONNX Runtime CPU (``threads`` intra-op threads, 0: ONNX Runtime's default, all cores);
        - ``device`` 'cuda': ONNX Runtime CUDA + the GPU device loop;
        - ``backend="openvino"`` (or a ``.xml`` path): OpenVINO on the CPU, ``precision`` "fp32", "bf16" (OpenVINO's
          precision hint; emulated and slow on CPUs without AVX512_BF16/AMX) or "int8" (the NNCF int8 model
          ``model.int8.xml`` beside the ONNX, which ``ddpm-export --onnx model.onnx --int8`` writes).

        ``precision`` other than "fp32" needs OpenVINO (ONNX Runtime runs the precision stored in the file). "auto":
        the fastest precision that keeps sample quality on this CPU (``ddpm-run sample --precision auto``).
        A precision per timestep band, as ``ddpm-run sample --precision-bands``: ``precision="bf16:0-99,
        int8-bf16:100-999"`` (OpenVINO on the CPU; every timestep 0…T−1 in one band; each image's ε from the model
        of its timestep's band, whatever its batch-mates)."""
        from .backends.banded import open_precision

        runner, _ = open_precision(path, device, backend, precision, threads=threads, device_id=device_id)
        return cls(runner, batch=batch, steps=steps, scheduler=scheduler, scheduler_options=scheduler_options)

    @classmethod
    def from_engine(cls, plan: str | os.PathLike, batch: int = 16, steps: int | None = None,
                    device_id: int = 0, scheduler=None, **scheduler_options) -> "Sampler":
        """A TensorRT / TensorRT-RTX plan with its model.plan.json sidecar (the GPU device loop)."""
        return cls(open_runner(plan, "cuda", device_id=device_id), batch=batch, steps=steps, scheduler=scheduler,
                   scheduler_options=scheduler_options)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str = "cpu", threads: int = 0, batch: int = 16,
                 steps: int | None = None, scheduler=None, backend: str | None = None, precision: str = "fp32",
                 **scheduler_options) -> "Sampler":
        """A ddpm-train run dir exported with ddpm-export (RUN_DIR/export/model.onnx; ``backend``/``precision`` as in
        ``from_onnx``: precision="int8" opens RUN_DIR/export/model.int8.xml)."""
        path = Path(run_dir) / "export" / "model.onnx"
        if not path.is_file():
            raise ArtifactError(f"{run_dir}: expected {path}, found none; export the run with ddpm-export {run_dir}")
        return cls.from_onnx(path, device=device, threads=threads, batch=batch, steps=steps, scheduler=scheduler,
                             backend=backend, precision=precision, **scheduler_options)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu", threads: int = 0, batch: int = 16,
                        steps: int | None = None, scheduler=None, backend: str | None = None,
                        precision: str = "fp32", device_id: int = 0, cache_dir: str | os.PathLike | None = None,
                        **scheduler_options) -> "Sampler":
        """One entry for every artifact, as diffusers' ``DDPMPipeline.from_pretrained(PATH)`` (files on disk only,
        no hub download):

        - a ddpm-train run dir (``RUN/export/model.onnx``), an export folder (its ``model.onnx``), an ONNX file
          (ours, or one exported by other tools with diffusers' I/O names and a ``scheduler_config.json`` beside
          it), an OpenVINO ``.xml``, or a TensorRT plan (``from_engine``);
        - a diffusers folder (``DDPMPipeline.save_pretrained``, ``ddpm-export RUN --diffusers-out``, or a flat
          ``UNet2DModel`` folder such as google/ddpm-cifar10-32): exported to ONNX on first use into a cache
          (``cache_dir``, default ``$DDPM_DIFFUSERS_CACHE`` or ``~/.cache/ddpm-deploy/diffusers-onnx``) by
          ``ddpm-export --from-diffusers`` in a child process — the only step that needs torch and diffusers; later
          calls open the cached ONNX with the base install.

        A diffusers model samples with its own ``scheduler_config.json`` unless ``scheduler`` is given (the
        scheduler swap: ``Sampler.from_pretrained(DIR, scheduler="ddim")`` where diffusers writes
        ``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``); other options as in ``from_onnx``."""
        from .pretrained import diffusers_onnx, resolve

        kind, p = resolve(path)
        if kind == "plan":
            return cls.from_engine(p, batch=batch, steps=steps, device_id=device_id, scheduler=scheduler,
                                   **scheduler_options)
        if kind == "run":
            return cls.from_run(p, device=device, threads=threads, batch=batch, steps=steps, scheduler=scheduler,
                                backend=backend, precision=precision, **scheduler_options)
        if kind == "diffusers":
            p = diffusers_onnx(p, cache_dir)
        sampler = cls.from_onnx(p, device=device, threads=threads, batch=batch, steps=steps, device_id=device_id,
                                scheduler=scheduler, backend=backend, precision=precision, **scheduler_options)
        own = sampler.card.architecture.get("scheduler_config") if sampler.card.source in DIFFUSERS_SOURCES else None
        if scheduler is None and isinstance(own, dict) and own.get("_class_name") in SCHEDULERS:
            try:  # the model's own scheduler, as its pipeline samples (e.g. diffusers' "leading" respacing)
                sampler.scheduler = scheduler_config(own, sampler.card.diffusion, **scheduler_options)
            except BaseException:
                sampler.close()
                raise
        return sampler

    # --- sampling -------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SamplerClosedError(f"this Sampler ({self.runner.name}, {self.runner.path}) is closed (close() was "
                                     f"called, or its with block ended); open a new one, e.g. Sampler.from_onnx(...)")

    @property
    def closed(self) -> bool:
        return self._closed

    def _loop_for(self, batch: int):
        """The one loop of this sampler's runner (re-opened only for a larger batch)."""
        if self._loop is None or self._loop.capacity < batch:
            if self._loop is not None:
                self._loop.close()
            self._loop = open_loop(self.runner, self.sample_shape, max_batch=batch, cuda_graph=self.cuda_graph)
        return self._loop

    def plan(self, steps: int | None = None, scheduler=None, **options):
        """The StepPlan a call with these arguments samples along (``plan.describe()`` says what it is)."""
        steps = self.steps if steps is None else steps
        base = self.scheduler if scheduler is None else scheduler
        return plan_for(self.card.diffusion, base, steps, **options)

    def __call__(self, num: int | None = None, seed: int | None = None, start_index: int = 0,
                 steps: int | None = None, batch: int | None = None, pil: bool = False,
                 callback: Callable[[int, int], None] | None = None, scheduler=None,
                 progress: bool | Callable[[int, int], None] | None = None, *, batch_size: int | None = None,
                 num_inference_steps: int | None = None, output_type: str | None = None, generator=None,
                 **options):
        """Images ``start_index … start_index + num − 1`` of ``seed``: uint8 [num, H, W, C] (``pil=True``: a list
        of PIL images). ``steps``: ε calls per image (default: the sampler's, else all T for DDPM and 20 for the
        fast schedulers); ``scheduler`` and ``options`` (e.g. ``eta=0.5``, ``solver_order=3``): this call's
        scheduler, else the sampler's; ``batch``: images per model call (default: the sampler's).

        diffusers' keywords, with diffusers' meanings (``sampler(batch_size=4, num_inference_steps=50,
        output_type="np", generator=0)`` reads as ``pipe(...)`` does):

        - ``batch_size``: the number of images (our ``num``; default 1 as in diffusers). Not our ``batch``, which
          is how many images go through one model call;
        - ``num_inference_steps``: ε calls per image (our ``steps``);
        - ``output_type``: "np" (float32 [num, H, W, C] in [0, 1], diffusers' array), "pil" (a list of PIL images)
          or "uint8" (uint8 [num, H, W, C], the default; diffusers' default is "pil"). "pt" and "latent" are torch
          outputs: the runtime has no torch;
        - ``generator``: an integer seed in place of a ``torch.Generator``. **The meaning differs**: diffusers
          draws x_T and every step's noise from the generator's stream in order, so image i depends on the batch it
          was drawn in; our noise is keyed by (seed, image index) (Philox, counter-based), so image i of a seed is
          the same whatever ``batch_size``, ``batch``, backend or shard produced it, and a torch generator (its
          state) cannot be reproduced here. The same seed does not give diffusers' images.

        The call returns the images themselves (diffusers returns an ``ImagePipelineOutput`` whose ``.images`` they
        are). The scheduler swap is ``Sampler.from_pretrained(PATH, scheduler=...)`` (or ``scheduler=`` here).

        Progress: ``progress=True`` shows a tqdm bar on stderr (image·steps, as ``ddpm-run sample``'s);
        ``progress=fn`` calls ``fn(done, total)`` after every ε call, in image·steps (total = num × ε calls per
        image; done reaches total at the end); ``callback(done, total)`` is called after each batch, in images.

        Raises ``ConfigError`` for a bad argument, ``OutOfMemoryError`` when a batch does not fit in memory (the
        message names the batch to try, e.g. ``batch=8``; the sampler stays usable), ``SamplerClosedError`` after
        ``close()``."""
        self._check_open()
        num = _one_of("num", num, "batch_size", batch_size, 1)
        steps = _one_of("steps", steps, "num_inference_steps", num_inference_steps, None)
        seed = _seed(seed, generator)
        output_type = _output_type(output_type, pil)
        steps = self.steps if steps is None else steps
        if not _is_int(num) or num < 1:
            raise ConfigError(invalid("num", num, "must be an integer >= 1 (the number of images)"))
        if batch is not None and (not _is_int(batch) or batch < 1):
            raise ConfigError(invalid("batch", batch, "must be an integer >= 1 (images per model call)"))
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise ConfigError(invalid("seed", seed, "must be an integer in [0, 2**64 - 1]"))
        if not _is_int(start_index) or start_index < 0 or start_index + num - 1 > MAX_WORD - 1:
            raise ConfigError(invalid("start_index", start_index, f"and num={num} must keep the sample indices in "
                                                                  f"[0, 2**32 - 2]"))
        if not (progress is None or isinstance(progress, bool) or callable(progress)):
            raise ConfigError(invalid("progress", progress, "must be True (a tqdm bar), False/None, or a function "
                                                            "fn(done, total)"))
        num, seed, start_index = int(num), int(seed), int(start_index)
        batch = min(self.batch if batch is None else int(batch), num)
        plan = self.plan(steps, scheduler, **options)
        c, h, w = self.sample_shape
        total = num * len(plan)
        report = progress if callable(progress) and not isinstance(progress, bool) else None
        bar = None
        if progress is True:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="img·step", unit_scale=True, dynamic_ncols=True, desc="sample")
        done = 0

        def on_step(n: int) -> None:
            nonlocal done
            done += n
            if bar is not None:
                bar.update(n)
            if report is not None:
                report(done, total)

        try:
            out = np.empty((num, h, w, c), dtype=np.float32 if output_type == "np" else np.uint8)
            convert = to_unit if output_type == "np" else to_uint8
            loop = self._loop_for(batch)
            for lo in range(0, num, batch):
                idx = np.arange(start_index + lo, start_index + min(lo + batch, num), dtype=np.int64)
                x, _ = loop.sample(plan, seed, idx, callback=lambda d, t, n=len(idx): on_step(n))
                out[lo:lo + len(idx)] = convert(x, self.card.data.value_range)
                if callback is not None:
                    callback(lo + len(idx), num)
        except BaseException as e:
            self._reset_loop()  # a failed step leaves images in the loop's slots: the next call starts clean
            if isinstance(e, MemoryError):  # NumPy's (ONNX Runtime's are OutOfMemoryError already)
                raise out_of_memory("the host (NumPy)", batch, f"MemoryError: {e}") from None
            raise
        finally:
            if bar is not None:
                bar.close()
        if output_type == "pil":
            from PIL import Image

            return [Image.fromarray(im[..., 0] if c == 1 else im) for im in out]
        return out

    def _reset_loop(self) -> None:
        if self._loop is not None:
            try:
                self._loop.close()
            finally:
                self._loop = None

    def close(self) -> None:
        """Release the loop and the runner (idempotent); calling the sampler afterwards raises SamplerClosedError."""
        if self._closed:
            return
        self._closed = True
        try:
            self._reset_loop()
        finally:
            self.runner.close()

    def __enter__(self) -> "Sampler":
        self._check_open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return (f"Sampler({self.runner.name}, {self.runner.path}, precision={self.runner.precision}, "
                f"shape={self.sample_shape}, batch={self.batch}{state})")


def _one_of(ours: str, value, theirs: str, alias, default):
    """Our keyword or diffusers' name for it (not both)."""
    if value is not None and alias is not None:
        raise ConfigError(f"give {ours} or {theirs} (diffusers' name for it), not both; found {ours}={value!r} and "
                          f"{theirs}={alias!r}")
    return value if value is not None else alias if alias is not None else default


def _seed(seed, generator) -> int:
    """The seed of a call: ``seed``, or ``generator`` given as an integer (diffusers' keyword)."""
    if generator is None:
        return 0 if seed is None else seed
    if not _is_int(generator):
        raise ConfigError(invalid("generator", generator, "must be an integer seed: our noise is keyed by (seed, "
                                  "image index), not drawn from a torch.Generator's stream, so pass the seed itself "
                                  "(generator=0, or seed=0)"))
    if seed is not None:
        raise ConfigError(f"give seed or generator (an integer seed), not both; found seed={seed!r} and "
                          f"generator={generator!r}")
    return generator


def _output_type(output_type, pil: bool) -> str:
    if output_type is None:
        return "pil" if pil else "uint8"
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(invalid("output_type", output_type, f"must be one of {list(OUTPUT_TYPES)} (diffusers' "
                                  f"'pt' and 'latent' are torch tensors: the runtime has no torch)"))
    if pil and output_type != "pil":
        raise ConfigError(f"pil=True and output_type={output_type!r} disagree; give one of them")
    return output_type


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
