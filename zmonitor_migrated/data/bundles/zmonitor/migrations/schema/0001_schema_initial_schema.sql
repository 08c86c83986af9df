-- Migration: Initial Z Monitor schema
-- Version: 0001
-- Description: patients, vitals, alarms, settings, alarm_thresholds as the first
--   firmware shipped them. Later migrations add the ADT workflow (0002), telemetry
--   metrics (0003), emergency contact (0004), alarm history (0008), the longer MRN (0009),
--   notes (0010) and the early-warning score (0011).
--
-- patients.old_id is the numeric patient id of the legacy firmware; legacy vitals carry it
-- (as text) in vitals.patient_id and 0012 maps it to the MRN.
-- Child tables reference patients(mrn) ON DELETE CASCADE: any rebuild of patients must
-- run with foreign keys off (the zmonitor runner does), or DROP TABLE patients would
-- delete every alarm.

BEGIN TRANSACTION;

CREATE TABLE patients (
    mrn TEXT PRIMARY KEY NOT NULL CHECK(length(mrn) <= 20),
    name TEXT NOT NULL,
    dob TEXT NULL,                                   -- ISO 8601 date
    sex TEXT NULL CHECK(sex IN ('M', 'F', 'O', 'U')),
    bed_location TEXT NULL,
    old_id INTEGER NULL,                             -- legacy numeric patient id
    created_at TEXT NOT NULL DEFAULT (datetime('now'))
);

CREATE TABLE vitals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp INTEGER NOT NULL,                      -- Unix milliseconds
    patient_id TEXT NULL,                            -- legacy: MRN or numeric old_id as text
    patient_mrn TEXT NULL,
    heart_rate INTEGER NULL,                         -- bpm
    spo2 INTEGER NULL,                               -- %
    respiration_rate INTEGER NULL,                   -- breaths/min
    temperature REAL NULL,                           -- degrees Celsius
    blood_pressure_systolic INTEGER NULL,            -- mmHg
    blood_pressure_diastolic INTEGER NULL,           -- mmHg
    signal_quality INTEGER NULL,                     -- 0-100
    device_id TEXT NULL,
    device_label TEXT NULL,
    is_synced INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX idx_vitals_timestamp ON vitals(timestamp);
CREATE INDEX idx_vitals_patient_mrn_timestamp ON vitals(patient_mrn, timestamp);

CREATE TABLE alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    patient_mrn TEXT NOT NULL,
    alarm_type TEXT NOT NULL,
    severity TEXT NOT NULL CHECK(severity IN ('LOW', 'MEDIUM', 'HIGH', 'CRITICAL')),
    timestamp INTEGER NOT NULL,                      -- Unix milliseconds
    value REAL NULL,
    threshold_value REAL NULL,
    acknowledged_at INTEGER NULL,
    acknowledged_by TEXT NULL,
    resolved_at INTEGER NULL,
    FOREIGN KEY (patient_mrn) REFERENCES patients(mrn) ON DELETE CASCADE
);

CREATE INDEX idx_alarms_patient_mrn ON alarms(patient_mrn);
CREATE INDEX idx_alarms_timestamp ON alarms(timestamp);
CREATE INDEX idx_alarms_unresolved ON alarms(severity) WHERE resolved_at IS NULL;

CREATE TABLE settings (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    updated_by TEXT NULL
);

CREATE TABLE alarm_thresholds (
    parameter TEXT PRIMARY KEY NOT NULL,
    low_critical REAL NULL,
    low_warning REAL NULL,
    high_warning REAL NULL,
    high_critical REAL NULL,
    created_at TEXT NOT NULL
);

INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (1, datetime('now'), 'Initial schema', 'schema');

COMMIT;
