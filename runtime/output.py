"""Sample outputs that never lose or mix work.

An output folder of ``ddpm-run sample`` holds, when the job is complete::

    samples.npz   images uint8 [N, H, W, C] and indices int64 [N], ordered by index (byte-identical for the same
                  job whatever the batch size, the interruptions and resumes)
    grid.png      the first 64 images
    images/       NNNNNN.png per image (unless --no-pngs)
    run.json      RunInfo: what was sampled, how, how fast; status "complete"

While a job runs, every finished batch is written at once, whole or not at all, as ``parts/FIRST-LAST.npy`` (uint8
[B, H, W, C]) and run.json (status "running") lists the finished indices. So a job killed in any way (Ctrl-C,
SIGTERM, kill -9, a full disk, a non-finite ε) keeps every finished batch: SIGINT/SIGTERM and errors also write a
samples.npz of the finished images and run.json status "interrupted"/"failed"; after kill -9 the parts and run.json
are the record. ``--resume`` continues such a folder (same model, seed, steps and indices, checked against
run.json) and skips what is done; on completion the parts are merged into samples.npz and removed.

A folder that already holds samples is refused unless ``--resume`` (continue it) or ``--overwrite`` (replace our
outputs in it) is given; a lock on the folder keeps two jobs out of it; a failed job that finished nothing leaves no
folder it created behind; temporary files of killed writes are removed by the next job in the folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import zipfile
from pathlib import Path

import numpy as np

from .contract import Artifact
from .errors import ConfigError, DDPMError, Interrupted, SamplingError, out_of_memory
from .fileio import atomic_write_bytes, fsync_dir
from .imageio import grid_scale, make_grid, png_bytes, save_png, to_uint8

GRID_MAX = 64
PARTS = "parts"
OUTPUTS = ("samples.npz", "grid.png", "run.json")  # with images/ and parts/: everything a sampling job writes
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same images give the same samples.npz bytes


def _member(name: str) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    zi.compress_type = zipfile.ZIP_STORED
    zi.external_attr = 0o644 << 16
    return zi


def _tmp_name(p: Path) -> Path:
    return p.with_name(f".{p.name}.{os.getpid()}.tmp")


class NpzStream:
    """An uncompressed .npz written member by member (arrays streamed in chunks: memory flat in N), into a
    temporary file renamed on ``close``: whole or not at all. Member timestamps are fixed, so the bytes depend only
    on the arrays."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = _tmp_name(self.path)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in close/abort)
        self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def array(self, key: str, dtype, shape: tuple[int, ...], chunks) -> None:
        """Write member ``key``: the header of an array of ``dtype``/``shape``, then the C-order ``chunks``."""
        total = 0
        with self._zip.open(_member(f"{key}.npy"), "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": tuple(int(s) for s in shape)}
            np.lib.format.write_array_header_2_0(f, header)
            for c in chunks:
                c = np.ascontiguousarray(c, dtype=dtype)
                f.write(c.tobytes())
                total += c.size
        if total != int(np.prod(shape)):
            raise ValueError(f"{self.path}: member {key} got {total} values for shape {shape}")

    def close(self) -> Path:
        """Finish the file, make its bytes and its name durable (fsync of the file, then of the folder after the
        rename): the sampler removes the parts it was merged from right after, so the merge must survive a crash."""
        self._zip.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._zip.close()
        with contextlib.suppress(Exception):
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """An uncompressed .npz of ``arrays`` (whole or not at all; bytes depend only on the arrays)."""
    with NpzStream(path) as z:
        for key, arr in arrays.items():
            arr = np.asarray(arr)
            z.array(key, arr.dtype, arr.shape, [arr])
    return Path(path)


