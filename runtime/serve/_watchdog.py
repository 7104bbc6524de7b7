"""The watchdog of a ``tritonserver`` started by ``ddpm-run serve`` (``TritonServer``): a server never outlives the
process that started it, whatever ends that process (SIGKILL included).

Run as a script (``python -I _watchdog.py``; standard library only, so it starts fast), in its own session, with a
pipe as stdin whose other end only the serving process holds. It reads lines:

    pgid N      the server's process group (the server and its Python-backend stubs)
    path P      a temporary folder of the server to remove once it is gone
    grace S     seconds the server may take to stop after its parent died (Triton's exit timeout + a margin)
    done        the serving process stopped the server and cleaned up itself: exit

At end of file without ``done`` (the serving process died: the kernel closes its end of the pipe), it waits up to
``grace`` seconds for the group to exit (the server got SIGTERM from the kernel, its parent-death signal, and stops
cleanly), then SIGKILLs the group, removes the shared-memory regions (/dev/shm) its processes had mapped and the
temporary folders.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path


def group_processes(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def shm_regions(pids) -> set[str]:
    """The /dev/shm files the processes ``pids`` have mapped (the Python backend's shared-memory regions)."""
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
                found.add(parts[5].removesuffix(" (deleted)"))
    return found


def end_group(pgid: int, grace: float, term: bool = False) -> None:
    """Wait up to ``grace`` s for group ``pgid`` to exit (after SIGTERM if ``term``), then SIGKILL it; remove the
    shared-memory regions it had mapped and left."""
    regions = shm_regions(group_processes(pgid))
    if term:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while group_processes(pgid) and time.monotonic() < deadline:
        regions |= shm_regions(group_processes(pgid))
        time.sleep(0.1)
    if group_processes(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + 10
        while group_processes(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
    for r in regions:
        try:
            os.unlink(r)
        except OSError:
            pass


def main() -> None:
    pgid, paths, grace = None, [], 30.0
    for line in sys.stdin:
        cmd, _, arg = line.rstrip("\n").partition(" ")
        if cmd == "pgid":
            pgid = int(arg)
        elif cmd == "path":
            paths.append(arg)
        elif cmd == "grace":
            grace = float(arg)
        elif cmd == "done":
            return
    if pgid is not None:
        end_group(pgid, grace)
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    main()
