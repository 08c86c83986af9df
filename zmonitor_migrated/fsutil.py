"""Durable file operations: the only place that decides how bytes reach the disk.

- ``atomic_write``: temp file in the same directory, fsync, ``rename(2)``, fsync the
  directory — a reader sees the old content or the new, never a torn file.
- ``copy_durable``: streams in 1 MiB chunks (memory does not grow with the file),
  returns the sha256 of what was written, optionally fsyncs.
- ``sidecars``: the ``-wal``/``-shm``/``-journal`` files that belong to a database path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path

CHUNK = 1024 * 1024
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")


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
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, st.st_mode & 0o7777)
    try:
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                _write_all(fd, chunk)
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()
        raise
    os.close(fd)
    copy_owner(src, dst)
    return h.hexdigest()


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
