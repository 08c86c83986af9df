"""A Debian 12 device under a real systemd, for the end-to-end tests.

``RootfsCache`` builds a minimal bookworm root filesystem with debootstrap from the
host's own Debian mirror, adds the packages a device has (systemd, dbus, python3,
sqlite3, the daemon's Python dependencies, mender-client, mender-artifact) and keeps it
under /var/cache/zmonitor-e2e/ keyed by a hash of everything that went into it, so
reruns on the same machine skip the ~1 minute build.

``Device`` boots a throw-away overlay of that cache with
``systemd-nspawn --boot --register=no --keep-unit`` and runs commands inside through
``nsenter`` into the container's PID 1 (the host need not run systemd). Nothing here
knows about the daemon: the fixtures in conftest.py install the .deb and the app.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

CACHE_DIR = Path(os.environ.get("ZMONITOR_E2E_CACHE", "/var/cache/zmonitor-e2e"))
SUITE = "bookworm"
# Bump when the way the cache is built changes without the package list changing.
RECIPE = "3"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "sqlite3", "ca-certificates")
DEVICE_PACKAGES = (
    "python3-yaml",
    "python3-cryptography",
    "python3-watchdog",
    "python3-sdnotify",
    "mender-client",
    "mender-artifact",
)
CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


class DeviceError(RuntimeError):
    pass


def host_mirror(suite: str = SUITE, default: str = "http://deb.debian.org/debian") -> str:
    """The mirror the host's own apt uses for SUITE (deb822 or one-line sources)."""
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", src.read_text(encoding="utf-8")):
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            uri = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            if suites and uri and suite in suites.group(1).split():
                return uri.group(1)
    lists = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]
    for lst in lists:
        if lst.exists():
            for line in lst.read_text(encoding="utf-8").splitlines():
                m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s", line)
                if m and m.group(2) == suite:
                    return m.group(1)
    return default


def _sh(cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=True, text=True, **kw)  # type: ignore[call-overload]


class RootfsCache:
    """A cached, read-only Debian 12 device root filesystem."""

    def __init__(self, cache_dir: Path = CACHE_DIR) -> None:
        self.cache_dir = cache_dir
        self.mirror = host_mirror()
        self.security = host_mirror(f"{SUITE}-security", "http://deb.debian.org/debian-security")
        key = "\n".join([RECIPE, SUITE, self.mirror, self.security, *BASE_PACKAGES,
                         *DEVICE_PACKAGES])
        self.key = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.path = cache_dir / f"rootfs-{SUITE}-{self.key}"

    def ensure(self, log: Path) -> tuple[Path, bool]:
        """Return (path, built_now). Builds into a temp dir and renames it into place."""
        if (self.path / ".complete").exists():
            return self.path, False
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f".build-{self.key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with log.open("a", encoding="utf-8") as out:
            _sh(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                 SUITE, str(tmp), self.mirror], stdout=out, stderr=subprocess.STDOUT)
            # Security and updates suites like the host, so apt resolves what a device gets.
            (tmp / "etc/apt/sources.list").write_text(
                f"deb {self.mirror} {SUITE} main\n"
                f"deb {self.mirror} {SUITE}-updates main\n"
                f"deb {self.security} {SUITE}-security main\n",
                encoding="utf-8",
            )
            # No service may start while packages are installed into the image.
            policy = tmp / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n", encoding="utf-8")
            policy.chmod(0o755)
            self._in_root(tmp, ["apt-get", "update", "-qq"], out)
            self._in_root(tmp, ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                *DEVICE_PACKAGES], out)
            self._in_root(tmp, ["apt-get", "clean"], out)
            policy.unlink()
            # A standalone device: no fleet server, so mender-client's daemon stays off;
            # `mender install/commit/rollback` drive the update module directly.
            for unit in ("mender-client.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                         "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer"):
                self._in_root(tmp, ["systemctl", "mask", unit], out, check=False)
            (tmp / "etc/hostname").write_text("zmonitor-e2e\n", encoding="utf-8")
            (tmp / "etc/machine-id").write_text("", encoding="utf-8")
            (tmp / ".complete").write_text(self.key + "\n", encoding="utf-8")
        if self.path.exists():
            shutil.rmtree(self.path)
        tmp.rename(self.path)
        for old in self.cache_dir.glob(f"rootfs-{SUITE}-*"):
            if old != self.path:
                shutil.rmtree(old, ignore_errors=True)
        return self.path, True

    @staticmethod
    def _in_root(root: Path, cmd: Sequence[str], out: object, check: bool = True) -> None:
        """Run a command in the image (not booted) with proper /proc, /dev and network."""
        subprocess.run(
            ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(root),
             "--setenv=DEBIAN_FRONTEND=noninteractive", "--pipe", "--", *cmd],
            check=check, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True,
        )


