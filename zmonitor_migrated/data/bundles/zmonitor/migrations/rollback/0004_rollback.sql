-- Rollback: Remove emergency_contact column
-- Rolling back version: 0004
--
-- The seed's own rebuild, kept: create new, copy, drop, rename, recreate indices.
-- patients has cascading children (alarms, admission_events): run with foreign keys on,
-- as the seed's runner does, DROP TABLE patients would delete every one of their rows.
-- The zmonitor runner turns enforcement off around each migration and runs
-- PRAGMA foreign_key_check before COMMIT.
-- zmonitor:allow rebuild-with-children

BEGIN TRANSACTION;

-- 1. Create new table without emergency_contact
CREATE TABLE patients_new (
    mrn TEXT PRIMARY KEY NOT NULL CHECK(length(mrn) <= 20),
    name TEXT NOT NULL,
    dob TEXT NULL,
    sex TEXT NULL CHECK(sex IN ('M', 'F', 'O', 'U')),
    bed_location TEXT NULL,
    old_id INTEGER NULL,
    created_at TEXT NOT NULL DEFAULT (datetime('now')),
    admission_status TEXT DEFAULT 'DISCHARGED',
    admitted_at INTEGER NULL,
    discharged_at INTEGER NULL,
    admission_source TEXT NULL,
    last_lookup_at INTEGER NULL,
    lookup_source TEXT NULL
);

-- 2. Copy data (exclude emergency_contact)
INSERT INTO patients_new (mrn, name, dob, sex, bed_location, old_id, created_at,
                          admission_status, admitted_at, discharged_at, admission_source,
                          last_lookup_at, lookup_source)
SELECT mrn, name, dob, sex, bed_location, old_id, created_at,
       admission_status, admitted_at, discharged_at, admission_source,
       last_lookup_at, lookup_source
FROM patients;

-- 3. Drop old table
DROP TABLE patients;

-- 4. Rename new table
ALTER TABLE patients_new RENAME TO patients;

-- 5. Recreate indices
CREATE INDEX idx_patients_admission_status ON patients(admission_status);

-- 6. Update schema version (remove this version)
DELETE FROM schema_version WHERE version = 4;

COMMIT;
