"""A crash-simulating FUSE file system (LazyFS-like), in Python over libfuse 3 (mfusepy,
ctypes: nothing to compile).

``CutFS`` is a passthrough to a backing directory that appends every durability-relevant
call to an op log (``model.Op``) and reports its own stable inode numbers, so an inode
survives a power cut as it does on a real disk (recovery compares the live file's inode
with the one it recorded). On command it simulates a power cut: every process using the
mount is SIGKILLed, the state the cut may leave (``model.crash_state``: the durable ops
only, or every op, or a seeded subset) is written back to the backing directory and the
log starts again from there.

    with Mount(backing, mountpoint) as m:
        ...  # run a process on the mountpoint
        m.fs.power_cut(mountpoint)  # or: m.fs.load(state) for a state from m.fs.ops

The server runs in a process of its own, never in the caller's. A process that maps a
file of the mount (SQLite maps a WAL database's ``-shm``) writes the mapping back through
the server when it unmaps it, holding its own memory-map lock; a server thread in that
same process then waits for that lock and neither ever returns (state D, unkillable; only
``/sys/fs/fuse/connections/N/abort`` frees it). With the server apart, the caller may
open anything on the mount, WAL databases included.

The kernel caches nothing (entry, attribute and negative timeouts are 0; no page cache
kept across opens), so a reloaded state is what every later call sees.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import model
from .model import Op, State


def fuse_unavailable() -> str | None:
    """Why a FUSE mount cannot be made here, or None."""
    if os.geteuid() != 0:
        return "power-cut tests mount a FUSE file system: they need root"
    if not os.path.exists("/dev/fuse"):
        return "power-cut tests need /dev/fuse (a container without it cannot mount FUSE)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return (f"power-cut tests need mfusepy and libfuse3 (pip install mfusepy; apt-get "
                f"install fuse3): {exc}")
    return None


class CutFS:
    use_ns = True

    def __init__(self, backing: Path) -> None:
        self.root = str(backing)
        self.mutex = threading.RLock()
        self.ops: list[Op] = []
        self.recording = True
        self.next_ino = [2]
        self.by_key: dict[tuple[int, int], int] = {}
        self.base: State = model.scan(backing, self.by_key, self.next_ino)
        self.names: dict[str, int] = dict(self.base.names)
        # FUSE file handle -> (backing fd, model inode). Handles are never reused: a
        # release that arrives late, after ``load`` closed everything, must not close a
        # descriptor the next process got since.
        self.handles: dict[int, tuple[int, int]] = {}
        self.next_fh = 1

    # -- model bookkeeping -------------------------------------------------------------
    def _rel(self, path: str) -> str:
        return path.lstrip("/")

    def _full(self, path: str) -> str:
        return os.path.join(self.root, self._rel(path))

    def _ino(self, rel: str) -> int:
        if rel == "":
            return 1
        ino = self.names.get(rel)
        if ino is None:  # not made through the mount (should not happen): adopt it
            s = os.lstat(os.path.join(self.root, rel))
            ino = self.by_key.setdefault((s.st_dev, s.st_ino), self.next_ino[0])
            if ino == self.next_ino[0]:
                self.next_ino[0] += 1
            self.names[rel] = ino
        return ino

    def _new_ino(self) -> int:
        ino = self.next_ino[0]
        self.next_ino[0] += 1
        return ino

    def _handle(self, fd: int, ino: int) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = (fd, ino)
        return fh

    def _fd(self, fh: int) -> int:
        try:
            return self.handles[fh][0]
        except KeyError:
            raise OSError(errno.EBADF, "handle closed by a power cut") from None

    def _parent(self, rel: str) -> int:
        return self._ino(os.path.dirname(rel))

    def _log(self, op: Op) -> None:
        if self.recording:
            self.ops.append(op)

    def load(self, state: State) -> None:
        """Make ``state`` the backing tree and the new baseline of the log."""
        with self.mutex:
            for fd, _ino in self.handles.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.handles.clear()
            model.materialize(state, Path(self.root))
            live = state.live()
            self.names = dict(live.names)
            self.by_key.clear()
            for rel, ino in live.names.items():
                s = os.lstat(os.path.join(self.root, rel))
                self.by_key[(s.st_dev, s.st_ino)] = ino
            self.next_ino[0] = max([self.next_ino[0], *live.kind]) + 1
            self.base = model.scan(Path(self.root), dict(self.by_key), [self.next_ino[0]])
            self.ops = []

    def crash_state(self, k: int | None = None, mode: str = "sync", seed: int = 0) -> State:
        with self.mutex:
            ops = list(self.ops)
        return model.crash_state(self.base, ops, len(ops) if k is None else k, mode, seed)

    # -- FUSE operations ---------------------------------------------------------------
    def _stat(self, s: os.stat_result, ino: int) -> dict[str, Any]:
        d = {k: getattr(s, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                                         "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
                                         "st_blocks", "st_blksize")}
        d["st_ino"] = ino
        d["st_atime"], d["st_mtime"], d["st_ctime"] = (s.st_atime_ns, s.st_mtime_ns,
                                                        s.st_ctime_ns)
        return d

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self.mutex:
            if fh is not None and fh in self.handles:
                fd, ino = self.handles[fh]
                return self._stat(os.fstat(fd), ino)
            rel = self._rel(path)
            s = os.lstat(self._full(path))
            return self._stat(s, self._ino(rel))

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._full(path), amode):
            raise OSError(errno.EACCES, "")
        return 0

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # Each entry with its inode: with use_ino an entry of inode 0 is a hole to the
        # kernel, and the listing comes back empty.
        with self.mutex:
            rel = self._rel(path)
            out = [(".", {"st_ino": self._ino(rel), "st_mode": stat.S_IFDIR}, 0),
                   ("..", {"st_ino": 1, "st_mode": stat.S_IFDIR}, 0)]
            for name in os.listdir(self._full(path)):
                child = os.path.join(rel, name) if rel else name
                mode = os.lstat(os.path.join(self.root, child)).st_mode
                out.append((name, {"st_ino": self._ino(child), "st_mode": mode}, 0))
            return out

    def statfs(self, path: str) -> dict[str, int]:
        s = os.statvfs(self._full(path))
        return {k: getattr(s, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize",
                                            "f_favail", "f_ffree", "f_files", "f_flag",
                                            "f_frsize", "f_namemax")}

    def open(self, path: str, flags: int) -> int:
        with self.mutex:
            rel = self._rel(path)
            ino = self._ino(rel)
            fh = self._handle(os.open(self._full(path), flags & ~(os.O_CREAT | os.O_EXCL)),
                              ino)
            if flags & os.O_TRUNC:
                self._log(Op("trunc", ino, offset=0))
            return fh

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self.mutex:
            rel = self._rel(path)
            fd = os.open(self._full(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
            ino = self._new_ino()
            self.names[rel] = ino
            fh = self._handle(fd, ino)
            self._log(Op("create", ino, path=rel, dirs=(self._parent(rel),),
                         offset=stat.S_IMODE(mode)))
            return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self.mutex:
            return os.pread(self._fd(fh), size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            n = os.pwrite(self._fd(fh), data, offset)
            self._log(Op("write", self.handles[fh][1], offset=offset, data=bytes(data[:n])))
            return n

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self.mutex:
            if fh is not None and fh in self.handles:
                fd, ino = self.handles[fh]
                os.ftruncate(fd, length)
            else:
                os.truncate(self._full(path), length)
                ino = self._ino(self._rel(path))
            self._log(Op("trunc", ino, offset=length))
            return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self.mutex:
            # The backing file is not fsynced: durability is the model's, not the disk's.
            self._fd(fh)
            self._log(Op("fsync", self.handles[fh][1]))
            return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self.mutex:
            self._log(Op("fsync", self._ino(self._rel(path))))
            return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        with self.mutex:
            fd, _ino = self.handles.pop(fh, (-1, 0))
            if fd >= 0:
                os.close(fd)
            return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self.mutex:
            rel = self._rel(path)
            os.mkdir(self._full(path), mode)
            ino = self._new_ino()
            self.names[rel] = ino
            self._log(Op("mkdir", ino, path=rel, dirs=(self._parent(rel),),
                         offset=stat.S_IMODE(mode)))
            return 0

    def rmdir(self, path: str) -> int:
        with self.mutex:
            rel = self._rel(path)
            ino = self._ino(rel)
            os.rmdir(self._full(path))
            del self.names[rel]
            self._log(Op("rmdir", ino, path=rel, dirs=(self._parent(rel),)))
            return 0

    def unlink(self, path: str) -> int:
        with self.mutex:
            rel = self._rel(path)
            ino = self._ino(rel)
            os.unlink(self._full(path))
            del self.names[rel]
            self._log(Op("unlink", ino, path=rel, dirs=(self._parent(rel),)))
            return 0

    def link(self, target: str, source: str) -> int:
        # mfusepy passes (new name, existing name)
        with self.mutex:
            dst, src = self._rel(target), self._rel(source)
            ino = self._ino(src)
            os.link(self._full(source), self._full(target))
            self.names[dst] = ino
            self._log(Op("link", ino, path=dst, dirs=(self._parent(dst),)))
            return 0

    def rename(self, old: str, new: str) -> int:
        with self.mutex:
            src, dst = self._rel(old), self._rel(new)
            if stat.S_ISDIR(os.lstat(self._full(old)).st_mode):
                raise OSError(errno.EPERM, "directory renames are not modelled")
            ino = self._ino(src)
            os.rename(self._full(old), self._full(new))
            del self.names[src]
            self.names[dst] = ino
            dirs = tuple(dict.fromkeys((self._parent(src), self._parent(dst))))
            self._log(Op("rename", ino, path=dst, src=src, dirs=dirs))
            return 0

    def chmod(self, path: str, mode: int) -> int:
        with self.mutex:
            os.chmod(self._full(path), mode)
            self._log(Op("chmod", self._ino(self._rel(path)), offset=stat.S_IMODE(mode)))
            return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._full(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        os.utime(self._full(path), ns=times)
        return 0

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    def symlink(self, target: str, source: str) -> int:
        raise OSError(errno.EPERM, "symlinks are not modelled")

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.use_ino = 1
            config.hard_remove = 1
            config.entry_timeout = 0.0
            config.attr_timeout = 0.0
            config.negative_timeout = 0.0


def kill_users(mountpoint: Path, spare: set[int]) -> list[int]:
    """SIGKILL every process but ``spare`` with its cwd, root, an open file or a mapping
    (deleted files included) under the mount, what a power cut does to them, and wait
    until they are gone; again until a pass finds none (a child forked meanwhile)."""
    killed: list[int] = []
    for _ in range(20):
        victims = _users(os.path.realpath(mountpoint), {os.getpid(), *spare, *killed})
        if not victims:
            break
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in victims:
            for _ in range(2000):
                if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
                    break
                time.sleep(0.005)
        killed += victims
    return killed


def _users(mp: str, spare: set[int]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spare:
            continue
        pid = int(entry)
        try:
            links = [os.readlink(f"/proc/{pid}/cwd"), os.readlink(f"/proc/{pid}/root")]
            links += [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(
                f"/proc/{pid}/fd")]
            with open(f"/proc/{pid}/maps") as f:
                links += [fields[5].removesuffix(" (deleted)") for line in f
                          if len(fields := line.rstrip("\n").split(maxsplit=5)) == 6]
        except OSError:
            continue
        if any(p.removesuffix(" (deleted)") == mp or p.startswith(mp + "/") for p in links):
            found.append(pid)
    return found


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _serve(backing: str, mountpoint: str, conn: Connection) -> None:
    """The server process: FUSE in a thread, the caller's commands on ``conn``."""
    import mfusepy

    fs = CutFS(Path(backing))
    failed: list[BaseException] = []

    def fuse() -> None:
        try:
            mfusepy.FUSE(fs, mountpoint, foreground=True, use_ino=True, hard_remove=True,
                         fsname="cutfs")
        except BaseException as exc:
            failed.append(exc)

    threading.Thread(target=fuse, name="cutfs", daemon=True).start()
    for _ in range(1000):
        if os.path.ismount(mountpoint) or failed:
            break
        time.sleep(0.01)
    conn.send(("up", None) if os.path.ismount(mountpoint) else
              ("err", f"FUSE mount at {mountpoint} did not come up: {failed}"))
    while True:
        try:
            cmd, args = conn.recv()
        except (EOFError, OSError):
            return  # the caller is gone; its Mount unmounts, or the kernel on our exit
        if cmd == "stop":
            return
        try:
            if cmd == "attr":  # a copy taken while no FUSE call is changing it
                with fs.mutex:
                    value = copy.copy(getattr(fs, str(args[0])))
            else:
                value = getattr(fs, cmd)(*args)
            conn.send(("ok", value))
        except Exception as exc:  # the caller raises it
            conn.send(("err", f"{cmd}: {type(exc).__name__}: {exc}"))


