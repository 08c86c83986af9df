"""Durable file operations: the only place that decides how bytes reach the disk.

- ``atomic_write`` and ``atomic_output`` (the one streaming into a ``mkstemp`` file, whose
  final name may be decided once the bytes are written): temp file in the same
  directory, fsync, ``rename(2)``, fsync the directory — a reader sees the old content or
  the new, never a torn file; on any error the temp file is removed.
- ``write_new``: a file that must not exist yet (``O_EXCL``, no symlink followed), with
  exactly the mode given, fsynced; ``link_new``: the same for a name other processes
  read, written aside and linked into place so no reader sees it torn.
- ``sha256_file`` / ``sha256_and_size``: the one loop hashing a file.
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
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

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


class Pending:
    """A temp file being written (``file``); renamed to ``target`` when the block ends."""

    def __init__(self, file: BinaryIO, tmp: Path, target: Path | None) -> None:
        self.file, self.tmp, self.target = file, tmp, target


@contextlib.contextmanager
def _committed(fd: int, tmp: Path, target: Path | None, mode: int | None
               ) -> Iterator[Pending]:
    """Every atomic writer's commit: the block writes ``fd`` (the new temp file ``tmp``);
    then flush, fsync, ``mode`` if given, rename over the target, fsync its directory.
    On any error the temp file is removed and the target left as it was."""
    f = os.fdopen(fd, "wb")
    pending = Pending(f, tmp, target)
    try:
        with f:
            yield pending
            f.flush()
            os.fsync(f.fileno())
        if pending.target is None:
            raise ValueError(f"{tmp}: written without a target name")
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, pending.target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(pending.target.parent)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, exact_mode: bool = False
                 ) -> None:
    """Replace ``path`` with ``data``. The temp file is ``.NAME.tmp-PID`` (opened with
    ``mode``, under the umask) so that ``remove_stale_temps`` can tell a dead writer's.
    ``exact_mode``: the file gets ``mode`` whatever the umask (the daemon's unit sets
    ``UMask=0077``; a file meant for other readers must say so)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with _committed(fd, tmp, path, None) as pending:
        if exact_mode:
            os.fchmod(pending.file.fileno(), mode)
        pending.file.write(data)


@contextlib.contextmanager
def atomic_output(directory: Path, target: Path | None = None, *, prefix: str,
                  suffix: str = "", mode: int | None = None) -> Iterator[Pending]:
    """Stream into a new ``mkstemp`` file in ``directory`` (``O_EXCL``, 0600, or ``mode``
    once written); it becomes ``target``, or the ``pending.target`` the block sets (a
    name known only from the bytes written)."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
    with _committed(fd, Path(name), target, mode) as pending:
        yield pending


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path``, which must not exist, holding ``data`` with exactly ``mode``."""
    # O_EXCL: never overwrite; O_NOFOLLOW: never write through a planted symlink; the
    # mode is given to open(2) itself so the file is never more readable than `mode`.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may only have narrowed it; make it exact
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def link_new(path: Path, data: bytes) -> None:
    """Create ``path``, which must not exist (FileExistsError), holding ``data``, fsynced
    and never seen torn: a temp file is written, then linked into place (``link(2)``
    fails on an existing name). The caller fsyncs the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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


def sha256_and_size(path: Path) -> tuple[str, int]:
    """The sha256 of the bytes read from ``path`` and how many there were."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def sha256_file(path: Path) -> str:
    return sha256_and_size(path)[0]


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
    ownership; not fsynced: the kernel copies (or shares) the blocks without passing
    them through this process, unlike ``copy_durable``, which reads, hashes and writes."""
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
    """``fn(path)`` in a daemon thread (named ``name``, or after ``fn``); ``result()``
    joins it and returns its value or re-raises its error. A ``concurrent.futures``
    Future carries the outcome; the thread is a daemon one, unlike an executor's, so a
    process that must exit never waits for a hash. For file work beside a SQLite
    statement on another core: hashlib and fsync release the GIL, as SQLite does while
    a statement runs."""

    def __init__(self, fn: Callable[[Path], T], path: Path, *, name: str | None = None
                 ) -> None:
        self.path = path
        self._future: Future[T] = Future()
        self._thread = threading.Thread(target=self._run, args=(fn,),
                                        name=name or fn.__name__, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[Path], T]) -> None:
        self._future.set_running_or_notify_cancel()
        try:
            self._future.set_result(fn(self.path))
        except BaseException as exc:  # handed to the caller's thread by result()
            self._future.set_exception(exc)

    def result(self) -> T:
        self._thread.join()
        return self._future.result()


def copy_owner(src: Path, dst: Path) -> None:
    st = os.stat(src)
    os.chmod(dst, st.st_mode & 0o7777)
    if os.geteuid() == 0:
        os.chown(dst, st.st_uid, st.st_gid)


def sidecars(db: Path) -> list[Path]:
    return [db.with_name(db.name + s) for s in SIDE_SUFFIXES]


def remove_sidecars(db: Path) -> bool:
    """Whether there was any to remove."""
    removed = False
    for side in sidecars(db):
        with contextlib.suppress(FileNotFoundError):
            side.unlink()
            removed = True
    return removed


def rename_over_database(src: Path, db: Path) -> None:
    """Rename ``src`` over the database ``db``, durably. The old file's side files go
    first, and durably: a power cut that kept the rename but undid their removal would
    leave SQLite to replay the old file's ``-wal`` (or hot ``-journal``) onto the new one."""
    if remove_sidecars(db):
        fsync_dir(db.parent)
    os.replace(src, db)
    fsync_dir(db.parent)


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
