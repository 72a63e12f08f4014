-- Heartbeats report where a running job is: `phase` (already a column) and the progress within it,
-- in [0, 1]; `heartbeat_at` is when the last one arrived. GetSweep shows them for running jobs.
ALTER TABLE jobs ADD COLUMN progress REAL;
ALTER TABLE jobs ADD COLUMN heartbeat_at INTEGER;
