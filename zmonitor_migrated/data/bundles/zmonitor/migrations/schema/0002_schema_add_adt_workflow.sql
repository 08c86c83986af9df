-- Migration: Add ADT (admission/discharge/transfer) workflow
-- Version: 0002
-- Description: admission state and HIS lookup bookkeeping on patients, and the
--   admission_events log. Existing patients start as DISCHARGED (the column default);
--   0006 turns admission data into events.

BEGIN TRANSACTION;

ALTER TABLE patients ADD COLUMN admission_status TEXT DEFAULT 'DISCHARGED';
ALTER TABLE patients ADD COLUMN admitted_at INTEGER NULL;        -- Unix milliseconds
ALTER TABLE patients ADD COLUMN discharged_at INTEGER NULL;      -- Unix milliseconds
ALTER TABLE patients ADD COLUMN admission_source TEXT NULL;      -- 'HIS', 'Manual', 'Barcode'
ALTER TABLE patients ADD COLUMN last_lookup_at INTEGER NULL;     -- Unix milliseconds
ALTER TABLE patients ADD COLUMN lookup_source TEXT NULL;

CREATE INDEX idx_patients_admission_status ON patients(admission_status);

CREATE TABLE admission_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_type TEXT NOT NULL CHECK(event_type IN ('ADMISSION', 'DISCHARGE', 'TRANSFER')),
    timestamp INTEGER NOT NULL,                      -- Unix milliseconds
    patient_mrn TEXT NOT NULL,
    device_id TEXT NULL,
    device_label TEXT NULL,
    user_id TEXT NULL,
    bed_location TEXT NULL,
    source TEXT NULL,
    notes TEXT NULL,
    created_at TEXT NOT NULL,
    FOREIGN KEY (patient_mrn) REFERENCES patients(mrn) ON DELETE CASCADE
);

CREATE INDEX idx_admission_events_patient_mrn ON admission_events(patient_mrn);
CREATE INDEX idx_admission_events_timestamp ON admission_events(timestamp);

INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (2, datetime('now'), 'Add ADT workflow', 'schema');

COMMIT;
