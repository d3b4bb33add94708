-- Cancelled requests (ImageResult 3, StageMetric 2): the result status and the stage outcome CANCELLED, and the
-- device time a cancellation saved where it is known (null where it is not: a request cancelled before its render).
-- A value added at the end of an Enum8 changes metadata only, on 18.16 as on current engines, and running the MODIFY
-- again is harmless. CANCELLED ranks with FAILED in status_rank (0006): a replay that succeeded, its images stored
-- and reported, still wins over one that met the cancellation.
ALTER TABLE results MODIFY COLUMN status Enum8('SUCCEEDED' = 1, 'REJECTED' = 2, 'FAILED' = 3, 'CANCELLED' = 4);

-- One ALTER, so the outcome and the new column arrive together: 18.16 has no ADD COLUMN IF NOT EXISTS.
ALTER TABLE stage_metrics
    MODIFY COLUMN outcome Enum8('OK' = 1, 'REJECTED' = 2, 'FAILED' = 3, 'CANCELLED' = 4),
    ADD COLUMN device_seconds_saved Nullable(Float64);

-- A view keeps the columns (and their types) its SELECT * had when it was made (18.16), so both are made again.
DROP TABLE IF EXISTS results_dedup;
CREATE VIEW IF NOT EXISTS results_dedup AS SELECT * FROM results FINAL;

DROP TABLE IF EXISTS stage_metrics_dedup;
CREATE VIEW IF NOT EXISTS stage_metrics_dedup AS SELECT * FROM stage_metrics FINAL;
