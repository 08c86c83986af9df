"""Run history (one JSON object a line, fsynced) and Prometheus textfile metrics.

The history is append-only: each finished run adds one record with its phase timings,
downtime, per-table row counts and DB size before and after, backup, outcome and error.
Metrics are derived from the history every time (never counted separately), so they
cannot drift from it; they are written atomically for node_exporter's textfile collector.

A record carries text from outside (the bundle's file name, error messages with SQLite's
text): every string in it is ``text.clean``ed before it is written, so a record is one
line of valid UTF-8 JSON holding no control characters even once decoded, and a label
value is escaped as the Prometheus text format requires. ``read`` takes whatever the
file holds (a torn line, bytes that are not UTF-8, a line that is not an object) without
failing; ``render`` prints each run as one cleaned line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .fsutil import atomic_write, fsync_dir, make_dirs
from .journal import Outcome, Phase
from .text import clean, clean_tree, prom_label

# An error message in a record is kept whole up to this; SQLite's own texts are short.
MAX_FIELD_CHARS = 8000

RESTORING_OUTCOMES = (Outcome.RESTORED, Outcome.RECOVERED_OLD, Outcome.ROLLED_BACK)


def append(path: Path, record: dict[str, Any]) -> None:
    """Append one record, durable when this returns: the line is fsynced, and so is
    the file's name in its directory (else a power cut could take the whole history
    with it). Every time, not only when this line creates the file: a writer killed
    between the two fsyncs left a name nothing had made durable. Runs are rare."""
    make_dirs(path.parent)
    line = json.dumps(clean_tree(record, limit=MAX_FIELD_CHARS), sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def read(path: Path) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    # Only "\n" ends a record (json.dumps never writes one inside), not the other
    # separators str.splitlines knows.
    for line in data.decode("utf-8", "surrogateescape").split("\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line after a power cut: the run it described is re-recorded
        if isinstance(record, dict):
            records.append(clean_tree(record))
    return records


def _num(value: Any) -> float:
    """A record's number, 0 for anything else (a hand-edited or damaged record)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return 0.0
    return float(value)


# -- human text ---------------------------------------------------------------------------
def _seconds(value: object) -> str:
    return f"{value:.2f} s" if isinstance(value, int | float) else "-"


def _size(value: object) -> str:
    return f"{value / 1e6:.1f} MB" if isinstance(value, int | float) else "?"


def _phases(times: object) -> str:
    """Phase times in the order a run goes through them (the record stores a mapping,
    which JSON sorts by name)."""
    if not isinstance(times, dict) or not times:
        return ""
    order = {p.value: i for i, p in enumerate(Phase)}
    names = sorted(times, key=lambda n: (order.get(n, len(order)), n))
    return ", ".join(f"{n} {_seconds(times[n])}" for n in names)


