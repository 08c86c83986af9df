"""Control of the app unit, behind a narrow protocol.

``Systemctl`` is the real implementation (it shells out to ``systemctl``, whose path is
configurable so tests can point it at a stand-in executable); ``NoUnit`` is for
machines without the app (``app_unit: null``). Stopping waits until the unit is really
inactive; starting is followed by a health gate that requires the unit to stay active.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Protocol

from .errors import MigrateError


class UnitError(MigrateError):
    kind = "unit"


class ServiceManager(Protocol):
    def stop(self, timeout: float, tick: Callable[[], None] | None = None) -> None: ...
    def start(self) -> None: ...
    def is_active(self) -> bool: ...
    def health_gate(self, seconds: float, tick: Callable[[], None] | None = None) -> None: ...
    @property
    def name(self) -> str | None: ...


class NoUnit:
    """``app_unit: null``: there is no app to stop or start on this machine."""

    name = None

    def stop(self, timeout: float, tick: Callable[[], None] | None = None) -> None:
        return None

    def start(self) -> None:
        return None

    def is_active(self) -> bool:
        return True

    def health_gate(self, seconds: float, tick: Callable[[], None] | None = None) -> None:
        return None


class Systemctl:
    def __init__(self, unit: str, systemctl: str = "systemctl") -> None:
        self.unit = unit
        self.systemctl = systemctl

    @property
    def name(self) -> str:
        return self.unit

    def _run(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        try:
            proc = subprocess.run([self.systemctl, *args, self.unit], capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except FileNotFoundError:
            raise UnitError(f"'{self.systemctl}' not found: this machine has no systemd; set "
                            "app_unit: null in the config if there is no app unit") from None
        except subprocess.TimeoutExpired:
            raise UnitError(f"systemctl {' '.join(args)} {self.unit} did not answer in "
                            f"{timeout:.0f} s") from None
        if check and proc.returncode != 0:
            raise UnitError(f"systemctl {' '.join(args)} {self.unit} failed "
                            f"(exit {proc.returncode}): {proc.stderr.strip() or proc.stdout}")
        return proc.stdout.strip()

    def state(self) -> str:
        return self._run("is-active", check=False) or "unknown"

    def is_active(self) -> bool:
        return self.state() == "active"

    def stop(self, timeout: float, tick: Callable[[], None] | None = None) -> None:
        # --no-block and poll: the caller keeps feeding the watchdog while the app stops.
        self._run("stop", "--no-block", timeout=30)
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state in ("inactive", "failed", "unknown"):
                return
            if time.monotonic() > deadline:
                raise UnitError(f"{self.unit} is still {state} {timeout:.0f} s after stop")
            if tick:
                tick()
            time.sleep(0.05)

    def start(self) -> None:
        self._run("start")

    def health_gate(self, seconds: float, tick: Callable[[], None] | None = None) -> None:
        """The unit must be active now and stay active, without restarts, for ``seconds``."""
        deadline = time.monotonic() + seconds
        first = self._restarts()
        while True:
            state = self.state()
            if state != "active":
                raise UnitError(f"{self.unit} is {state} during the {seconds:g} s health gate")
            if self._restarts() != first:
                raise UnitError(f"{self.unit} restarted during the {seconds:g} s health gate")
            if tick:
                tick()
            if time.monotonic() >= deadline:
                return
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _restarts(self) -> str:
        return self._run("show", "-p", "NRestarts", "--value", check=False)


class ProcessUnit:
    """A child process standing in for the app unit where there is no systemd (the
    demo). It counts as started once it prints ``READY``, like ``Type=notify``."""

    def __init__(self, argv: list[str], name: str = "demo-monitor",
                 ready_timeout: float = 15.0) -> None:
        self.argv = argv
        self._name = name
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[str] | None = None

    @property
    def name(self) -> str:
        return self._name

    def start(self) -> None:
        if self.is_active():
            return
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until READY or exit
        if line.strip() != "READY":
            code = self.proc.wait(timeout=self.ready_timeout)
            raise UnitError(f"{self._name} exited with code {code} before it was ready")

    def stop(self, timeout: float, tick: Callable[[], None] | None = None) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def is_active(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health_gate(self, seconds: float, tick: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if not self.is_active():
                code = self.proc.returncode if self.proc else None
                raise UnitError(f"{self._name} exited with code {code} during the "
                                f"{seconds:g} s health gate")
            if tick:
                tick()
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)


def for_unit(unit: str | None, systemctl: str = "systemctl") -> ServiceManager:
    return NoUnit() if unit is None else Systemctl(unit, systemctl)
