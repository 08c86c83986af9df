"""Splitting migration SQL into statements with their lines (zmonitor_migrated.sqlscript)."""

from __future__ import annotations

import sqlite3

import pytest

from zmonitor_migrated.sqlscript import ScriptError, executable, split, strip_comments

TRIGGER_FILE = """\
-- Migration: audit trigger
CREATE TABLE alarms (id INTEGER PRIMARY KEY, state TEXT);
CREATE TABLE audit (alarm_id INTEGER, old TEXT, new TEXT);

CREATE TRIGGER alarms_audit AFTER UPDATE OF state ON alarms
BEGIN
    INSERT INTO audit VALUES (old.id, old.state, new.state);
    UPDATE audit SET new = upper(new) WHERE alarm_id = old.id;
END;
INSERT INTO alarms VALUES (1, 'ACTIVE');
"""


def test_trigger_body_stays_one_statement() -> None:
    stmts = split(TRIGGER_FILE)
    assert [s.line for s in stmts] == [2, 3, 5, 10]
    trigger = stmts[2].sql
    assert trigger.startswith("CREATE TRIGGER alarms_audit")
    assert trigger.rstrip().endswith("END;")
    assert trigger.count(";") == 3
    # and it really is what SQLite needs: the statements run one by one
    conn = sqlite3.connect(":memory:")
    for s in stmts:
        conn.execute(s.sql)
    conn.execute("UPDATE alarms SET state='acked' WHERE id=1")
    assert conn.execute("SELECT * FROM audit").fetchall() == [(1, "ACTIVE", "ACKED")]


def test_strings_with_semicolons_and_dashes_are_not_split() -> None:
    text = ("INSERT INTO settings VALUES ('a;b', '-- not a comment', '/* nor this */');\n"
            "INSERT INTO settings VALUES ('it''s; fine', \"x;y\");\n")
    stmts = split(text)
    assert len(stmts) == 2
    assert "'a;b', '-- not a comment', '/* nor this */'" in stmts[0].sql
    assert stmts[1].sql.startswith("INSERT INTO settings VALUES ('it''s; fine'")
    assert [s.line for s in stmts] == [1, 2]


def test_comments_are_not_statements_and_lines_point_at_code() -> None:
    text = """\
-- header; with a semicolon in a comment
/* block comment;
   spanning lines; */

CREATE TABLE a (x);   -- trailing; comment
-- comment only;

/* between */ CREATE TABLE b (y);
;
-- the end
"""
    stmts = split(text)
    assert [(s.line, s.sql) for s in stmts] == [(5, "CREATE TABLE a (x);"),
                                                (8, "CREATE TABLE b (y);")]


def test_multiline_statement_line_is_its_first_token() -> None:
    text = "\n\n  -- lead comment\n  UPDATE t\n   SET x = 1\n WHERE y = 2;\nSELECT 1;"
    stmts = split(text)
    assert [s.line for s in stmts] == [4, 7]


def test_seed_style_transaction_and_version_rows_are_dropped() -> None:
    text = """\
-- Migration UP
BEGIN TRANSACTION;
ALTER TABLE patients ADD COLUMN emergency_contact TEXT NULL;
INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (4, datetime('now'), 'Add emergency_contact column', 'schema');
COMMIT;
begin;
delete from schema_version where version = 4;
INSERT OR REPLACE INTO "schema_version"(version) VALUES (4);
UPDATE schema_version SET description = 'x';
END TRANSACTION;
BEGIN IMMEDIATE TRANSACTION;
INSERT INTO schema_version_notes VALUES (1);
COMMIT TRANSACTION;
"""
    kept = executable(text)
    assert [(s.line, s.head) for s in kept] == [
        (3, "ALTER TABLE PATIENTS ADD COLUMN EMERGENCY_CONTACT TEXT NULL;"),
        # not the reference runner's way of writing the version row: kept, so the engine refuses it
        (10, "UPDATE SCHEMA_VERSION SET DESCRIPTION = 'X';"),
        (13, "INSERT INTO SCHEMA_VERSION_NOTES VALUES (1);"),  # another table: kept
    ]
    # split itself drops nothing
    assert len(split(text)) == 12


def test_trigger_with_begin_end_is_not_mistaken_for_transaction_control() -> None:
    kept = executable("BEGIN;\n" + TRIGGER_FILE + "COMMIT;\n")
    assert len(kept) == 4
    assert any(s.sql.startswith("CREATE TRIGGER") and s.sql.rstrip().endswith("END;")
               for s in kept)


def test_incomplete_trailing_statement_is_an_error_with_its_line() -> None:
    text = "CREATE TABLE a (x);\n\n-- forgot the semicolon\nINSERT INTO a\nVALUES (1)\n"
    with pytest.raises(ScriptError) as info:
        split(text)
    assert info.value.line == 4
    assert "incomplete" in str(info.value)


def test_unterminated_trigger_is_an_error_at_its_start() -> None:
    text = "CREATE TABLE a (x);\nCREATE TRIGGER t AFTER INSERT ON a\nBEGIN\n  SELECT 1;\n"
    with pytest.raises(ScriptError) as info:
        split(text)
    assert info.value.line == 2


def test_trailing_comment_without_semicolon_is_fine() -> None:
    assert len(split("SELECT 1;\n-- done, no semicolon here\n/* nor here */\n")) == 1


def test_byte_order_mark_is_not_part_of_the_first_statement() -> None:
    # bug fix: a BOM made the first statement unrecognised (and a seed-style leading
    # "BEGIN TRANSACTION;" was then executed instead of dropped)
    kept = executable("\ufeffBEGIN TRANSACTION;\nCREATE TABLE a (x);\nCOMMIT;\n")
    assert [(s.line, s.sql) for s in kept] == [(2, "CREATE TABLE a (x);")]


def test_strip_comments_keeps_literals() -> None:
    assert strip_comments("SELECT '--x', [a--b] -- c\n/* d */ FROM t").split() == [
        "SELECT", "'--x',", "[a--b]", "FROM", "t"]
