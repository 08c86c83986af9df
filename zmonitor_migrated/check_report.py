"""The result of ``check`` as CI systems read it: a JSON object and JUnit XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .check import Step


def to_dict(root: Path, steps: list[Step]) -> dict[str, Any]:
    return {"ok": not any(s.failed for s in steps), "source": str(root),
            "steps": [s.to_dict() for s in steps]}


def junit_xml(root: Path, steps: list[Step]) -> bytes:
    """JUnit XML as CI systems read it: one testcase per step."""
    failures = sum(s.failed for s in steps)
    skipped = sum(s.status == "skip" for s in steps)
    total = f"{sum(s.seconds for s in steps):.3f}"
    suites = ET.Element("testsuites", name="zmonitor-migrate check", tests=str(len(steps)),
                        failures=str(failures), errors="0", skipped=str(skipped), time=total)
    suite = ET.SubElement(suites, "testsuite", name=f"zmonitor-migrate check {root}",
                          tests=str(len(steps)), failures=str(failures), errors="0",
                          skipped=str(skipped), time=total)
    for s in steps:
        case = ET.SubElement(suite, "testcase", classname="zmonitor-migrate.check",
                             name=f"{s.name}: {s.title}", time=f"{s.seconds:.3f}")
        if s.failed:
            failure = ET.SubElement(case, "failure", message=s.message)
            failure.text = "\n".join(s.details) or s.message
        elif s.status == "skip":
            ET.SubElement(case, "skipped", message=s.message)
        elif s.details:
            ET.SubElement(case, "system-out").text = "\n".join([s.message, *s.details])
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"