class SampleWriter:
    """All images of a job arriving in one process (``ddpm-run request``): streamed into samples.npz, PNGs and
    grid as they come; ``close`` writes run.json. Nothing half-written on ``abort``."""

    def __init__(self, out_dir: str | os.PathLike, num: int, sample_shape: tuple[int, int, int],
                 value_range=(-1.0, 1.0), write_pngs: bool = True):
        self.out = Path(out_dir)
        _probe_writable(self.out)
        c, h, w = sample_shape
        self.num, self.value_range, self.write_pngs = num, value_range, write_pngs
        self.count = 0
        self.grid_images: list[np.ndarray] = []
        self.indices: list[int] = []
        self._npz = NpzStream(self.out / "samples.npz")
        self._queue: list[np.ndarray] = []
        self._shape = (num, h, w, c)
        self.scale = grid_scale(h)

    def add(self, x: np.ndarray, indices) -> None:
        """Add float images [B, C, H, W] in the model's value range."""
        self.add_uint8(to_uint8(x, self.value_range), indices)

    def add_uint8(self, imgs: np.ndarray, indices) -> None:
        """Add images that are already uint8 [B, H, W, C]."""
        self._queue.append(np.ascontiguousarray(imgs))
        for img, i in zip(imgs, indices):
            if self.write_pngs:
                atomic_write_bytes(self.out / "images" / f"{int(i):06d}.png", png_bytes(img))
            if len(self.grid_images) < GRID_MAX:
                self.grid_images.append(img)
        self.indices.extend(int(i) for i in indices)
        self.count += len(imgs)

    def close(self, run_info: Artifact) -> None:
        if self.count != self.num:
            self.abort()
            raise ConfigError(f"expected {self.num} images for {self.out}, received {self.count}")
        try:
            self._npz.array("images", np.uint8, self._shape, self._queue)
            self._npz.array("indices", np.int64, (self.num,), [np.asarray(self.indices, dtype=np.int64)])
            self._npz.close()
        except BaseException:
            self._npz.abort()
            raise
        if self.grid_images:
            save_png(self.out / "grid.png", make_grid(np.stack(self.grid_images)), scale=self.scale)
        run_info.save(self.out / "run.json")

    def abort(self) -> None:
        self._npz.abort()


def _probe_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to output directory {out}: {e.strerror}; choose another --out") from None


def save_grid(out_dir: str | os.PathLike, images: np.ndarray) -> None:
    """grid.png of the first 64 images [N, H, W, C] uint8."""
    if len(images):
        save_grid_file(Path(out_dir) / "grid.png", images)


def save_grid_file(path: str | os.PathLike, images: np.ndarray) -> None:
    """The grid of the first 64 images [N, H, W, C] uint8 as a PNG at ``path``."""
    save_png(Path(path), make_grid(images[:GRID_MAX]), scale=grid_scale(images.shape[1]))


# --- index ranges ------------------------------------------------------------------------------------------------

