"""Child process for tests/test_batch_crash.py: apply a migration source to a database
with the durable engine, announcing on stdout when the run has started.

    python tests/batch_crash_child.py DB SRC

Prints ``ready`` once the engine is open and ``batch K`` after each committed batch, so
the parent can aim its SIGKILL at a random batch whatever the machine's speed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from zmonitor_migrated.engine import Engine, Progress
from zmonitor_migrated.sources import load


def main() -> None:
    db, src = sys.argv[1], Path(sys.argv[2])
    source = load(src)

    def report(p: Progress) -> None:
        if not p.done:
            print(f"batch {p.batch}", flush=True)

    with Engine(db, fast=False, on_progress=report) as engine:
        print("ready", flush=True)
        engine.apply(source)
    print("done", flush=True)


if __name__ == "__main__":
    main()
