-- What made a result, as its worker reported it (weights and data fingerprints, worker build,
-- device, dtype, wall time): JSON, NULL for jobs finished before workers reported it.
ALTER TABLE jobs ADD COLUMN provenance TEXT;