def to_ranges(indices) -> list[list[int]]:
    """Sorted inclusive [first, last] ranges of a set of indices."""
    v = sorted(set(int(i) for i in indices))
    out: list[list[int]] = []
    for i in v:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def _todo(start: int, num: int, done: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges of [start, start + num) not covered by ``done`` (inclusive ranges), as half-open (lo, hi)."""
    out, pos, end = [], start, start + num
    for a, b in sorted(done):
        if a > pos:
            out.append((pos, min(a, end)))
        pos = max(pos, b + 1)
    if pos < end:
        out.append((pos, end))
    return [(a, b) for a, b in out if a < b]


# --- the output folder ---------------------------------------------------------------------------------------------

RESUME_KEYS = ("seed", "start_index", "num", "steps", "num_timesteps", "diffusion", "model_sha256", "shard", "backend",
               "precision", "scheduler")  # backend: runner and device (host and device loops agree within tolerance, not bytes)


def model_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a model artifact: the file, and for an OpenVINO IR (.xml) its weights file (.bin) too."""
    import hashlib

    from .fileio import sha256_file

    p = Path(path)
    if p.suffix.lower() == ".xml" and p.with_suffix(".bin").is_file():
        h = hashlib.sha256()
        h.update(bytes.fromhex(sha256_file(p)))
        h.update(bytes.fromhex(sha256_file(p.with_suffix(".bin"))))
        return h.hexdigest()
    return sha256_file(p)


class SampleDir:
    """One output folder of a sampling job: lock, what is there, the finished parts, and the final files."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.parts = self.out / PARTS
        self._created: list[Path] = []
        self._lock_fd: int | None = None

    # -- lifetime
    def open(self) -> "SampleDir":
        missing = []
        p = self.out
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        if p.exists() and not p.is_dir():
            raise ConfigError(f"cannot write to the output folder {self.out}: {p} is a file, not a folder; choose another --out")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the output folder {self.out}: {e.strerror}; choose another --out") from None
        self._created = missing  # removed again if the job finishes nothing
        self._lock()
        self._clean_temp()
        return self

    def close(self, keep: bool) -> None:
        """Release the lock; remove the folders this job created if ``keep`` is false and they hold nothing."""
        self._unlock()
        if not keep:
            for d in self._created:  # deepest first
                with contextlib.suppress(OSError):
                    d.rmdir()

    def _lock(self) -> None:
        """An exclusive flock on the folder itself (``fileio.lock_folder``)."""
        from .fileio import lock_folder

        fd = lock_folder(self.out)
        if fd is None:
            raise ConfigError(f"{self.out} is in use by another sampling job (ddpm-run sample/request/fid-compare); "
                              f"wait for it to finish or choose another --out")
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clean_temp(self) -> None:
        """Temporary files of writes that a killed job left (we hold the lock: no writer is alive)."""
        for d in (self.out, self.out / "images", self.parts):
            if d.is_dir():
                for p in d.iterdir():
                    if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                        p.unlink(missing_ok=True)

    # -- what is there
    def existing(self) -> list[str]:
        """Our outputs in the folder, for messages (empty: nothing there)."""
        found = [n for n in OUTPUTS if (self.out / n).exists()]
        pngs = sum(1 for _ in (self.out / "images").glob("*.png")) if (self.out / "images").is_dir() else 0
        if pngs:
            found.append(f"{pngs} images/*.png")
        parts = self.part_files()
        if parts:
            found.append(f"{len(parts)} unmerged {PARTS}/ batches")
        return found

    def previous(self):
        """The RunInfo in the folder (None: no run.json); ArtifactError if it is not a sampling record we can trust."""
        from .contract import RunInfo
        from .errors import ArtifactError

        p = self.out / "run.json"
        if not p.is_file():
            return None
        info = RunInfo.load(p)
        ranges = info.done if info.done is not None else []
        ok = (isinstance(info.diffusion, dict) and isinstance(info.status, str) and isinstance(ranges, list)
              and all(isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r) and r[0] <= r[1]
                      for r in ranges)
              and all(isinstance(getattr(info, k), int) for k in ("seed", "num", "start_index", "steps")))
        if not ok:
            raise ArtifactError(f"{p}: a sampling record with fields of the wrong type (done must be [[first, last], "
                                f"…], diffusion an object, seed/num/start_index/steps integers); it was not written by "
                                f"ddpm-run sample: use --overwrite or another --out")
        return info

    def remove_outputs(self, prev=None) -> None:
        """--overwrite: remove what the previous sampling job wrote (only that: other files in the folder stay,
        and of images/ only the NNNNNN.png of the indices ``prev``, its run.json, records as done)."""
        for n in OUTPUTS:
            (self.out / n).unlink(missing_ok=True)
        images = self.out / "images"
        if images.is_dir() and prev is not None:
            ranges = prev.done if prev.done is not None else [[prev.start_index, prev.start_index + prev.num - 1]]
            for a, b in ranges:
                for i in range(a, b + 1):
                    (images / f"{i:06d}.png").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                images.rmdir()
        shutil.rmtree(self.parts, ignore_errors=True)

    def foreign_pngs(self, start: int, num: int, prev=None) -> list[str]:
        """images/NNNNNN.png this job would write that are already there and not written by ``prev`` (the job
        that run.json records, which --overwrite replaces)."""
        images = self.out / "images"
        if not images.is_dir():
            return []
        names = {p.name for p in images.iterdir()}
        ours = set()
        if prev is not None:
            for a, b in (prev.done if prev.done is not None else [[prev.start_index, prev.start_index + prev.num - 1]]):
                ours.update(range(a, b + 1))
        return [f"images/{i:06d}.png" for i in range(start, start + num) if f"{i:06d}.png" in names and i not in ours]

    # -- parts
    def part_files(self) -> list[tuple[int, int, Path]]:
        if not self.parts.is_dir():
            return []
        out = []
        for p in self.parts.glob("*.npy"):
            try:
                a, b = (int(v) for v in p.stem.split("-"))
            except ValueError:
                continue
            out.append((a, b, p))
        return sorted(out)

    def write_part(self, imgs: np.ndarray, first: int) -> Path:
        import io

        last = first + len(imgs) - 1
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(imgs), allow_pickle=False)
        path = self.parts / f"{first:010d}-{last:010d}.npy"
        atomic_write_bytes(path, buf.getvalue())
        return path

    def read_part(self, path: Path, first: int, last: int, image_shape: tuple[int, int, int]) -> np.ndarray:
        from .errors import ArtifactError

        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ArtifactError(f"{path}: a finished batch that cannot be read ({e}); delete it and sample again "
                                f"with --resume (its images are sampled again)") from None
        if arr.dtype != np.uint8 or arr.shape != (last - first + 1, *image_shape):
            raise ArtifactError(f"{path}: expected uint8 {[last - first + 1, *image_shape]}, found {arr.dtype} "
                                f"{list(arr.shape)}; delete it and sample again with --resume")
        return arr

    def fill_pngs(self, done, image_shape: tuple[int, int, int]) -> int:
        """Write the images/NNNNNN.png of finished batches that an interruption left unwritten; returns how many."""
        n = 0
        for a, b in done:
            missing = [i for i in range(a, b + 1) if not (self.out / "images" / f"{i:06d}.png").is_file()]
            if missing:
                arr = self.read_part(self.parts / f"{a:010d}-{b:010d}.npy", a, b, image_shape)
                for i in missing:
                    atomic_write_bytes(self.out / "images" / f"{i:06d}.png", png_bytes(arr[i - a]))
                n += len(missing)
        return n

    def done_ranges(self, start: int, num: int) -> list[tuple[int, int]]:
        """The finished batches of the job [start, start + num) (inclusive ranges); refuses parts of another job."""
        from .errors import ArtifactError

        got = []
        for a, b, p in self.part_files():
            if a < start or b >= start + num:
                raise ArtifactError(f"{p}: indices {a}-{b} lie outside this job's {start}-{start + num - 1}; "
                                    f"the folder holds another job: use --overwrite or another --out")
            if got and a <= got[-1][1]:
                raise ArtifactError(f"{p}: overlaps the batch {got[-1][0]}-{got[-1][1]}; delete one of them")
            got.append((a, b))
        return got

    def merge(self, path: Path, start: int, num: int, image_shape: tuple[int, int, int], done) -> np.ndarray:
        """samples.npz of the finished images (all of them when the job is complete), streamed from the parts in
        index order; returns the first GRID_MAX images for grid.png."""
        n = sum(b - a + 1 for a, b in done)
        grid: list[np.ndarray] = []

        def chunks():
            for a, b in done:
                arr = self.read_part(self.parts / f"{a:010d}-{b:010d}.npy", a, b, image_shape)
                if len(grid) < GRID_MAX:
                    grid.extend(arr[:GRID_MAX - len(grid)])
                yield arr

        indices = np.concatenate([np.arange(a, b + 1, dtype=np.int64) for a, b in done]) if done else \
            np.zeros(0, np.int64)
        with NpzStream(path) as z:
            z.array("images", np.uint8, (n, *image_shape), chunks())
            z.array("indices", np.int64, (n,), [indices])
        return np.stack(grid) if grid else np.zeros((0, *image_shape), np.uint8)


@contextlib.contextmanager
def signals_raise():
    """SIGINT and SIGTERM raise ``Interrupted`` (exit 130 / 143) in the main thread for the duration."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_ignored():
    """No second interruption while the finished work is being written down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


MODES = ("new", "resume", "overwrite")


def sample_job(runner, loop, plan, card, model_path, out_dir, seed: int, start_index: int, num: int, batch: int,
               write_pngs: bool = True, on_step=None, shard: dict | None = None, mode: str = "new",
               resume_hint: str | None = None, echo=None, on_skip=None, precision_choice: dict | None = None):
    """Sample indices ``start_index`` … ``start_index + num − 1`` in batches of ``batch`` into ``out_dir`` (see the
    module docstring for the folder and what survives an interruption). ``mode``: "new" (refuse a folder that holds
    samples), "resume" (continue the job there; checked against its run.json), "overwrite" (replace our outputs
    there). ``on_step(n)`` after every step of a batch of n images; ``on_skip(n)`` once with the number of images a
    resume finds done; ``echo(text)`` for notes to the user; ``loop`` (``sampling.open_loop``) drives ``runner``
    along ``plan`` (a ``StepPlan``);
    ``resume_hint``: the command that continues the job, for messages (or a function of the exception that
    stopped the job returning it: after an ``OutOfMemoryError`` the command may name a smaller batch). NumPy's
    MemoryError is raised as ``OutOfMemoryError`` (the batch to try named as ``errors.option`` names it). Returns the RunInfo written (status
    "complete"). Used by ``ddpm-run sample`` and ``fid-compare`` alike."""
    import dataclasses
    import platform
    import time

    from .contract import RunInfo

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, found {mode!r}")
    echo = echo or (lambda s: None)
    c, h, w = card.data.channels, card.data.image_size, card.data.image_size
    image_shape = (h, w, c)
    model_sha = model_digest(model_path)
    base = RunInfo(
        seed=seed, num=num, batch=batch, start_index=start_index, steps=len(plan), scheduler=plan.describe(),
        num_timesteps=card.diffusion.num_timesteps, backend=runner.name, runner=type(runner).__name__,
        loop=loop.kind, precision=runner.precision, model=str(model_path), diffusion=card.diffusion.to_dict(),
        total_seconds=0.0, images_per_second=0.0, timings={},
        host={"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version()},
        model_sha256=model_sha, shard=shard, status="running", done=[],
        precision_choice=(None if precision_choice is None else {**precision_choice, "ran": runner.precision}))
    out = SampleDir(out_dir).open()
    wrote = False
    try:
        prev_seconds = 0.0
        there = out.existing()
        if there and mode == "new":
            prev = _safe_previous(out)
            state = f" (run.json: {prev.done_count()} of {prev.num} images, {prev.status})" if prev else ""
            raise ConfigError(f"{out.out} already holds samples{state}: {', '.join(there)}; continue that job with "
                              f"--resume, replace it with --overwrite, or choose another --out")
        prev_job = _safe_previous(out) if there and mode == "overwrite" else None
        if mode in ("new", "overwrite") and write_pngs:  # checked before anything is removed
            foreign = out.foreign_pngs(start_index, num, prev_job)
            if foreign:
                raise ConfigError(f"{out.out} holds {', '.join(foreign[:3])}" + (f" (+{len(foreign) - 3} more)" if
                                  len(foreign) > 3 else "") + ", which this job would write but no sampling record "
                                  "there says were sampled by ddpm-run (they stay untouched); move them, use "
                                  "--no-pngs, or choose another --out")
        if there and mode == "overwrite":
            out.remove_outputs(prev_job)
            echo(f"--overwrite: removed the previous samples in {out.out}")
        done: list[tuple[int, int]] = []
        if there and mode == "resume":
            prev = out.previous()
            if prev is None:
                raise ConfigError(f"--resume: {out.out} holds {', '.join(there)} but no run.json to say which job "
                                  f"they belong to; use --overwrite or another --out")
            mine = base.to_dict()
            for key in RESUME_KEYS:
                theirs = getattr(prev, key)
                if key == "diffusion":
                    theirs = {**mine["diffusion"], **theirs}  # run.json of older versions may lack new keys
                if key == "scheduler" and theirs is None and is_legacy_ddpm(mine["scheduler"]):
                    theirs = mine["scheduler"]  # v2/v3 run.json: DDPM ancestral with the linspace respacing
                if theirs != mine[key]:
                    what = "the model file differs" if key == "model_sha256" else f"{key} {theirs!r} there, " \
                        f"{mine[key]!r} in this command"
                    raise ConfigError(f"--resume: {out.out} holds another job ({what}); resume it with its own "
                                      f"options, or use --overwrite or another --out")
            if prev.complete and not out.part_files():
                filled = _fill_pngs_from_npz(out, start_index, num) if write_pngs else 0
                echo(f"{out.out}: all {prev.num} images are already done (run.json: complete); nothing to resume"
                     + (f" (wrote the {filled} missing images/*.png from samples.npz)" if filled else ""))
                prev.nothing_to_do = True
                return prev
            done = out.done_ranges(start_index, num)
            if write_pngs:
                out.fill_pngs(done, image_shape)
            prev_seconds = float(prev.total_seconds or 0.0)
            n_before = sum(b - a + 1 for a, b in done)
            echo(f"resuming {out.out}: {n_before} of {num} images done, sampling the rest")
            if on_skip is not None:
                on_skip(n_before)
        todo = _todo(start_index, num, done)
        timings = loop.new_timings()
        t0 = time.perf_counter()

        def record(status: str):
            elapsed = prev_seconds + time.perf_counter() - t0
            n_done = sum(b - a + 1 for a, b in done)
            # the per-step timings are summarised once, at the end: after every batch that would be O(steps so far)
            return dataclasses.replace(base, status=status, done=[list(r) for r in sorted(done)],
                                       total_seconds=elapsed, images_per_second=n_done / elapsed if elapsed else 0.0,
                                       timings={} if status == "running" else timings.summary())

        try:
            with signals_raise():
                record("running").save(out.out / "run.json")
                wrote = True
                for lo, hi in todo:
                    for b0 in range(lo, hi, batch):
                        idx = np.arange(b0, min(b0 + batch, hi), dtype=np.int64)
                        cb = (lambda d, t, n=len(idx): on_step(n)) if on_step is not None else None
                        x, tm = loop.sample(plan, seed, idx, callback=cb)
                        timings.extend(tm)
                        imgs = to_uint8(x, card.data.value_range)
                        out.write_part(imgs, int(idx[0]))  # first: the record a resume trusts
                        done.append((int(idx[0]), int(idx[-1])))
                        if write_pngs:
                            for img, i in zip(imgs, idx):
                                atomic_write_bytes(out.out / "images" / f"{int(i):06d}.png", png_bytes(img))
                        record("running").save(out.out / "run.json")
                done.sort()
            with signals_ignored():  # finishing: seconds at most; an interruption here would only redo work
                grid = out.merge(out.out / "samples.npz", start_index, num, image_shape, done)
                if len(grid):
                    save_png(out.out / "grid.png", make_grid(grid), scale=grid_scale(h))
                info = record("complete")
                info.save(out.out / "run.json")
                fsync_dir(out.out)  # run.json "complete" is on disk before the parts it no longer needs go
                shutil.rmtree(out.parts, ignore_errors=True)
                return info
        except BaseException as e:
            oom = isinstance(e, MemoryError)
            if oom:  # NumPy's (ONNX Runtime's arrive as OutOfMemoryError)
                e = out_of_memory("the host (NumPy)", batch, f"MemoryError: {e}")
            n_done = sum(b - a + 1 for a, b in done)
            if n_done == 0:
                _discard_empty(out)
                wrote = False
                if oom:
                    raise e from None
                raise
            with signals_ignored():
                status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                kept = _write_partial(out, record(status), start_index, num, image_shape, h, sorted(done))
            command = resume_hint(e) if callable(resume_hint) else resume_hint
            hint = f"; continue with: {command}" if command else "; continue it with --resume"
            msg = f"{n_done} of {num} images done and kept in {out.out} ({kept}){hint}"
            if isinstance(e, Interrupted):
                raise Interrupted(e.signum, f"interrupted by {e.signame}: {msg}") from None
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted(signal.SIGINT, f"interrupted by SIGINT: {msg}") from None
            if isinstance(e, DDPMError):
                again = type(e)(f"{e}; {msg}")
                again.__dict__.update(vars(e))  # OutOfMemoryError's batch, suggested_batch
                raise again from None
            if isinstance(e, OSError):
                from .clitools import describe_os_error

                raise SamplingError(f"{describe_os_error(e)}; {msg}") from None
            raise
    finally:
        out.close(keep=wrote)


def is_legacy_ddpm(scheduler: dict) -> bool:
    """Whether a plan is what every ddpm-run sample before run.json v4 did: DDPM with the linspace respacing."""
    return scheduler.get("scheduler") == "DDPMScheduler" and \
        scheduler.get("options", {}).get("timestep_spacing") == "linspace" and \
        not scheduler.get("options", {}).get("steps_offset")


def _safe_previous(out: SampleDir):
    try:
        return out.previous()
    except DDPMError:
        return None  # the refusal names the folder's files; run.json's state is a detail there


def _discard_empty(out: SampleDir) -> None:
    """A job that finished no image: remove the run.json it wrote (if this job wrote the only one) and nothing else."""
    run_json = out.out / "run.json"
    try:
        prev = out.previous()
    except DDPMError:
        return
    if prev is not None and prev.status == "running" and not prev.done and not out.part_files():
        run_json.unlink(missing_ok=True)


def _write_partial(out: SampleDir, info, start: int, num: int, image_shape, h: int, done) -> str:
    """After an interruption or error: samples.npz of the finished images, grid.png, run.json (status interrupted or
    failed). Best effort: if the disk is full, the parts and the last run.json are the record."""
    written = [f"{PARTS}/"]
    for name, write in (("samples.npz", lambda: out.merge(out.out / "samples.npz", start, num, image_shape, done)),
                        ("run.json", lambda: info.save(out.out / "run.json"))):
        try:
            result = write()
            written.append(name)
            if name == "samples.npz" and len(result):
                save_png(out.out / "grid.png", make_grid(result), scale=grid_scale(h))
                written.append("grid.png")
        except (OSError, DDPMError):
            pass
    missing = [n for n in ("samples.npz", "grid.png", "run.json") if n not in written]
    return ", ".join(written) + (f"; {', '.join(missing)} could not be written" if missing else "")


def _fill_pngs_from_npz(out: SampleDir, start: int, num: int) -> int:
    """images/NNNNNN.png missing from a complete job (sampled with --no-pngs, or deleted), from its samples.npz."""
    missing = [i for i in range(start, start + num) if not (out.out / "images" / f"{i:06d}.png").is_file()]
    if not missing:
        return 0
    from .errors import ArtifactError

    try:
        with np.load(out.out / "samples.npz", allow_pickle=False) as z:
            images, indices = z["images"], z["indices"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{out.out}/samples.npz: unreadable ({e}); sample again with --overwrite") from None
    pos = {int(i): k for k, i in enumerate(indices)}
    for i in missing:
        if i in pos:
            atomic_write_bytes(out.out / "images" / f"{i:06d}.png", png_bytes(images[pos[i]]))
    return len(missing)
