-- Rollback script for version 10
-- notes is a plain column (no index, key or constraint uses it), so SQLite's own
-- ALTER TABLE DROP COLUMN (3.35+) removes it without rebuilding patients.
-- Notes written since 0010 are lost; version 9 has nowhere to keep them.

ALTER TABLE patients DROP COLUMN notes;
