"""Helpers shared by the three CLIs: clean errors, logging set-up, the runs/latest pointer."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from .errors import DDPMError, cli_style

RUNS_DIR_ENV = "DDPM_RUNS_DIR"
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


def version_option():
    """``--version``: the installed ddpm-deploy version (the same on all three commands)."""
    return click.version_option(package_name="ddpm-deploy", message="%(prog)s (ddpm-deploy) %(version)s")


def runs_dir() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV, "runs"))


def latest_run() -> Path:
    return runs_dir() / "latest"


def point_latest(run_dir: Path) -> None:
    """Point runs/latest at run_dir (a relative symlink, replaced atomically)."""
    link = latest_run()
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(Path(run_dir).resolve(), link.parent.resolve())
    tmp = link.parent / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def describe_os_error(e: OSError) -> str:
    """One line for a fault of the machine: the path, what happened, and (full disk) what to do."""
    import errno

    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    what = e.strerror or str(e)
    hint = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; the disk is full: free space or choose another output location"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; choose a location you can write to"
    return f"{where}: {what}{hint}" if where else f"{what}{hint}"


def clean_errors(fn):
    """Our exception family and faults of the machine (OSError: full disk, permissions, I/O errors; MemoryError)
    become one 'error: …' line on stderr and exit status 2, without a traceback; Ctrl-C becomes exit 130. Anything
    else is a bug of ddpm-deploy and keeps its traceback. The command runs in ``errors.cli_style()``, so shared code
    names its options as flags."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with cli_style():  # messages name options as flags (--batch 8), not as the API's arguments
                return fn(*args, **kwargs)
        except DDPMError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            click.echo(f"error: {describe_os_error(e)}", err=True)
            sys.exit(2)
        except MemoryError as e:  # a fault of the machine, as OSError (sampling names the batch: OutOfMemoryError)
            detail = f" ({e})" if str(e) else ""
            click.echo(f"error: out of memory{detail}: free memory or ask for less at once (a smaller --batch)",
                       err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:  # Ctrl-C, or errors.Interrupted (SIGINT/SIGTERM with what was kept)
            click.echo(f"\nerror: {str(e) or 'interrupted (SIGINT)'}", err=True)
            sys.exit(getattr(e, "exit_code", 130))

    return wrapper
