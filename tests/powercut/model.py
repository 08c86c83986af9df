"""What a power cut leaves on disk: the worst case POSIX allows, computed from an op log.

The FUSE layer (``fs.py``) appends one ``Op`` per durability-relevant call. A *cut at k*
keeps some of ``ops[:k]`` and drops the rest; what it must keep:

- a data op (``write``, ``trunc``, ``chmod``) on an inode is durable once that inode is
  fsynced (``fsync``/``fdatasync``) after it;
- a name op (``create``, ``mkdir``, ``link``, ``unlink``, ``rmdir``, ``rename``) is durable
  once every directory it changes is fsynced after it. A file's own fsync does not make
  its name durable (ext4 happens to; POSIX does not promise it).

Modes of a cut:

- ``sync``: only the durable ops (the harshest state; it changes only at an fsync);
- ``all``: every op up to k (what a SIGKILL leaves: the page cache survives);
- ``subset``: the durable ops plus a seeded arbitrary subset of the others, applied in
  log order (the page cache written back in any order, directory updates reordered);
- ``torn``: as ``subset``, but an unsynced write is kept sector by sector (``SECTOR``
  bytes, each kept or not): a write the cut caught half-way through the disk, with a
  hole of zeros where a kept sector lies past a lost one.

A state is rebuilt from the baseline (the tree when recording began) by applying the
kept ops by inode, so a ``link`` whose source ``create`` was dropped still binds its
inode, and a name whose parent directory did not survive is gone with it. Directory
renames are not modelled (the fs refuses them).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
import shutil
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

DATA_OPS = frozenset({"write", "trunc", "chmod"})
MODES = ("sync", "all", "subset", "torn")
# The unit a disk writes whole; 512 is the smallest a disk reports and so the most
# torn (SQLite itself assumes no more).
SECTOR = 512
NAME_OPS = frozenset({"create", "mkdir", "link", "unlink", "rmdir", "rename"})


@dataclass(frozen=True)
class Op:
    kind: str  # write trunc chmod | create mkdir link unlink rmdir rename | fsync
    ino: int  # the inode written, named, unnamed or fsynced
    path: str = ""  # create mkdir link(dst) unlink rmdir rename(dst)
    src: str = ""  # rename's source
    dirs: tuple[int, ...] = ()  # inodes of the directories a name op changes
    offset: int = 0  # write: offset; trunc: new size; chmod: mode
    data: bytes = b""

    def __str__(self) -> str:
        if self.kind == "write":
            return f"write ino {self.ino} @{self.offset} +{len(self.data)}"
        if self.kind == "rename":
            return f"rename {self.src} -> {self.path}"
        if self.kind in NAME_OPS:
            return f"{self.kind} {self.path}"
        return f"{self.kind} ino {self.ino}" + (f" {self.offset}" if self.kind != "fsync" else "")


@dataclass
class State:
    """A tree: relative path → inode ('' is the root, never listed), and per inode its
    kind ('f' or 'd'), bytes and permission bits."""

    names: dict[str, int] = field(default_factory=dict)
    kind: dict[int, str] = field(default_factory=dict)
    data: dict[int, bytes] = field(default_factory=dict)
    mode: dict[int, int] = field(default_factory=dict)

    def copy(self) -> State:
        return State(dict(self.names), dict(self.kind), dict(self.data), dict(self.mode))

    def live(self) -> State:
        """Only the names whose every ancestor directory is still there."""
        out = State(kind=self.kind, data=self.data, mode=self.mode)
        for path in sorted(self.names, key=lambda p: p.count("/")):
            parent = os.path.dirname(path)
            if parent == "" or (parent in out.names and self.kind[out.names[parent]] == "d"):
                out.names[path] = self.names[path]
        return out

    def digest(self) -> str:
        """Equal for two trees with the same names, bytes, modes and hard-link groups."""
        h = hashlib.sha256()
        first: dict[int, str] = {}
        for path in sorted(self.names):
            ino = self.names[path]
            h.update(f"{path}\0{self.kind[ino]}\0{self.mode.get(ino, 0):o}\0".encode())
            if ino in first:
                h.update(f"=>{first[ino]}\0".encode())
                continue
            first[ino] = path
            if self.kind[ino] == "f":
                h.update(hashlib.sha256(self.data.get(ino, b"")).digest())
        return h.hexdigest()


def scan(root: Path, ino_of: dict[tuple[int, int], int] | None = None,
         next_ino: list[int] | None = None) -> State:
    """The tree under ``root`` as a State. Inodes are numbered from ``next_ino`` (hard
    links share one), or taken from ``ino_of`` (backing (dev, ino) → model inode)."""
    st = State()
    counter = next_ino if next_ino is not None else [2]
    seen: dict[tuple[int, int], int] = {} if ino_of is None else ino_of
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames) + sorted(filenames):
            full = os.path.join(dirpath, name)
            s = os.lstat(full)
            rel = os.path.relpath(full, root)
            key = (s.st_dev, s.st_ino)
            if key not in seen:
                seen[key] = counter[0]
                counter[0] += 1
            ino = seen[key]
            st.names[rel] = ino
            st.mode[ino] = stat.S_IMODE(s.st_mode)
            if stat.S_ISDIR(s.st_mode):
                st.kind[ino] = "d"
            elif stat.S_ISREG(s.st_mode):
                st.kind[ino] = "f"
                if ino not in st.data:
                    st.data[ino] = Path(full).read_bytes()
            else:
                raise ValueError(f"{full}: only files and directories are modelled")
    return st


def materialize(state: State, root: Path) -> dict[str, int]:
    """Write ``state`` into the (emptied) directory ``root``; returns path → model inode
    for what was written."""
    for child in list(root.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    live = state.live()
    placed: dict[int, str] = {}
    written: dict[str, int] = {}
    for path in sorted(live.names, key=lambda p: (p.count("/"), p)):
        ino = live.names[path]
        full = root / path
        if live.kind[ino] == "d":
            full.mkdir()
        elif ino in placed:
            os.link(root / placed[ino], full)
        else:
            full.write_bytes(live.data.get(ino, b""))
            placed[ino] = path
        os.chmod(full, live.mode.get(ino, 0o644 if live.kind[ino] == "f" else 0o755))
        written[path] = ino
    return written


def durable_after(ops: list[Op]) -> list[int]:
    """For each op, the index of the fsync that makes it durable (len(ops) if none)."""
    syncs: dict[int, list[int]] = defaultdict(list)
    for i, op in enumerate(ops):
        if op.kind == "fsync":
            syncs[op.ino].append(i)
    n = len(ops)

    def next_sync(ino: int, i: int) -> int:
        lst = syncs.get(ino, [])
        j = bisect.bisect_right(lst, i)
        return lst[j] if j < len(lst) else n

    out = []
    for i, op in enumerate(ops):
        if op.kind in DATA_OPS:
            out.append(next_sync(op.ino, i))
        elif op.kind in NAME_OPS:
            out.append(max((next_sync(d, i) for d in op.dirs), default=n))
        else:
            out.append(-1)  # an fsync: nothing of its own to lose
    return out


def apply_op(state: State, op: Op) -> None:
    if op.kind == "write":
        buf = bytearray(state.data.get(op.ino, b""))
        end = op.offset + len(op.data)
        if len(buf) < op.offset:
            buf.extend(b"\0" * (op.offset - len(buf)))
        buf[op.offset:end] = op.data
        state.data[op.ino] = bytes(buf)
    elif op.kind == "trunc":
        buf = state.data.get(op.ino, b"")
        state.data[op.ino] = buf[:op.offset] + b"\0" * max(0, op.offset - len(buf))
    elif op.kind == "chmod":
        state.mode[op.ino] = op.offset
    elif op.kind in ("create", "mkdir"):
        state.kind.setdefault(op.ino, "d" if op.kind == "mkdir" else "f")
        state.mode.setdefault(op.ino, op.offset)
        if op.kind == "create":
            state.data.setdefault(op.ino, b"")
        state.names[op.path] = op.ino
    elif op.kind == "link":
        state.names[op.path] = op.ino
    elif op.kind in ("unlink", "rmdir"):
        if state.names.get(op.path) == op.ino:
            del state.names[op.path]
    elif op.kind == "rename":
        if state.names.get(op.src) == op.ino:
            del state.names[op.src]
        state.names[op.path] = op.ino


def crash_state(base: State, ops: list[Op], k: int, mode: str = "sync", seed: int = 0,
                durable: list[int] | None = None) -> State:
    """The tree a power cut before ``ops[k]`` may leave (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(mode)
    durable = durable if durable is not None else durable_after(ops)
    rng = random.Random(seed)
    state = base.copy()
    # An inode exists once created, whether or not the name it was created under
    # survives: a later link or rename may bind it.
    for op in ops[:k]:
        if op.kind in ("create", "mkdir") and op.ino not in state.kind:
            state.kind[op.ino] = "d" if op.kind == "mkdir" else "f"
            state.mode[op.ino] = op.offset
            if op.kind == "create":
                state.data[op.ino] = b""
    for i in range(k):
        op = ops[i]
        if op.kind == "fsync":
            continue
        if mode == "all" or durable[i] < k:
            apply_op(state, op)
        elif mode == "torn" and op.kind == "write":
            for piece in sectors(op):
                if rng.random() < 0.5:
                    apply_op(state, piece)
        elif mode in ("subset", "torn") and rng.random() < 0.5:
            apply_op(state, op)
    return state


def sectors(op: Op) -> list[Op]:
    """A write split at ``SECTOR`` boundaries of the file."""
    out = []
    start = op.offset
    end = op.offset + len(op.data)
    while start < end:
        stop = min(end, (start // SECTOR + 1) * SECTOR)
        out.append(Op("write", op.ino, offset=start,
                      data=op.data[start - op.offset:stop - op.offset]))
        start = stop
    return out


def unsynced_count(ops: list[Op], k: int, durable: list[int]) -> int:
    return sum(1 for i in range(k) if ops[i].kind != "fsync" and durable[i] >= k)
