"""Run in a fresh process on a crash state: what the device does at boot after a power
cut, and what an operator then sees. Prints one JSON object.

    python3 -m powercut.check CONFIG MOUNT

``recover`` (the boot unit), ``recover`` again (must change nothing), the app unit's
start gate, ``status --json``; the tree's digest before and after the second ``recover``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path

from zmonitor_migrated import cli

from . import model


def _run(*argv: str) -> dict[str, object]:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # an unmapped crash of the tool itself: a finding
        code = 99
        err.write(traceback.format_exc())
    return {"code": code, "out": out.getvalue()[-4000:], "err": err.getvalue()[-4000:]}


def main() -> None:
    config, mount = sys.argv[1], Path(sys.argv[2])
    res: dict[str, object] = {}
    res["recover"] = _run("--config", config, "recover")
    res["tree1"] = model.scan(mount).digest()
    res["recover2"] = _run("--config", config, "--json", "recover")
    res["tree2"] = model.scan(mount).digest()
    res["gate"] = _run("--config", config, "gate")
    res["status"] = _run("--config", config, "--json", "status")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
