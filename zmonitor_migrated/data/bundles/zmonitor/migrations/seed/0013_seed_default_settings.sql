-- Seed Migration: Insert default application settings
-- Version: 0013 (the seed's seed-0001, renumbered into the one sequence)
--
-- INSERT OR IGNORE: a setting the device already has (set by a user or by the HIS)
-- is never overwritten.

BEGIN TRANSACTION;

-- Insert default settings (only if not exists)
INSERT OR IGNORE INTO settings (key, value, updated_at, updated_by)
VALUES
    ('deviceLabel', 'DEVICE-001', datetime('now'), 'system'),
    ('measurementUnit', 'metric', datetime('now'), 'system'),
    ('alarmVolume', '80', datetime('now'), 'system'),
    ('screenBrightness', '75', datetime('now'), 'system'),
    ('autoLogoutMinutes', '30', datetime('now'), 'system'),
    ('telemetryBatchSize', '100', datetime('now'), 'system'),
    ('telemetryIntervalMs', '5000', datetime('now'), 'system');

INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (13, datetime('now'), 'Default settings', 'seed');

COMMIT;
