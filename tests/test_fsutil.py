"""The file primitives every writer goes through (zmonitor_migrated.fsutil): what each
leaves on disk when it succeeds and when the writing fails, and its exact modes."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from zmonitor_migrated import fsutil


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_with_the_mode_under_the_umask(tmp_path: Path,
                                                             umask_022: None) -> None:
    target = tmp_path / "j.json"
    target.write_bytes(b"old")
    fsutil.atomic_write(target, b"new", mode=0o666)
    assert target.read_bytes() == b"new" and _mode(target) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.json"]


def test_a_failed_atomic_writer_leaves_the_target_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.zmb"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), \
            fsutil.atomic_output(tmp_path, target, prefix=".out.", suffix=".tmp") as pending:
        pending.file.write(b"half")
        raise RuntimeError("the writer failed")
    with pytest.raises(IsADirectoryError):  # the rename itself fails
        fsutil.atomic_write(tmp_path, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zmb"]
    assert target.read_bytes() == b"old"


def test_atomic_output_modes_and_a_name_decided_after_writing(tmp_path: Path,
                                                              umask_022: None) -> None:
    with fsutil.atomic_output(tmp_path, tmp_path / "b.zmb", prefix=".b.", mode=0o644) as p:
        p.file.write(b"bundle")
    assert _mode(tmp_path / "b.zmb") == 0o644
    with fsutil.atomic_output(tmp_path, prefix=".incoming-") as p:
        p.file.write(b"copy")
        p.target = tmp_path / "by-hash.zmb"
    assert (tmp_path / "by-hash.zmb").read_bytes() == b"copy"
    assert _mode(tmp_path / "by-hash.zmb") == 0o600  # mkstemp's, kept without a mode
    with pytest.raises(ValueError), fsutil.atomic_output(tmp_path, prefix=".x-"):
        pass  # no target was ever named
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.zmb", "by-hash.zmb"]


def test_write_new_never_overwrites_nor_follows_and_sets_the_exact_mode(
        tmp_path: Path, umask_022: None) -> None:
    fsutil.write_new(tmp_path / "k.pub", b"pub", 0o666)
    assert _mode(tmp_path / "k.pub") == 0o666  # exact, whatever the umask
    with pytest.raises(FileExistsError):
        fsutil.write_new(tmp_path / "k.pub", b"again", 0o644)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        fsutil.write_new(tmp_path / "link", b"x", 0o600)
    assert not (tmp_path / "elsewhere").exists()


def test_link_new_never_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "why.reason.json"
    fsutil.link_new(target, b"first")
    with pytest.raises(FileExistsError):
        fsutil.link_new(target, b"second")
    assert target.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["why.reason.json"]


def test_sha256_and_size(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc" * 1_000_000)
    digest, size = fsutil.sha256_and_size(f)
    assert size == 3_000_000 and digest == fsutil.sha256_file(f)
    (tmp_path / "empty").touch()
    assert fsutil.sha256_and_size(tmp_path / "empty") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", 0)


def test_in_background_runs_in_a_named_daemon_thread_and_reraises(tmp_path: Path) -> None:
    seen: list[threading.Thread] = []

    def job(path: Path) -> str:
        seen.append(threading.current_thread())
        return path.name

    assert fsutil.InBackground(job, tmp_path / "a").result() == "a"
    assert seen[0].daemon and seen[0].name == "job" and seen[0] is not threading.main_thread()
    assert fsutil.InBackground(job, tmp_path / "b", name="hasher").result() == "b"
    assert seen[1].name == "hasher"
    with pytest.raises(FileNotFoundError):
        fsutil.InBackground(fsutil.sha256_file, tmp_path / "missing").result()
