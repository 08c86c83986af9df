-- Rollback: MRN back to 20 characters
-- Rolling back version: 0009
--
-- Same safe rebuild as 0009. If any MRN longer than 20 characters was stored since,
-- the copy violates the CHECK and the rollback fails as a whole, leaving the database
-- at version 9: shortening an MRN would silently re-identify a patient.
-- patients has cascading children (alarms, admission_events, alarm_history); the runner
-- keeps foreign keys off here and checks them before COMMIT.
-- zmonitor:allow rebuild-with-children

BEGIN TRANSACTION;

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
    lookup_source TEXT NULL,
    emergency_contact TEXT NULL
);

INSERT INTO patients_new (mrn, name, dob, sex, bed_location, old_id, created_at,
                          admission_status, admitted_at, discharged_at, admission_source,
                          last_lookup_at, lookup_source, emergency_contact)
SELECT mrn, name, dob, sex, bed_location, old_id, created_at,
       admission_status, admitted_at, discharged_at, admission_source,
       last_lookup_at, lookup_source, emergency_contact
FROM patients;

DROP TABLE patients;

ALTER TABLE patients_new RENAME TO patients;

CREATE INDEX idx_patients_admission_status ON patients(admission_status);

DELETE FROM schema_version WHERE version = 9;

COMMIT;
