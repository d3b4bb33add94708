-- Rollups kept by materialized views on insert, so dashboards read minutes or hours instead of raw events.
-- A view sees each inserted block, not the deduplicated table: event counts use uniqExact(event_id) and stay
-- exact when an event is delivered twice, while quantiles and sums would count a redelivered event again.
-- Read states with the -Merge combinators, e.g. quantilesMerge(0.5, 0.95, 0.99)(compute_ms_q).

CREATE TABLE IF NOT EXISTS stage_latency_1m
(
    minute DateTime,
    stage Enum8('MODERATION' = 1, 'GENERATE' = 2, 'EDIT' = 3, 'OUTPUT_MODERATION' = 4),
    model String,
    variant String,
    events AggregateFunction(uniqExact, String),
    queue_ms_q AggregateFunction(quantiles(0.5, 0.95, 0.99), Float64),
    compute_ms_q AggregateFunction(quantiles(0.5, 0.95, 0.99), Float64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (stage, model, variant, minute);

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

-- Cost comes from stage_metrics and images from results: two views feed one summing table, each filling its
-- own columns with zeros for the other's, and cost per image is their ratio after summing.
CREATE TABLE IF NOT EXISTS cost_1h
(
    hour DateTime,
    model String,
    variant String,
    cost_usd Float64,
    device_seconds Float64,
    images UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (model, variant, hour);

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

CREATE VIEW IF NOT EXISTS cost_per_image AS
SELECT
    toDate(hour) AS day,
    model,
    variant,
    sum(cost_usd) AS total_cost_usd,
    sum(images) AS total_images,
    total_cost_usd / total_images AS usd_per_image
FROM cost_1h
GROUP BY day, model, variant;

-- The category of a rejection is its highest-scoring one ('' when the result carries no scores).
CREATE TABLE IF NOT EXISTS rejections_1h
(
    hour DateTime,
    moderation_stage Enum8('' = 0, 'PROMPT' = 1, 'INPUT_IMAGE' = 2, 'OUTPUT_IMAGE' = 3),
    category String,
    model String,
    variant String,
    rejections AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (moderation_stage, category, model, variant, hour);

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
