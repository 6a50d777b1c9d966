"""Atomic file and folder writes: a failed or interrupted step leaves nothing the next step would load."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_SUFFIX = ".lock"
# Outputs this process holds a lock on (resolved path -> depth): the lock is per process, so a library call
# that locks its output and then writes it through atomic_dir (which locks too) does not lock itself out.
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside `path`; it replaces `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; it becomes `path` only if the block succeeds.

    With replace=True an existing `path` is swapped out after success (never before), so a failure
    keeps the previous good artifacts.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a folder vzedge wrote; remove it or choose another path")
    with output_lock(target):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        try:
            yield tmp
            _default_permissions(tmp)
            if target.exists():
                if not replace:
                    raise FileExistsError(f"{target} exists")
                if not target.is_dir():
                    raise FileExistsError(f"{target} is a file, not a folder vzedge wrote; remove it yourself")
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file beside an output: `.NAME.lock` in the same folder."""
    target = Path(path)
    return target.with_name(f".{target.name}{LOCK_SUFFIX}")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on output `path` while it is written (flock on `.NAME.lock` beside it).

    A second vzedge process writing the same output fails at once with FileExistsError naming the holder,
    instead of deleting the first one's temporary folder. The lock dies with its process (no stale locks);
    the lock file is removed on release. Re-entrant within one process.
    """
    import fcntl

    target = Path(path)
    key = str(target.resolve())
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    lock = lock_path(target)
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(
                f"cannot write beside {target} ({err.strerror or err}: {err.filename or lock.parent}); "
                "choose a writable output path"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_holder(lock)
            raise FileExistsError(
                f"{target} is being written by another vzedge process{holder}; wait for it to finish, "
                "or choose another output path"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and flock: lock the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    with _HELD_GUARD:
        _HELD[key] = 1
    try:
        yield
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _read_holder(lock: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(lock.read_text().strip())})"
    return ""


def check_replaceable_dir(path: str | os.PathLike[str], marker: str, force: bool, flag: str = "--out") -> None:
    """Before any work: may an output folder be written at `path`? `--force` replaces only what vzedge made.

    Fine: nothing there, or an empty folder. A folder holding `marker` (the file vzedge writes into every such
    output) needs `force`. A file, or a folder of anything else, is refused even with `force`.
    """
    target = Path(path)
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"{flag} {path} is a file; vzedge writes a folder there and never replaces a file")
    if not any(target.iterdir()):
        return
    if not (target / marker).is_file():
        raise FileExistsError(
            f"{flag} {path} holds files vzedge did not write (no {marker}); --force will not delete them: "
            "choose another path"
        )
    if not force:
        raise FileExistsError(f"{flag} {path} holds an earlier output; pass --force to replace it")


def check_writable_file(path: str | os.PathLike[str], flag: str) -> Path:
    """Before a long run: `path` must name a file (not a folder) in a folder we can create files in.

    Raises ValueError naming `flag`; creates missing parent folders as the write would.
    """
    target = Path(path)
    if str(path).endswith(os.sep) or target.is_dir():
        raise ValueError(f"{flag} {path} is a folder; pass a file path such as {target / 'out'}")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create {parent} ({err.strerror}); choose another path") from None
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"{flag} {path} exists and is read-only; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=parent)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write in {parent} ({err.strerror}); choose a writable path") from None
    os.close(fd)
    os.unlink(probe)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_permissions(folder: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600; give the tree what mkdir/open would under the current umask."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if os.stat(p).st_mode & 0o077 == 0:
                os.chmod(p, 0o666 & ~mask)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
