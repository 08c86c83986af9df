"""Every failure the product can report, named by what happened to the user's data.

The CLI maps each class to its documented exit code through ``exit_code``; nothing else
decides exit codes. The classes say where the run stopped, so an operator reading one
knows whether the database was touched:

- ``UsageError`` / ``ConfigError`` (2): nothing was attempted.
- ``BundleRejected`` (3): the bundle or source failed verification or lint; nothing touched.
- ``PrecheckFailed`` (4): the live database or the rehearsal failed; app never stopped.
- ``MigrationFailed`` (5): the run failed after the stop; the backup is back in place
  and the app runs on the old database (``restored=True``).
- ``RestoreFailed`` (6): the restore itself failed; manual action is needed.
- ``LockHeld`` (7): another run holds the lock.
- ``MigrationSqlError`` is raised by the engine for one failing migration; the pipeline
  wraps it into one of the above according to the phase it happened in.
"""

from __future__ import annotations


class MigrateError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1
    kind = "internal"

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "message": self.message, "exit_code": self.exit_code}


class UsageError(MigrateError):
    exit_code = 2
    kind = "usage"


class ConfigError(UsageError):
    kind = "config"


class BundleRejected(MigrateError):
    """The bundle (or source) is not acceptable; nothing on the device was touched."""

    exit_code = 3
    kind = "malformed"


class LintFailed(BundleRejected):
    kind = "lint"


class PrecheckFailed(MigrateError):
    """The live database or the rehearsal failed; the app was never stopped."""

    exit_code = 4
    kind = "precheck"


class MigrationFailed(MigrateError):
    """The run failed after the app was stopped; the old database is back in place."""

    exit_code = 5
    kind = "migration-failed"

    def __init__(self, message: str, *, kind: str | None = None, restored: bool = True) -> None:
        super().__init__(message, kind=kind)
        self.restored = restored


class RestoreFailed(MigrateError):
    """Putting the backup back failed: the app is left stopped, every file is kept."""

    exit_code = 6
    kind = "restore-failed"


class RestoreBlocked(RestoreFailed):
    """An earlier run could not restore its backup: no new run starts until an operator
    has restored one. Not the new bundle's fault (the daemon keeps it)."""

    kind = "restore-blocked"


class StopInterrupted:
    """Mixed into the errors of a run that ended at a safe point because a stop was
    requested or its downtime budget ran out: the daemon keeps such a bundle for its next
    start, and the run's outcome is "interrupted"."""

    kind = "interrupted"


class InterruptedBeforeStop(StopInterrupted, PrecheckFailed):
    """Stopped before the app was: nothing was changed (exit 4)."""


class RunInterrupted(StopInterrupted, MigrateError):
    """Stopped while the copy was migrated; the pipeline restores and raises
    ``MigrationInterrupted``."""


class MigrationInterrupted(StopInterrupted, MigrationFailed):
    """Stopped after the app was: the old database is back in place (exit 5)."""


class LockHeld(MigrateError):
    exit_code = 7
    kind = "locked"


class MigrationSqlError(MigrateError):
    """One migration failed and its transaction was rolled back.

    Names the file, the line of the failing statement and SQLite's own message.
    """

    kind = "sql"

    def __init__(self, path: str, line: int, sqlite_message: str, *, version: int) -> None:
        super().__init__(f"{path}:{line}: {sqlite_message}")
        self.path = path
        self.line = line
        self.sqlite_message = sqlite_message
        self.version = version


class PlanError(MigrateError):
    """The source and the database disagree (edited applied migration, gap, missing rollback)."""

    exit_code = 4
    kind = "plan"
