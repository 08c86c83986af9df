-- Rollback: remove telemetry_metrics (its indices go with it)
-- Rolling back version: 0003
-- Telemetry metrics are diagnostics re-measured by the device; nothing else refers to them.

DROP TABLE telemetry_metrics;
