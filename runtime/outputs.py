"""The one output policy of every command that writes files.

- **Nothing is replaced silently.** Before anything is computed, :meth:`Outputs.claim` looks at every file and
  folder the command will write; if one exists the command is refused (one ``error:`` line naming them and the
  flag that allows it, ``--overwrite`` unless the command says otherwise). With that flag only those paths are
  replaced: other files in the same folders stay.
- **Nothing half-made.** Files that belong together (samples.npz + grid.png + run.json; a plan and its sidecar; a
  Triton model folder) are written to temporary names beside their targets (:meth:`Outputs.stage`) and renamed
  into place together at the end (:meth:`Outputs.commit`), after every write succeeded. A command that fails
  removes its temporary files and the folders it created (when empty); every file that was there before keeps its
  bytes.

Use as a context manager::

    with Outputs("ddpm-run merge", [out / "samples.npz", out / "run.json"], overwrite=overwrite) as w:
        write_npz(w.stage(out / "samples.npz"), ...)
        info.save(w.stage(out / "run.json"))
    # committed here; on an exception nothing of it is left

A staged path is a sibling ``.NAME.<pid>.tmp`` (a file or a folder), so it is on the target's file system and
the rename is atomic; a later command removes such leftovers of a killed one (:func:`clean_stale`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterable

from .errors import ConfigError

TMP_SUFFIX = ".tmp"


def _describe(p: Path) -> str:
    return f"{p}/" if p.is_dir() and not p.is_symlink() else str(p)


def existing(paths: Iterable[os.PathLike | str]) -> list[Path]:
    """Those of ``paths`` that exist (a dangling link counts: it would be replaced too)."""
    return [Path(p) for p in paths if os.path.lexists(p)]


def refuse_existing(command: str, paths: Iterable[os.PathLike | str], flag: str = "--overwrite",
                    hint: str = "choose another output") -> None:
    """ConfigError naming the paths that exist; the caller decides whether ``flag`` was given."""
    held = existing(paths)
    if held:
        names = ", ".join(_describe(p) for p in held[:6]) + (f" (+{len(held) - 6} more)" if len(held) > 6 else "")
        raise ConfigError(f"{command} would replace {names}; give {flag} to replace "
                          f"{'it' if len(held) == 1 else 'them'}, or {hint}")


def _tmp_for(target: Path) -> Path:
    return target.parent / f".{target.name}.{os.getpid()}{TMP_SUFFIX}"


def clean_stale(folder: os.PathLike | str, names: Iterable[str]) -> None:
    """Remove temporary files/folders a killed command left for the targets ``names`` in ``folder`` (only
    ``.NAME.<pid>.tmp`` of a pid that is not alive)."""
    d = Path(folder)
    if not d.is_dir():
        return
    for name in names:
        for p in d.glob(f".{name}.*{TMP_SUFFIX}"):
            pid = p.name[len(name) + 2:-len(TMP_SUFFIX)]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Outputs:
    """The files and folders one command writes (see the module docstring)."""

    def __init__(self, command: str, paths: Iterable[os.PathLike | str], overwrite: bool = False,
                 flag: str = "--overwrite", hint: str = "choose another output",
                 folders: Iterable[os.PathLike | str] = ()):
        """``paths``: every file or folder the command writes; ``folders``: those of them that are folders
        (written whole into a temporary folder, then swapped in)."""
        self.command, self.flag, self.hint, self.overwrite = command, flag, hint, overwrite
        self._dirs = {Path(p) for p in folders}
        self.paths = list(dict.fromkeys([*(Path(p) for p in paths), *self._dirs]))
        self._staged: dict[Path, Path] = {}
        self._created: list[Path] = []
        self._claimed = False

    # -- before any work
    def claim(self) -> "Outputs":
        """Refuse (ConfigError) if a target exists and the flag was not given, or if a target's folder is a
        file. Creates nothing."""
        for p in self.paths:
            for parent in p.parents:
                if os.path.lexists(parent) and not parent.is_dir():
                    raise ConfigError(f"{self.command}: cannot write {p}: {parent} is a file, not a folder; "
                                      f"{self.hint}")
        if not self.overwrite:
            refuse_existing(self.command, self.paths, self.flag, self.hint)
        for p in self.paths:  # replacing a folder with a file or back is never meant
            if self.overwrite and os.path.lexists(p) and p.is_dir() != self._wants_dir(p):
                kind = "a folder" if p.is_dir() else "a file"
                raise ConfigError(f"{self.command}: {p} is {kind}; {self.command} writes "
                                  f"{'a folder' if self._wants_dir(p) else 'a file'} there: {self.hint}")
        self._claimed = True
        return self

    def _wants_dir(self, p: Path) -> bool:
        return p in self._dirs

    def mkdir(self, folder: os.PathLike | str) -> Path:
        """Create ``folder`` (and its missing parents), remembering what was created so that a failure removes it
        again when empty."""
        folder = Path(folder)
        missing = []
        p = folder
        while not os.path.lexists(p):
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        folder.mkdir(parents=True, exist_ok=True)
        self._created.extend(m for m in missing if m not in self._created)  # deepest first
        return folder

    # -- the work
    def stage(self, target: os.PathLike | str) -> Path:
        """The temporary path to write ``target`` to (its folder is created). A folder target: the temporary
        folder is created empty."""
        target = Path(target)
        if target not in self.paths:
            raise ValueError(f"{target} was not claimed by {self.command}")  # a bug, not a user error
        tmp = self._staged.get(target)
        if tmp is None:
            self.mkdir(target.parent)
            tmp = self._staged[target] = _tmp_for(target)
            if self._wants_dir(target):
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
        return tmp

    def commit(self) -> None:
        """Rename every staged file into place. A folder target that exists is moved aside first and removed
        only after the new one is in place."""
        from .fileio import fsync_dir

        for target, tmp in self._staged.items():
            if not os.path.lexists(tmp):
                raise FileNotFoundError(f"{self.command} staged {target} but wrote nothing to {tmp}")
        for target, tmp in self._staged.items():
            if self._wants_dir(target) and target.is_dir() and not target.is_symlink():
                old = target.parent / f".{target.name}.{os.getpid()}.old{TMP_SUFFIX}"
                os.replace(target, old)
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(old, target)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            fsync_dir(target.parent)
        self._staged.clear()

    def abort(self) -> None:
        """Remove the temporary files and the folders this command created (when empty)."""
        for tmp in self._staged.values():
            with contextlib.suppress(OSError):
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink(missing_ok=True)
        self._staged.clear()
        for d in sorted(self._created, key=lambda p: len(p.parts), reverse=True):  # deepest first, across mkdirs
            with contextlib.suppress(OSError):
                d.rmdir()

    def __enter__(self) -> "Outputs":
        if not self._claimed:
            self.claim()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
