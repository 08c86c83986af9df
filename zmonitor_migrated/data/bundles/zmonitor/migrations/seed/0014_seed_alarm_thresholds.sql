-- Seed Migration: Insert default alarm thresholds
-- Version: 0014 (second half of the seed's seed-0001, split: one concern per migration)
-- NULL means "no alarm on that side" (SpO2 has no high alarm).

BEGIN TRANSACTION;

INSERT OR IGNORE INTO alarm_thresholds (
    parameter,
    low_critical, low_warning,
    high_warning, high_critical,
    created_at
)
VALUES
    ('heart_rate', 40, 50, 120, 150, datetime('now')),
    ('spo2', 88, 92, NULL, NULL, datetime('now')),
    ('respiration_rate', 8, 10, 25, 30, datetime('now')),
    ('temperature', 35.0, 36.0, 38.0, 39.0, datetime('now')),
    ('blood_pressure_systolic', 80, 90, 160, 180, datetime('now'));

INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (14, datetime('now'), 'Default alarm thresholds', 'seed');

COMMIT;
