-- Deduplicated reads: FINAL collapses rows with the same sorting key at query time, which merges alone never
-- promise. A redelivered event has the same sorting key and partition as the original, so this is exact.

CREATE VIEW IF NOT EXISTS requests_dedup AS SELECT * FROM requests FINAL;

CREATE VIEW IF NOT EXISTS results_dedup AS SELECT * FROM results FINAL;

CREATE VIEW IF NOT EXISTS stage_metrics_dedup AS SELECT * FROM stage_metrics FINAL;
