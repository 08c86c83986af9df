-- Migration: Change MRN column to support longer IDs
-- Version: 0009
-- Note: SQLite requires table recreation for column type changes
--
-- The CHECK on mrn goes from 20 to 50 characters. The rebuild keeps the seed's order
-- (create new, copy, drop, rename), which leaves the children's REFERENCES patients(mrn)
-- pointing at the new table. patients has cascading children (alarms, admission_events,
-- alarm_history): with foreign keys on, DROP TABLE patients would delete all of their
-- rows; the zmonitor runner turns enforcement off around the migration and runs
-- PRAGMA foreign_key_check before COMMIT.
-- zmonitor:allow rebuild-with-children

BEGIN TRANSACTION;

-- 1. Create new table with modified column
CREATE TABLE patients_new (
    mrn TEXT PRIMARY KEY NOT NULL CHECK(length(mrn) <= 50),  -- NEW: increased limit
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
    lookup_source TEXT NULL,
    emergency_contact TEXT NULL
);

-- 2. Copy all data (named columns: SELECT * silently depends on column order)
INSERT INTO patients_new (mrn, name, dob, sex, bed_location, old_id, created_at,
                          admission_status, admitted_at, discharged_at, admission_source,
                          last_lookup_at, lookup_source, emergency_contact)
SELECT mrn, name, dob, sex, bed_location, old_id, created_at,
       admission_status, admitted_at, discharged_at, admission_source,
       last_lookup_at, lookup_source, emergency_contact
FROM patients;

-- 3. Drop old table
DROP TABLE patients;

-- 4. Rename new table
ALTER TABLE patients_new RENAME TO patients;

-- 5. Recreate all indices
CREATE INDEX idx_patients_admission_status ON patients(admission_status);
CREATE INDEX idx_patients_bed_location ON patients(bed_location)
    WHERE bed_location IS NOT NULL;

-- 6. Update schema version
INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (9, datetime('now'), 'Change MRN column length to 50', 'schema');

COMMIT;
