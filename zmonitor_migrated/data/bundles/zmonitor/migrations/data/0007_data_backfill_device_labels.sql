-- Data Migration: Backfill device_label from device_id
-- Version: 0007
-- Risk: LOW - updates NULL values only

BEGIN TRANSACTION;

-- Backfill device_label in vitals table
-- Use device_id as fallback if no mapping exists
UPDATE vitals
SET device_label = (
    CASE
        WHEN device_id LIKE 'SERIAL-%' THEN 'DEVICE-' || substr(device_id, 8, 3)
        ELSE 'UNKNOWN-' || device_id
    END
)
WHERE device_label IS NULL
  AND device_id IS NOT NULL;

-- Backfill device_label in telemetry_metrics table
-- (from the vitals of the same device; ordered so the choice is deterministic)
UPDATE telemetry_metrics
SET device_label = (
    SELECT device_label
    FROM vitals
    WHERE vitals.device_id = telemetry_metrics.device_id
      AND vitals.device_label IS NOT NULL
    ORDER BY vitals.id
    LIMIT 1
)
WHERE device_label IS NULL
  AND device_id IS NOT NULL;

-- Verify backfill (operator query; the runner ignores SELECT results):
-- SELECT COUNT(*) AS total_vitals,
--        SUM(CASE WHEN device_label IS NULL THEN 1 ELSE 0 END) AS null_labels
--   FROM vitals;

INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (7, datetime('now'), 'Backfill device_label from device_id', 'data');

COMMIT;
