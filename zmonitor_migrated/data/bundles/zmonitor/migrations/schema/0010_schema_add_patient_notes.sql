-- Migration: Add notes field to patients
-- Version: 0010
-- (seed section 8, development workflow example)

BEGIN TRANSACTION;
ALTER TABLE patients ADD COLUMN notes TEXT NULL;
INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (10, datetime('now'), 'Add notes field to patients', 'schema');
COMMIT;
