-- Rollback: remove the default settings 0013 inserted
-- Rolling back version: 0013
-- Only rows still holding the shipped default value and written by 'system' go; a
-- setting a user changed (or that existed before 0013, which INSERT OR IGNORE skipped
-- and which carries its own value or author) is kept.

BEGIN TRANSACTION;

DELETE FROM settings
WHERE updated_by = 'system'
  AND (key, value) IN (VALUES
    ('deviceLabel', 'DEVICE-001'),
    ('measurementUnit', 'metric'),
    ('alarmVolume', '80'),
    ('screenBrightness', '75'),
    ('autoLogoutMinutes', '30'),
    ('telemetryBatchSize', '100'),
    ('telemetryIntervalMs', '5000'));

DELETE FROM schema_version WHERE version = 13;

COMMIT;
