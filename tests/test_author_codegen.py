"""``zmonitor-migrate codegen``: the app's SchemaInfo.h from schema/database.yaml, the same
bytes for the same schema, compiling as C++17, and a stale or missing header caught."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from author_helpers import SHIPPED, copy_source, run

from zmonitor_migrated import codegen
from zmonitor_migrated.errors import BundleRejected
from zmonitor_migrated.schema_spec import load_spec, parse_spec

COMMITTED = SHIPPED / "generated" / "SchemaInfo.h"


def test_the_committed_header_is_current_and_generation_is_deterministic(
        tmp_path: Path) -> None:
    code, out, err = run(["codegen", str(SHIPPED)])
    assert code == 0, err
    assert out.encode() == COMMITTED.read_bytes()
    src = copy_source(tmp_path)  # another path, other file times: the same bytes
    assert codegen.generate(src) == out
    assert run(["codegen", str(SHIPPED), "-o", str(COMMITTED), "--check"])[0] == 0
    spec = load_spec(SHIPPED / "schema/database.yaml")
    for table in spec.tables:
        assert f'inline constexpr char {table.name.upper()}[] = "{table.name}";' in out
        for column in table.columns:
            assert f'[] = "{column.name}";' in out


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler here")
def test_the_header_compiles_as_cxx17(tmp_path: Path) -> None:
    (tmp_path / "SchemaInfo.h").write_bytes(COMMITTED.read_bytes())
    (tmp_path / "use.cpp").write_text(
        '#include "SchemaInfo.h"\n#include "SchemaInfo.h"\n#include <cstring>\n'
        "int main() { return std::strcmp(Schema::Columns::AlarmHistory::ALARM_ID, "
        '"alarm_id") == 0 && Schema::VERSION == 14 ? 0 : 1; }\n')
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-o",
                    str(tmp_path / "use"), str(tmp_path / "use.cpp")], check=True,
                   timeout=120)
    assert subprocess.run([str(tmp_path / "use")], timeout=10).returncode == 0


def test_write_leaves_a_current_header_untouched_and_check_names_the_fix(
        tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    header = src / "generated/SchemaInfo.h"
    header.write_text("")
    code, out, _ = run(["codegen", str(src), "-o", str(header)])
    assert code == 0 and "wrote" in out
    before = header.stat().st_mtime_ns
    code, out, _ = run(["codegen", str(src), "-o", str(header)])
    assert code == 0 and "already current" in out and header.stat().st_mtime_ns == before
    header.write_text(header.read_text().replace('"mrn"', '"patient_mrn_old"', 1))
    code, _, err = run(["codegen", str(src), "-o", str(header), "--check"])
    assert code == 3 and "stale" in err and f"zmonitor-migrate codegen {src} -o" in err
    header.unlink()
    code, _, err = run(["codegen", str(src), "-o", str(header), "--check"])
    assert code == 3 and "does not exist" in err


@pytest.mark.parametrize(("yaml_text", "named"), [
    ("tables:\n  a_b:\n    columns: [{name: x, type: INT}]\n"
     "  aB:\n    columns: [{name: x, type: INT}]\n", "both become"),
    ("tables:\n  t:\n    columns: [{name: _x, type: INT}]\n", "'_x'"),
    ("tables:\n  t:\n    columns: [{name: a__b, type: INT}]\n", "'a__b'"),
])
def test_names_that_cannot_be_cxx_constants_are_refused(yaml_text: str, named: str) -> None:
    with pytest.raises(BundleRejected, match=named):
        codegen.render(parse_spec(yaml_text))


@pytest.mark.parametrize(("argv", "named"), [
    (["codegen", "NOSRC"], "SRC"),
    (["codegen", "SHIPPED", "-o", "NODIR/SchemaInfo.h"], "--output"),
    (["codegen", "SHIPPED", "-o", "DIR"], "--output"),
])
def test_bad_arguments_are_exit_2(tmp_path: Path, argv: list[str], named: str) -> None:
    subst = {"NOSRC": str(tmp_path / "nosrc"), "SHIPPED": str(SHIPPED), "DIR": str(tmp_path),
             "NODIR/SchemaInfo.h": str(tmp_path / "nodir" / "SchemaInfo.h")}
    code, _, err = run([subst.get(a, a) for a in argv])
    assert code == 2 and named in err and "Traceback" not in err


def test_check_without_o_compares_the_committed_header(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    code, out, err = run(["codegen", str(src), "--check"])
    assert code == 0, err
    header = src / "generated" / "SchemaInfo.h"
    header.write_text(header.read_text() + "// edited\n")
    code, out, err = run(["codegen", str(src), "--check"])
    assert code == 3 and "stale" in err + out, (out, err)
