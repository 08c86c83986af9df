-- Migration: Add alarm_history table for long-term alarm storage
-- Version: 0008

BEGIN TRANSACTION;

CREATE TABLE IF NOT EXISTS alarm_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    alarm_id INTEGER NOT NULL,              -- Original alarm ID
    timestamp INTEGER NOT NULL,             -- Unix milliseconds
    patient_mrn TEXT NOT NULL,
    alarm_type TEXT NOT NULL,
    severity TEXT NOT NULL,
    acknowledged_at INTEGER NULL,
    acknowledged_by TEXT NULL,
    resolved_at INTEGER NULL,
    archived_at INTEGER NOT NULL,           -- When moved to history

    FOREIGN KEY (patient_mrn) REFERENCES patients(mrn) ON DELETE CASCADE
);

CREATE INDEX idx_alarm_history_patient_mrn ON alarm_history(patient_mrn);
CREATE INDEX idx_alarm_history_timestamp ON alarm_history(timestamp);
CREATE INDEX idx_alarm_history_archived_at ON alarm_history(archived_at);

INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (8, datetime('now'), 'Add alarm_history table', 'schema');

COMMIT;