class RemoteFS:
    """The caller's handle on the server's ``CutFS``: its op log, baseline and states."""

    def __init__(self, conn: Connection, pid: int) -> None:
        self.conn, self.pid = conn, pid

    def _call(self, cmd: str, *args: object) -> Any:
        self.conn.send((cmd, args))
        if not self.conn.poll(300):
            raise RuntimeError(f"the FUSE server (pid {self.pid}) did not answer {cmd}")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"the FUSE server failed: {value}")
        return value

    @property
    def ops(self) -> list[Op]:
        return self._call("attr", "ops")

    @property
    def base(self) -> State:
        return self._call("attr", "base")

    def load(self, state: State) -> None:
        """Make ``state`` the backing tree and the new baseline of the log."""
        self._call("load", state)

    def crash_state(self, k: int | None = None, mode: str = "sync", seed: int = 0) -> State:
        return self._call("crash_state", k, mode, seed)

    def power_cut(self, mountpoint: Path, mode: str = "sync", seed: int = 0) -> list[int]:
        """SIGKILL every process using the mount, then keep only what the cut may leave.
        Returns the pids killed."""
        killed = kill_users(mountpoint, {self.pid})
        self.load(self.crash_state(mode=mode, seed=seed))
        return killed


class Mount:
    """``CutFS`` over ``backing`` mounted at ``mountpoint`` by a server process of its
    own (``python -m powercut.fs``; see the module's docstring for why); unmounted on
    exit."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing, self.mountpoint = backing, mountpoint
        self.proc: subprocess.Popen[bytes] | None = None
        self.fs: RemoteFS

    def __enter__(self) -> Mount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        mine, theirs = socket.socketpair()
        # The caller's import path, so the server imports this very module.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "powercut.fs", str(self.backing),
                                      str(self.mountpoint), str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        conn = Connection(mine.detach())
        self.fs = RemoteFS(conn, self.proc.pid)
        try:
            if not conn.poll(60):
                raise RuntimeError(f"FUSE server for {self.mountpoint} did not start")
            status, value = conn.recv()
            if status != "up":
                raise RuntimeError(value)
        except EOFError:
            self.__exit__()
            raise RuntimeError(f"FUSE server for {self.mountpoint} exited at start") from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def remount(self) -> None:
        """A new server for the same tree (after the old one died); the caller loads the
        state it wants next."""
        self.__exit__()
        self.__enter__()

    def __exit__(self, *exc: object) -> None:
        pid = self.proc.pid if self.proc is not None else None
        kill_users(self.mountpoint, {pid} if pid else set())
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False,
                       capture_output=True)
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.fs.conn.send(("stop", ()))
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.fs.conn.close()
            self.proc = None


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], Connection(int(sys.argv[3])))
