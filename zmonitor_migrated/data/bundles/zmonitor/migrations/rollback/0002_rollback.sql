-- Rollback: remove the ADT workflow
-- Rolling back version: 0002
-- Drops admission_events (its rows did not exist at version 1) and rebuilds patients
-- without the six ADT columns, in the safe order (create new, copy, drop, rename).
-- patients has a cascading child (alarms): the runner keeps foreign keys off here.
-- zmonitor:allow rebuild-with-children

BEGIN TRANSACTION;

DROP TABLE admission_events;

CREATE TABLE patients_new (
    mrn TEXT PRIMARY KEY NOT NULL CHECK(length(mrn) <= 20),
    name TEXT NOT NULL,
    dob TEXT NULL,                                   -- ISO 8601 date
    sex TEXT NULL CHECK(sex IN ('M', 'F', 'O', 'U')),
    bed_location TEXT NULL,
    old_id INTEGER NULL,                             -- legacy numeric patient id
    created_at TEXT NOT NULL DEFAULT (datetime('now'))
);

INSERT INTO patients_new (mrn, name, dob, sex, bed_location, old_id, created_at)
SELECT mrn, name, dob, sex, bed_location, old_id, created_at
FROM patients;

DROP TABLE patients;

ALTER TABLE patients_new RENAME TO patients;

DELETE FROM schema_version WHERE version = 2;

COMMIT;
