-- Migration: Add telemetry_metrics table
-- Version: 0003
-- Description: one row per telemetry batch sent to the central station, with the
--   timings needed to measure end-to-end latency and the outcome of the transfer.

CREATE TABLE telemetry_metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL,
    device_id TEXT NULL,
    device_label TEXT NULL,
    patient_mrn TEXT NULL,
    data_created_at INTEGER NOT NULL,                -- oldest record in the batch, Unix ms
    batch_created_at INTEGER NOT NULL,               -- Unix ms
    transmitted_at INTEGER NULL,                     -- Unix ms
    server_ack_at INTEGER NULL,                      -- Unix ms
    end_to_end_latency_ms INTEGER NULL,
    record_count INTEGER NOT NULL DEFAULT 0,
    batch_size_bytes INTEGER NULL,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK(status IN ('pending', 'sent', 'acked', 'failed')),
    error_message TEXT NULL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL                      -- Unix ms
);

CREATE UNIQUE INDEX idx_telemetry_metrics_batch_id ON telemetry_metrics(batch_id);
CREATE INDEX idx_telemetry_metrics_batch_created_at ON telemetry_metrics(batch_created_at);
CREATE INDEX idx_telemetry_metrics_status ON telemetry_metrics(status)
    WHERE status != 'acked';
