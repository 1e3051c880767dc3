"""Output files: nothing is overwritten without ``force``, and nothing but a regular file is ever replaced.

Every command that writes a file (``train``, ``prune``, ``export``, ``profile --json``) checks its
destination with :func:`check_output` before the slow work starts, writes to a temporary file in
the same folder (:func:`temp_path`) and moves it into place with :func:`replace_file`. Temporary
files carry the writer's process id, so the next writer removes the ones that a killed process
left behind (:func:`remove_stale_temps`) and never touches those of a process that still runs.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = ["OutputError", "check_output", "check_not_special", "temp_path", "replace_file", "remove_stale_temps"]


class OutputError(ValueError):
    """An output path would overwrite an input, an existing file without ``force``, or a non-regular file."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.expanduser().absolute() == b.expanduser().absolute()


def check_not_special(path: str | Path) -> None:
    """Raise :class:`OutputError` if ``path`` exists and is not a regular file (device, folder, pipe, link)."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISLNK(mode):
        raise OutputError(f"{path} is a symbolic link; gatedmtl only replaces regular files: give another output path")
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a device or special file"
        raise OutputError(f"{path} is {kind}, not a regular file; gatedmtl never replaces it: give a file path")


def check_output(path: str | Path, *, inputs: Iterable[str | Path] = (), force: bool = False,
                 flag: str = "--force") -> Path:
    """Check that ``path`` may be written: its folder exists and is writable, it is not one of
    ``inputs``, it is not a special file, and it does not exist unless ``force``.

    Returns ``path`` as a :class:`~pathlib.Path`. Raises :class:`OutputError`,
    :class:`FileNotFoundError`, :class:`NotADirectoryError` or :class:`PermissionError`.
    """
    path = Path(path)
    for source in inputs:
        if _same_file(path, Path(source)):
            raise OutputError(f"the output {path} is the input file; gatedmtl never overwrites its input: "
                              "give another output path")
    check_not_special(path)
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass {flag} to overwrite it, or give another output path")
    parent = path.parent
    for up in [parent, *parent.parents]:
        if up.exists():
            if not up.is_dir():
                raise NotADirectoryError(f"cannot write {path}: {up} is a file, not a folder")
            break
    if not parent.exists():
        raise FileNotFoundError(f"output folder {parent} does not exist; create it first (mkdir -p {parent})")
    try:  # os.access is unreliable (root, ACLs, read-only mounts): really try.
        probe = temp_path(path, "probe")
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to the output folder {parent}: {e.strerror or e}") from e
    return path


def temp_path(path: str | Path, kind: str = "tmp") -> Path:
    """A fresh temporary name next to ``path``: ``.<name>.<pid>.<random>.<kind>``."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def replace_file(source: str | Path, path: str | Path) -> None:
    """Move ``source`` onto ``path`` atomically, refusing to replace anything but a regular file."""
    check_not_special(path)
    os.replace(source, path)


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.(?P<kind>[a-z]+)$")


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


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders (see :func:`temp_path`) of processes that no longer run."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP.match(entry.name)
        if m is None or _alive(int(m.group("pid"))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