def _count(value: object) -> str:
    """A row count as read from a record that may have been edited by hand."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    return f"{value:,}" if ok else str(value)


def _rows(before: object, after: object) -> str:
    before = before if isinstance(before, dict) else {}
    after = after if isinstance(after, dict) else {}
    parts = []
    for table in sorted(set(before) | set(after)):
        b, a = before.get(table), after.get(table)
        if a is None or a == b:
            parts.append(f"{table} {_count(b)}")
        else:
            parts.append(f"{table} {_count(b)} → {_count(a)}")
    return ", ".join(parts)


def summary(r: dict[str, Any]) -> str:
    """One line for a run: what ran, how it ended, the versions and the downtime."""
    what = r.get("operation") or "apply"
    if r.get("bundle"):
        what = f"bundle {r['bundle']}" + (f" sequence {r['sequence']}"
                                          if r.get("sequence") else "")
    line = f"{r.get('run_id')}  {r.get('outcome')}  {what}"
    if r.get("from_version") is not None and r.get("to_version") is not None:
        line += f", version {r['from_version']} → {r['to_version']}"
    if r.get("downtime_s") is not None:
        line += f", downtime {_seconds(r['downtime_s'])}"
    elif r.get("from_version") is not None:
        line += ", app not stopped"
    if r.get("duration_s") is not None:
        line += f", took {_seconds(r['duration_s'])}"
    return line


def describe(r: dict[str, Any]) -> list[str]:
    """A run for an operator: the summary, then phases in run order, database size and
    rows before and after, the backup, the database a restore replaced, the error."""
    lines = [summary(r)]
    phases = _phases(r.get("phase_times"))
    if phases:
        lines.append(f"  phases: {phases}")
    if r.get("db_size_before") is not None:
        size = _size(r["db_size_before"])
        if r.get("db_size_after") is not None:
            size += f" → {_size(r['db_size_after'])}"
        lines.append(f"  database size: {size}")
    rows = _rows(r.get("rows_before"), r.get("rows_after"))
    if rows:
        lines.append(f"  rows: {rows}")
    if r.get("backup"):
        lines.append(f"  backup: {r['backup']}")
    if r.get("replaced"):
        lines.append(f"  replaced database kept: {r['replaced']}")
    error = r.get("error")
    if isinstance(error, dict):
        lines.append(f"  error [{error.get('kind')}]: {error.get('message')}")
    return lines


def render(records: list[dict[str, Any]]) -> list[str]:
    """``zmonitor-migrate history``: each run described, every line cleaned (names and
    messages in a record come from bundles and SQL errors)."""
    return [clean(line) for r in records for line in describe(r)]


def render_metrics(records: list[dict[str, Any]], *, current_version: int | None,
                   db_size: int | None) -> str:
    by_outcome: dict[str, int] = {}
    for r in records:
        outcome = prom_label(r.get("outcome", "unknown"))
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
    lines = [
        "# HELP zmonitor_migrate_runs_total Migration runs by outcome.",
        "# TYPE zmonitor_migrate_runs_total counter",
    ]
    lines += [f'zmonitor_migrate_runs_total{{outcome="{o}"}} {n}'
              for o, n in sorted(by_outcome.items())]
    restores = sum(1 for r in records if r.get("outcome") in RESTORING_OUTCOMES
                   or r.get("restored"))
    lines += ["# HELP zmonitor_migrate_restores_total Runs that put a backup back or rolled "
              "back.", "# TYPE zmonitor_migrate_restores_total counter",
              f"zmonitor_migrate_restores_total {restores}"]
    # Every run's downtime counts, an interrupted one's too (recorded by the recovery
    # or restore that started the app again): the monitor was down all the same.
    downtime = sum(_num(r.get("downtime_s")) for r in records)
    lines += ["# HELP zmonitor_migrate_downtime_seconds_total App downtime caused by runs, "
              "restores and recoveries.", "# TYPE zmonitor_migrate_downtime_seconds_total "
              "counter", f"zmonitor_migrate_downtime_seconds_total {downtime:.3f}"]
    if records:
        last = records[-1]
        lines += [
            "# HELP zmonitor_migrate_last_run_timestamp_seconds End of the last run.",
            "# TYPE zmonitor_migrate_last_run_timestamp_seconds gauge",
            f"zmonitor_migrate_last_run_timestamp_seconds {_num(last.get('finished_at')):.3f}",
            "# HELP zmonitor_migrate_last_run_duration_seconds Duration of the last run.",
            "# TYPE zmonitor_migrate_last_run_duration_seconds gauge",
            f"zmonitor_migrate_last_run_duration_seconds {_num(last.get('duration_s')):.3f}",
            "# HELP zmonitor_migrate_last_downtime_seconds App stopped to started, last run.",
            "# TYPE zmonitor_migrate_last_downtime_seconds gauge",
            f"zmonitor_migrate_last_downtime_seconds {_num(last.get('downtime_s')):.3f}",
            "# HELP zmonitor_migrate_last_run_success 1 if the last run applied or was "
            "up to date.", "# TYPE zmonitor_migrate_last_run_success gauge",
            f"zmonitor_migrate_last_run_success "
            f"{int(last.get('outcome') in (Outcome.APPLIED, Outcome.UP_TO_DATE))}",
        ]
    if current_version is not None:
        lines += ["# HELP zmonitor_db_schema_version Current schema version.",
                  "# TYPE zmonitor_db_schema_version gauge",
                  f"zmonitor_db_schema_version {current_version}"]
    if db_size is not None:
        lines += ["# HELP zmonitor_db_size_bytes Size of the monitor database file.",
                  "# TYPE zmonitor_db_size_bytes gauge", f"zmonitor_db_size_bytes {db_size}"]
    return "\n".join(lines) + "\n"


def write_metrics(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode())
