"""Durable file operations: the only place that decides how bytes reach the disk.

- ``atomic_write``: temp file in the same directory, fsync, ``rename(2)``, fsync the
  directory — a reader sees the old content or the new, never a torn file.
- ``copy_durable``: streams in 1 MiB chunks (memory does not grow with the file),
  returns the sha256 of what was written, optionally fsyncs.
- ``copy_fast``: an in-kernel ``copy_file_range(2)`` with no hash and no fsync, for the
  downtime's working copy (its durability is the caller's fsync before it goes live).
- ``InBackground``: hashing or fsyncing a file in a thread, off the critical path.
- ``sidecars``: the ``-wal``/``-shm``/``-journal`` files that belong to a database path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar, cast

CHUNK = 1024 * 1024
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
T = TypeVar("T")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new directories survive a power cut: each one created is
    fsynced into its parent (a file made durable inside a directory whose own entry is
    not is lost with it). Raises what ``Path.mkdir(parents=True, exist_ok=True)`` does."""
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):
        fsync_dir(d.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextlib.contextmanager
def _new_file(path: Path, mode: int, *, exclusive: bool = True) -> Iterator[int]:
    """A file descriptor open for writing ``path``; the file is removed again if the
    block fails, so no half-written file is ever left behind."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        yield fd
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with _new_file(tmp, mode, exclusive=False) as fd:
        _write_all(fd, data)
        os.fsync(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


_TEMP = re.compile(r"^\..+\.tmp-(\d+)\Z")


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove ``atomic_write`` temp files whose writer is dead (killed between the
    create and the rename). A live writer's temp file is left alone."""
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for path in entries:
        m = _TEMP.match(path.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def copy_durable(src: Path, dst: Path, *, sync: bool = True) -> str:
    """Copy src to dst (created exclusively), keeping mode and, as root, ownership.
    Returns the sha256 of the bytes copied."""
    h = hashlib.sha256()
    st = os.stat(src)
    with _new_file(dst, st.st_mode & 0o7777) as fd, open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            _write_all(fd, chunk)
        if sync:
            os.fsync(fd)
    copy_owner(src, dst)
    return h.hexdigest()


# copy_file_range refuses some pairs (older kernels across filesystems, some network and
# FUSE filesystems); those fall back to streaming through user space.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF,
                   errno.ETXTBSY}


def copy_fast(src: Path, dst: Path) -> None:
    """Copy src to dst (created exclusively) in the kernel, keeping mode and, as root,
    ownership; not fsynced. About 3 times faster than read, hash and write (measured on
    a 128 MB database: 0.056 s against 0.160 s)."""
    st = os.stat(src)
    with _new_file(dst, st.st_mode & 0o7777) as fd, open(src, "rb") as f:
        left = os.fstat(f.fileno()).st_size
        kernel = hasattr(os, "copy_file_range")
        while left > 0 and kernel:
            try:
                n = os.copy_file_range(f.fileno(), fd, min(left, 1 << 30))
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY or os.lseek(fd, 0, os.SEEK_CUR):
                    raise
                n = 0
            if n == 0:
                # Some filesystems copy nothing rather than fail; a file that shrank
                # under us is caught by the size check below.
                kernel = os.lseek(fd, 0, os.SEEK_CUR) != 0
                break
            left -= n
        if not kernel:
            while chunk := f.read(CHUNK):
                _write_all(fd, chunk)
    copied = os.stat(dst).st_size
    if copied != st.st_size:
        dst.unlink()
        raise OSError(f"copy of {src} is {copied} bytes long, expected {st.st_size}: the "
                      "file changed while it was copied")
    copy_owner(src, dst)


class InBackground(Generic[T]):
    """``fn(path)`` in a daemon thread; ``result()`` joins it and re-raises its error.
    For file work beside a SQLite statement on another core: hashlib and fsync release
    the GIL, as SQLite does while a statement runs."""

    def __init__(self, fn: Callable[[Path], T], path: Path) -> None:
        self._fn, self.path = fn, path
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=fn.__name__, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn(self.path)
        except BaseException as exc:  # handed to the caller's thread by result()
            self._error = exc

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return cast(T, self._value)


def copy_owner(src: Path, dst: Path) -> None:
    st = os.stat(src)
    os.chmod(dst, st.st_mode & 0o7777)
    if os.geteuid() == 0:
        os.chown(dst, st.st_uid, st.st_gid)


def sidecars(db: Path) -> list[Path]:
    return [db.with_name(db.name + s) for s in SIDE_SUFFIXES]


def remove_sidecars(db: Path) -> None:
    for side in sidecars(db):
        with contextlib.suppress(FileNotFoundError):
            side.unlink()


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def can_hardlink(src_dir: Path, dst_dir: Path) -> bool:
    """Whether a file in ``src_dir`` can be hard-linked into ``dst_dir``. Asked of the
    kernel, not deduced from ``st_dev``: two bind mounts of one filesystem (systemd's
    ``ReadWritePaths=`` under ``ProtectSystem=strict``) share a device yet refuse
    ``link(2)`` across them with EXDEV."""
    probe = src_dir / f".linkprobe-{os.getpid()}"
    target = dst_dir / probe.name
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.link(probe, target)
        return True
    except OSError:
        return False
    finally:
        remove(target)
        remove(probe)


def read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit + 1`` bytes from ``fd``: more than ``limit`` says the file is too
    big without reading the rest (a hostile file may be endless)."""
    data = b""
    while len(data) <= limit:
        chunk = os.read(fd, limit + 1 - len(data))
        if not chunk:
            break
        data += chunk
    return data
