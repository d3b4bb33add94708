-- Live experiments and guarded rollouts (ImageResult 4, StageMetric 3, RolloutDecision 1).
-- experiment_revisions: the revision of each experiment's definition in force when the request was assigned, aligned
-- with experiment_keys (18.16 has no Map type). 0 where there was none (an experiment of the experiments file) and in
-- the rows written before: their DEFAULT is a 0 per key, computed when they are read. A rollout's step is one
-- revision, so `experiment_revisions[indexOf(experiment_keys, key)]` picks the rows of one allocation.
-- 18.16 has no ADD COLUMN IF NOT EXISTS, so running an ALTER again fails rather than doing nothing.
ALTER TABLE results ADD COLUMN experiment_revisions Array(Int64) DEFAULT arrayMap(k -> toInt64(0), experiment_keys);

ALTER TABLE stage_metrics ADD COLUMN experiment_revisions Array(Int64) DEFAULT arrayMap(k -> toInt64(0), experiment_keys);

-- A view keeps the columns its SELECT * had when it was made (18.16), so both are made again.
DROP TABLE IF EXISTS results_dedup;
CREATE VIEW IF NOT EXISTS results_dedup AS SELECT * FROM results FINAL;

DROP TABLE IF EXISTS stage_metrics_dedup;
CREATE VIEW IF NOT EXISTS stage_metrics_dedup AS SELECT * FROM stage_metrics FINAL;

-- One row per RolloutDecision. Its figures map is two parallel arrays; the plan (on START only, null and empty on the
-- other decisions) is flattened: the treatment's overrides, the ramp's percent per step, each guardrail's margin.
-- Sorted by event_id alone in one partition, as the raw tables are (0006), so a decision published twice is one row
-- in the view. Decisions are few and are a rollout's history: no TTL.
CREATE TABLE IF NOT EXISTS rollout_decisions
(
    event_id String,
    schema_version UInt16,
    event_time_ms UInt64,
    event_time DateTime DEFAULT toDateTime(intDiv(event_time_ms, 1000)),
    event_date Date DEFAULT toDate(event_time),
    rollout String,
    sequence Int64,
    action Enum8(
        'START' = 1, 'HOLD' = 2, 'ADVANCE' = 3, 'ROLLBACK' = 4, 'COMPLETE' = 5, 'PAUSE' = 6, 'RESUME' = 7, 'ABORT' = 8
    ),
    step Int32,
    percent_before Float64,
    percent_after Float64,
    revision_before Int64,
    revision_after Int64,
    reason String,
    figure_names Array(String),
    figure_values Array(Float64),
    decided_by String,
    control_model Nullable(String),
    treatment_name Nullable(String),
    treatment_model Nullable(String),
    treatment_steps Nullable(UInt16),
    treatment_guidance Nullable(Float64),
    treatment_scheduler Nullable(String),
    step_percents Array(Float64),
    min_users Nullable(Int32),
    alpha Nullable(Float64),
    guardrail_metrics Array(String),
    guardrail_margins Array(Float64),
    guardrail_relative Array(UInt8)
)
ENGINE = ReplacingMergeTree
ORDER BY event_id;

CREATE VIEW IF NOT EXISTS rollout_decisions_dedup AS SELECT * FROM rollout_decisions FINAL;
