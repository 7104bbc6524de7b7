"""Helpers shared by the three CLIs: clean errors, logging set-up, the runs/latest pointer."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from .errors import DDPMError

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


def clean_errors(fn):
    """Turn our exception family into 'error: …' on stderr and a non-zero exit, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DDPMError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper
