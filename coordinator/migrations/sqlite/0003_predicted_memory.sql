-- The memory model's predicted peak device memory of each job (bytes, on a CUDA worker), when its
-- model's shape was known at submit; NULL otherwise. A lease skips jobs larger than the asking
-- worker's reported free memory; NULL on either side is no constraint.
ALTER TABLE jobs ADD COLUMN predicted_device_bytes INTEGER;
