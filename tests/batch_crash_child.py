"""Child process for tests/test_batch_crash.py: apply a migration source to a database
with the durable engine, announcing on stdout when the run has started.

    python tests/batch_crash_child.py DB SRC
"""

from __future__ import annotations

import sys
from pathlib import Path

from zmonitor_migrated.engine import Engine
from zmonitor_migrated.sources import load


def main() -> None:
    db, src = sys.argv[1], Path(sys.argv[2])
    source = load(src)
    with Engine(db, fast=False) as engine:
        print("ready", flush=True)
        engine.apply(source)
    print("done", flush=True)


if __name__ == "__main__":
    main()
