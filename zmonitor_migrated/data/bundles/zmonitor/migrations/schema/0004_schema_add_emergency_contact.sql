-- Migration: Add emergency_contact column to patients table
-- Version: 0004
-- Date: 2025-11-27
-- Author: Dev Team
-- Description: Add emergency contact field for patient records

-- Migration UP
BEGIN TRANSACTION;

-- Add new column
ALTER TABLE patients
ADD COLUMN emergency_contact TEXT NULL;

-- Add comment (SQLite doesn't support column comments, document here)
-- emergency_contact: Emergency contact phone number (E.164 format)

-- Update schema version
INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (4, datetime('now'), 'Add emergency_contact column', 'schema');

COMMIT;
