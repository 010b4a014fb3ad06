"""Atomic file and folder writes: a reader (or a run resumed after a kill) sees the old file or the new one,
never half of one. Temporary names are `.NAME.tmp.PID` (being written) and `.NAME.old.PID` (a folder
being replaced); `remove_stale_temp` clears what a killed process left behind."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Callable, Iterator, List, Optional

_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)\.(?P<pid>\d+)$")


def temp_path(path: str, kind: str = "tmp") -> str:
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{name}.{kind}.{os.getpid()}")


def fsync_dir(path: str) -> None:
    """Make a rename (or a new entry) in folder `path` durable. No-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable, mode: str = "wb",
                 before_replace: Optional[Callable[[], None]] = None) -> None:
    """write(f) into a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder.
    `before_replace` (tests) runs between the complete temporary file and the rename."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **({"newline": ""} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too; a SIGKILL leaves the file to remove_stale_temp
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(d)


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=1, default=str), mode="w")


def fsync_tree(path: str) -> None:
    """fsync every file under `path`, then its folders (before the tree is renamed into place)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def replace_dir(src: str, dst: str) -> None:
    """Put the complete folder `src` in place of `dst` (two renames: a reader sees the old folder, none,
    or the new one, never a mix); the old one is removed afterwards."""
    parent = os.path.dirname(os.path.abspath(dst))
    old = None
    if os.path.lexists(dst):
        old = temp_path(dst, "old")
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)  # the old folder back in place
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)


@contextlib.contextmanager
def new_dir(path: str) -> Iterator[str]:
    """A temporary folder beside `path` to fill with plain writes; when the block ends its files are
    fsynced once (fsync_tree) and it replaces `path` whole (replace_dir); on an error (a
    KeyboardInterrupt too) it is removed and `path` is left as it was."""
    path = os.path.abspath(path)
    tmp = temp_path(path)
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (as far as it can be told)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):  # another user's process; no signals (Windows)
        return True
    return True


def remove_stale_temp(folder: str, only_dead_writers: bool = False) -> List[str]:
    """Remove the temporary files and folders that killed writers left in `folder`; a replaced folder
    whose new version never arrived (`.NAME.old.PID` without NAME) is put back. Returns the names removed.
    only_dead_writers: keep the files of processes still running (a folder other processes may be
    writing at the same time, e.g. a shared data cache)."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for entry in sorted(os.listdir(folder)):
        m = _STALE.match(entry)
        if not m or (only_dead_writers and _alive(int(m.group("pid")))):
            continue
        p = os.path.join(folder, entry)
        target = os.path.join(folder, m.group("name"))
        if m.group("kind") == "old" and not os.path.lexists(target):
            os.replace(p, target)  # the only complete copy
            continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)
        removed.append(entry)
    fsync_dir(folder)
    return removed
