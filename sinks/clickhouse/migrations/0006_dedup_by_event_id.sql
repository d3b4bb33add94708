-- Every replay of an event collapses, whatever else it carries. 0001 sorted the raw tables by (status or outcome,
-- kind or stage, model, event_date, event_id) within month partitions, and a ReplacingMergeTree collapses only rows
-- with equal sorting keys in one partition: a replay with another status (a result looped back through a reply
-- topic as a FAILED one) or written on another day kept a row of its own. Now the sorting key is event_id alone and
-- there is one partition (no PARTITION BY), so FINAL and merges collapse every replay of an id.
-- A result's status is decided once per request (its event id derives from the request id): the replay with the
-- best status wins, SUCCEEDED over REJECTED over FAILED (status_rank, the version column), since a replay that
-- failed (storage down, deadline passed by then) must not hide images that were stored and reported; among equal
-- statuses the last written wins, as for metrics.
-- Retention: table TTL deletes rows on 19.6+; on 18.16, migrate.delete_expired_events (an ALTER ... DELETE).
-- The tables are rebuilt and the rows kept: a new table, the rows copied, then a RENAME swaps the two (18.16 has no
-- EXCHANGE TABLES). A run that stopped halfway can be applied again: copying twice collapses like any replay, and a
-- table left over from a finished swap has had its rows copied. Stop the sink while this runs.

DROP TABLE IF EXISTS results_before_0006;

CREATE TABLE IF NOT EXISTS results_0006
(
    event_id String,
    request_id String,
    schema_version UInt16,
    event_time_ms UInt64,
    event_time DateTime DEFAULT toDateTime(intDiv(event_time_ms, 1000)),
    event_date Date DEFAULT toDate(event_time),
    status Enum8('SUCCEEDED' = 1, 'REJECTED' = 2, 'FAILED' = 3),
    kind Enum8('' = 0, 'GENERATE' = 1, 'EDIT' = 2),
    user_id String,
    image_count UInt16 DEFAULT length(image_uris),
    image_uris Array(String),
    image_sha256 Array(String),
    image_widths Array(UInt16),
    image_heights Array(UInt16),
    image_formats Array(String),
    image_bytes Array(UInt64),
    moderation_stage Enum8('' = 0, 'PROMPT' = 1, 'INPUT_IMAGE' = 2, 'OUTPUT_IMAGE' = 3),
    moderation_categories Array(String),
    moderation_scores Array(Float64),
    error_code Nullable(String),
    error_message Nullable(String),
    model String,
    experiment_keys Array(String),
    experiment_variants Array(String),
    variant Nullable(String),
    request_created_at_ms UInt64,
    timing_stages Array(String),
    timing_ms Array(Float64),
    steps Nullable(UInt16),
    guidance Nullable(Float64),
    scheduler Nullable(String),
    width Nullable(UInt16),
    height Nullable(UInt16),
    seed Nullable(Int64),
    strength Nullable(Float64),
    batch_size Nullable(UInt16),
    -- MATERIALIZED: computed on insert, left out of SELECT * (so out of the views) and of the sink's inserts
    status_rank UInt8 MATERIALIZED multiIf(status = 'SUCCEEDED', 3, status = 'REJECTED', 2, 1)
)
ENGINE = ReplacingMergeTree(status_rank)
ORDER BY event_id
{ttl};

-- The same columns in the same order, so SELECT * copies them by position (MATERIALIZED ones are not inserted).
INSERT INTO results_0006 SELECT * FROM results;

RENAME TABLE results TO results_before_0006, results_0006 TO results;

DROP TABLE results_before_0006;

DROP TABLE IF EXISTS stage_metrics_before_0006;

CREATE TABLE IF NOT EXISTS stage_metrics_0006
(
    event_id String,
    request_id String,
    schema_version UInt16,
    event_time_ms UInt64,
    event_time DateTime DEFAULT toDateTime(intDiv(event_time_ms, 1000)),
    event_date Date DEFAULT toDate(event_time),
    stage Enum8('MODERATION' = 1, 'GENERATE' = 2, 'EDIT' = 3, 'OUTPUT_MODERATION' = 4),
    outcome Enum8('OK' = 1, 'REJECTED' = 2, 'FAILED' = 3),
    queue_ms Float64,
    compute_ms Float64,
    batch_size UInt16,
    device String,
    device_seconds Float64,
    cost_usd Float64,
    worker_id String,
    user_id String,
    model String,
    experiment_keys Array(String),
    experiment_variants Array(String),
    variant Nullable(String)
)
ENGINE = ReplacingMergeTree
ORDER BY event_id
{ttl};

INSERT INTO stage_metrics_0006 SELECT * FROM stage_metrics;

RENAME TABLE stage_metrics TO stage_metrics_before_0006, stage_metrics_0006 TO stage_metrics;

DROP TABLE stage_metrics_before_0006;

-- The views are made again on the new tables: on current engines (chDB's) a materialized view stops firing once
-- its source table is renamed, and 18.16 keeps the columns a view's SELECT * had when it was made.
DROP TABLE IF EXISTS results_dedup;
CREATE VIEW IF NOT EXISTS results_dedup AS SELECT * FROM results FINAL;

DROP TABLE IF EXISTS stage_metrics_dedup;
CREATE VIEW IF NOT EXISTS stage_metrics_dedup AS SELECT * FROM stage_metrics FINAL;

DROP TABLE IF EXISTS stage_latency_1m_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS stage_latency_1m_mv TO stage_latency_1m AS
SELECT
    toStartOfMinute(event_time) AS minute,
    stage,
    model,
    ifNull(variant, '') AS variant,
    uniqExactState(event_id) AS events,
    quantilesState(0.5, 0.95, 0.99)(queue_ms) AS queue_ms_q,
    quantilesState(0.5, 0.95, 0.99)(compute_ms) AS compute_ms_q
FROM stage_metrics
GROUP BY minute, stage, model, variant;

DROP TABLE IF EXISTS cost_1h_metrics_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS cost_1h_metrics_mv TO cost_1h AS
SELECT
    toStartOfHour(event_time) AS hour,
    model,
    ifNull(variant, '') AS variant,
    sum(cost_usd) AS cost_usd,
    sum(device_seconds) AS device_seconds,
    toUInt64(0) AS images
FROM stage_metrics
GROUP BY hour, model, variant;

DROP TABLE IF EXISTS cost_1h_results_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS cost_1h_results_mv TO cost_1h AS
SELECT
    toStartOfHour(event_time) AS hour,
    model,
    ifNull(variant, '') AS variant,
    toFloat64(0) AS cost_usd,
    toFloat64(0) AS device_seconds,
    sum(toUInt64(image_count)) AS images
FROM results
WHERE status = 'SUCCEEDED'
GROUP BY hour, model, variant;

DROP TABLE IF EXISTS rejections_1h_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS rejections_1h_mv TO rejections_1h AS
SELECT
    toStartOfHour(event_time) AS hour,
    moderation_stage,
    moderation_categories[indexOf(moderation_scores, arrayReduce('max', moderation_scores))] AS category,
    model,
    ifNull(variant, '') AS variant,
    uniqExactState(event_id) AS rejections
FROM results
WHERE status = 'REJECTED'
GROUP BY hour, moderation_stage, category, model, variant;
