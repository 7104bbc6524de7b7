"""File I/O that never leaves a half-written file: write a temporary file beside the target, then rename.

Every artifact ddpm-deploy writes goes through here. Files get the permissions an ordinary ``open(path, "w")``
would give them (0666 less the process umask), not the 0600 of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader never sees it half-written (temp file in the same dir, fsync,
    rename). The file gets mode 0666 & ~umask, like a plain ``open``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None:  # a failed write(2) names no file: name the target
            raise OSError(e.errno, e.strerror, str(p)) from None
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the names in folder ``path`` durable (after a rename into it). Where the file system cannot sync a
    folder (some network, FUSE or non-POSIX ones) this is a no-op: the rename itself has happened."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR, errno.EROFS):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON (non-JSON values via ``str``), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def lock_folder(path: str | os.PathLike) -> int | None:
    """An exclusive, non-blocking flock on the folder itself (no lock file to go stale or to race on; the kernel
    releases it when the process dies, kill -9 included). Returns the descriptor to close, or None if another
    process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd
