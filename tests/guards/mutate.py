"""Break one safety guard at a time and check that a named test notices.

``guards.yaml`` (next to this file) lists every guard: its id, the promise of the README
it keeps, the file, the minimal mutation as exact text (``old`` → ``new``: a string, or a list of
lines joined by newlines) and the test
node ids expected to fail when it is applied. For each guard this script copies the
repository (``git ls-files``: tracked and untracked, not ignored) to a temporary
directory, applies that one mutation there, and runs the named tests in the copy
(``PYTHONPATH`` = the copy, ``-x -q -p no:cacheprovider``, a timeout per guard).

Verdicts:

- ``KILLED``: a named test failed — the guard is covered;
- ``SURVIVED``: every named test passed with the guard broken;
- ``PATTERN-NOT-FOUND`` / ``AMBIGUOUS``: ``old`` is not in the file exactly once (the
  code moved on: update the entry); a failure of this check, never a kill;
- ``ERROR``: pytest could not run the tests (exit 2-5: collection error, no such test);
- ``TIMEOUT``: the tests did not end within the guard's timeout;
- ``UNCOVERED``: the entry says no normal test can kill it (``uncovered:`` names what
  will); its pattern is still checked, its tests are not run.

Before the mutants, one baseline run of every named test on the unchanged copy: a test
that fails without any mutation would "kill" everything, so a failing baseline stops the
check. Exit status 0 only if every guard run was KILLED (UNCOVERED ones too, with
``--allow-uncovered``).

    python3 tests/guards/mutate.py                    # every guard, one at a time
    python3 tests/guards/mutate.py -j 2               # two guards in parallel
    python3 tests/guards/mutate.py --only quiesce-probe,swap-removes-old-sidecars
    python3 tests/guards/mutate.py --results tests/guards/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LIST = HERE / "guards.yaml"
KEYS = {"id", "promise", "file", "old", "new", "tests", "timeout", "uncovered", "note"}


@dataclass
class Guard:
    id: str
    promise: str
    file: str
    old: str
    new: str
    tests: list[str]
    timeout: float = 300.0
    uncovered: str | None = None
    note: str | None = None


@dataclass
class Outcome:
    guard: Guard
    verdict: str
    seconds: float = 0.0
    detail: str = ""
    failed_test: str = ""
    log: list[str] = field(default_factory=list)


def load(path: Path = LIST) -> list[Guard]:
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, list):
        raise SystemExit(f"{path}: expected a list of guards")
    guards: list[Guard] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not {"id", "promise", "file", "old", "new"} <= set(entry):
            raise SystemExit(f"{path}: entry {i} needs id, promise, file, old, new")
        unknown = set(entry) - KEYS
        if unknown:
            raise SystemExit(f"{path}: entry {entry['id']}: unknown keys {sorted(unknown)}")
        if entry["id"] in seen:
            raise SystemExit(f"{path}: duplicate id {entry['id']}")
        seen.add(entry["id"])
        tests = list(entry.get("tests") or [])
        if not tests and not entry.get("uncovered"):
            raise SystemExit(f"{path}: {entry['id']} names no test and is not 'uncovered'")
        guards.append(Guard(id=entry["id"], promise=entry["promise"], file=entry["file"],
                            old=_text(entry["old"]), new=_text(entry["new"]), tests=tests,
                            timeout=float(entry.get("timeout", 300)),
                            uncovered=entry.get("uncovered"), note=entry.get("note")))
    return guards


def _text(value: object) -> str:
    """``old``/``new``: one exact string, or a list of exact lines (leading spaces kept,
    which YAML block scalars would strip) joined with newlines."""
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, check=True).stdout
    return sorted({f for f in out.decode().split("\0")
                   if f and ((REPO / f).is_file() or (REPO / f).is_symlink())})


def make_copy(files: list[str], parent: Path, name: str) -> Path:
    root = parent / name
    for f in files:
        dst = root / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst, follow_symlinks=False)  # bundles/zmonitor is a link
    return root


def count(guard: Guard) -> int:
    path = REPO / guard.file
    if not path.is_file():
        return 0
    return path.read_text().count(guard.old)


def run_tests(root: Path, tests: list[str], timeout: float) -> tuple[str, int | None, str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           f"--basetemp={root / '.pytest-tmp'}", *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else \
            (exc.stdout or "")
        return "timeout", None, out
    return "done", proc.returncode, proc.stdout + proc.stderr


def first_error_line(output: str) -> str:
    """The first ``E`` line of pytest's report: why the test failed."""
    for line in output.splitlines():
        if line.startswith("E "):
            return line[1:].strip()[:160]
    return ""


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ")[0]
    return ""