class Overlay:
    """A writable view of a read-only lower directory: overlayfs, or a copy."""

    def __init__(self, lower: Path, work: Path) -> None:
        self.lower = lower
        self.work = work
        self.merged = work / "root"
        self.mounted = False

    def __enter__(self) -> Path:
        upper, wdir = self.work / "upper", self.work / "ovl-work"
        for d in (upper, wdir, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.lower},upperdir={upper},workdir={wdir}", str(self.merged)],
            capture_output=True, text=True,
        )
        if res.returncode == 0:
            self.mounted = True
        else:
            shutil.rmtree(self.merged)
            _sh(["cp", "-a", "--reflink=auto", str(self.lower), str(self.merged)])
        return self.merged

    def __exit__(self, *exc: object) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.merged)], check=False)
        shutil.rmtree(self.work, ignore_errors=True)


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the nspawn child: get SIGTERM when the test session dies, however it dies.
    SIGTERM makes systemd-nspawn power the container off cleanly."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def stale_containers(prefix: str = "zmonitor-e2e-") -> list[tuple[int, int]]:
    """(nspawn pid, session pid) of containers this harness booted for a test session
    that no longer exists (a session killed before its teardown)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if not argv or not argv[0].endswith(b"systemd-nspawn"):
                continue
            for arg in argv:
                m = re.fullmatch(rb"--machine=" + re.escape(prefix.encode()) + rb"(\d+)", arg)
                if m and not Path(f"/proc/{int(m.group(1))}").exists():
                    found.append((int(proc.name), int(m.group(1))))
    return found


def stop_stale_containers() -> None:
    """Power off the containers of dead test sessions (SIGTERM to their own nspawn)."""
    for nspawn_pid, _session in stale_containers():
        with contextlib.suppress(ProcessLookupError):
            os.kill(nspawn_pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{nspawn_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            if Path(f"/proc/{nspawn_pid}").exists():
                os.kill(nspawn_pid, signal.SIGKILL)


class Device:
    """A booted container. ``run`` executes inside it as root."""

    def __init__(self, root: Path, log: Path, name: str = "zmonitor-e2e") -> None:
        self.root = root
        self.log = log
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    # -- lifecycle ---------------------------------------------------------------
    def boot(self, timeout: float = 90.0) -> None:
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "-D", str(self.root),
             f"--machine={self.name}", "--console=passive", "--timezone=off",
             "--link-journal=no"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while not self.leader:
            self._check_alive()
            self.leader = self._find_leader()
            if time.monotonic() > deadline:
                raise DeviceError(f"container init never appeared; see {self.log}")
            time.sleep(0.1)
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            res = self.run(["systemctl", "is-system-running"], check=False)
            state = res.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.3)
        failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
        raise DeviceError(f"container did not finish booting ({state!r}); failed: {failed}")

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise DeviceError(f"systemd-nspawn exited with {self.proc.returncode}:\n{tail}")

    def _find_leader(self) -> int:
        """PID (host view) of the container's init: the nspawn process's child."""
        assert self.proc is not None
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                for pid in (task / "children").read_text().split():
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    if comm == "systemd":
                        return int(pid)
        return 0

    def shutdown(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    # -- commands ----------------------------------------------------------------
    def run(self, cmd: Sequence[str] | str, *, check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run CMD (argv, or a string for /bin/sh -c) inside the container."""
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full = ["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net",
                "--pid", "--root", "--wd", "--", "env", "-i",
                *(f"{k}={v}" for k, v in CONTAINER_ENV.items()), *argv]
        res = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                             input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise DeviceError(
                f"in container: {argv!r} exited {res.returncode}\n"
                f"stdout: {res.stdout[-4000:]}\nstderr: {res.stderr[-4000:]}"
            )
        return res

    def path(self, inside: str) -> Path:
        """The host path of a file inside the container (the overlay is shared)."""
        return self.root / inside.lstrip("/")

    def put(self, data: bytes, inside: str, mode: int = 0o644) -> None:
        """Write a file in the container and rename it into place there."""
        dest = self.path(inside)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        tmp.rename(dest)