def run_guard(guard: Guard, files: list[str], work: Path) -> Outcome:
    t0 = time.monotonic()
    n = count(guard)
    if n == 0:
        return Outcome(guard, "PATTERN-NOT-FOUND", detail=f"'old' text not in {guard.file}")
    if n > 1:
        return Outcome(guard, "AMBIGUOUS", detail=f"'old' text found {n} times in {guard.file}")
    if guard.uncovered:
        return Outcome(guard, "UNCOVERED", detail=guard.uncovered)
    root = make_copy(files, work, guard.id)
    try:
        target = root / guard.file
        target.write_text(target.read_text().replace(guard.old, guard.new, 1))
        state, code, output = run_tests(root, guard.tests, guard.timeout)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    seconds = time.monotonic() - t0
    tail = output.strip().splitlines()[-1:] if output.strip() else [""]
    if state == "timeout":
        return Outcome(guard, "TIMEOUT", seconds, f"over {guard.timeout:g} s")
    if code == 0:
        return Outcome(guard, "SURVIVED", seconds, tail[0])
    if code == 1:
        return Outcome(guard, "KILLED", seconds, first_error_line(output) or tail[0],
                       first_failure(output))
    return Outcome(guard, "ERROR", seconds, f"pytest exit {code}: {tail[0]}",
                   log=output.splitlines()[-30:])


def baseline(guards: list[Guard], files: list[str], work: Path) -> tuple[bool, str, float]:
    tests = list(dict.fromkeys(t for g in guards if not g.uncovered for t in g.tests))
    if not tests:
        return True, "no tests", 0.0
    t0 = time.monotonic()
    root = make_copy(files, work, "baseline")
    try:
        state, code, output = run_tests(root, tests, 3600)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ok = state == "done" and code == 0
    last = output.strip().splitlines()[-1] if output.strip() else state
    return ok, (last if ok else output[-4000:]), time.monotonic() - t0


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def results_markdown(outcomes: list[Outcome], total_s: float, base: str, jobs: int) -> str:
    commit = git("rev-parse", "--short", "HEAD")
    dirty = " (with uncommitted changes)" if git("status", "--porcelain") else ""
    killed = sum(o.verdict == "KILLED" for o in outcomes)
    lines = [
        "# Guard mutation check: results",
        "",
        "Written by `python3 tests/guards/mutate.py --results tests/guards/RESULTS.md`; the "
        "guards, their promises and mutations are in `guards.yaml`.",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- commit: {commit}{dirty}",
        f"- guards: {len(outcomes)}; KILLED {killed}; "
        + "; ".join(f"{v} {sum(o.verdict == v for o in outcomes)}"
                    for v in ("SURVIVED", "UNCOVERED", "PATTERN-NOT-FOUND", "AMBIGUOUS",
                              "ERROR", "TIMEOUT")
                    if any(o.verdict == v for o in outcomes)),
        f"- duration: {total_s:.0f} s with -j {jobs} on {os.cpu_count()} cores "
        f"(baseline of the named tests: {base})",
        "",
        "| guard | file | verdict | s | killed by |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        by = o.failed_test or (o.detail if o.verdict != "KILLED" else "")
        lines.append(f"| `{o.guard.id}` | `{o.guard.file}` | {o.verdict} | {o.seconds:.0f} | "
                     f"{by} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated guard ids")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="guards run in parallel")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the baseline run of the named tests")
    ap.add_argument("--allow-uncovered", action="store_true",
                    help="UNCOVERED guards do not fail the check")
    ap.add_argument("--results", type=Path, help="write a markdown report here")
    ap.add_argument("--list", action="store_true", help="list the guards and exit")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="also print why each killing test failed")
    args = ap.parse_args(argv)
    guards = load()
    if args.list:
        for g in guards:
            print(f"{g.id:40} {g.file:35} {', '.join(g.tests) or '(' + str(g.uncovered) + ')'}")
        return 0
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {g.id for g in guards})
        if unknown:
            print(f"unknown guard id(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        guards = [g for g in guards if g.id in wanted]
    files = repo_files()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="guards-") as tmp:
        work = Path(tmp)
        base = "skipped"
        if not args.no_baseline:
            ok, text, secs = baseline(guards, files, work)
            base = f"{text} in {secs:.0f} s"
            print(f"baseline: {base if ok else 'FAILED'}", flush=True)
            if not ok:
                print(text, file=sys.stderr)
                return 1
        outcomes: list[Outcome] = []

        def one(g: Guard) -> Outcome:
            o = run_guard(g, files, work)
            print(f"{o.verdict:18} {g.id:42} {o.seconds:6.1f} s  {o.failed_test or o.detail}",
                  flush=True)
            if args.verbose and o.verdict == "KILLED":
                print(f"{'':18} {o.detail}", flush=True)
            for line in o.log:
                print(f"    {line}", flush=True)
            return o

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            outcomes = list(pool.map(one, guards))
    total = time.monotonic() - t0
    killed = sum(o.verdict == "KILLED" for o in outcomes)
    bad = [o for o in outcomes if o.verdict != "KILLED"
           and not (o.verdict == "UNCOVERED" and args.allow_uncovered)]
    print(f"\n{killed}/{len(outcomes)} KILLED; "
          + ", ".join(f"{o.guard.id}: {o.verdict}" for o in outcomes if o.verdict != "KILLED")
          + f"\ntotal {total:.0f} s")
    if args.results:
        args.results.write_text(results_markdown(outcomes, total, base, args.jobs))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
