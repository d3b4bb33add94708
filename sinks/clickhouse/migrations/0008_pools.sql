-- Model pools (ImageResult 4, StageMetric 3): the pool that rendered a request, or that moderation routed it to;
-- null where there was none (a request that ended before routing) and in the events written before pools.
-- Nullable(String) as variant and scheduler are: LowCardinality needs a setting on 18.16.
-- 18.16 has no ADD COLUMN IF NOT EXISTS, so running an ALTER again fails rather than doing nothing.
ALTER TABLE results ADD COLUMN pool Nullable(String);

ALTER TABLE stage_metrics ADD COLUMN pool Nullable(String);

-- A view keeps the columns its SELECT * had when it was made (18.16), so both are made again.
DROP TABLE IF EXISTS results_dedup;
CREATE VIEW IF NOT EXISTS results_dedup AS SELECT * FROM results FINAL;

DROP TABLE IF EXISTS stage_metrics_dedup;
CREATE VIEW IF NOT EXISTS stage_metrics_dedup AS SELECT * FROM stage_metrics FINAL;

-- The latency and cost rollups by pool too ('' where none, and in the rows before this). A rollup merges rows of
-- equal sorting key, so the pool joins the key: MODIFY ORDER BY may append a column the same ALTER adds (18.16 as
-- current engines), and the primary key stays what it was.
ALTER TABLE stage_latency_1m
    ADD COLUMN pool String,
    MODIFY ORDER BY (stage, model, variant, minute, pool);

ALTER TABLE cost_1h
    ADD COLUMN pool String,
    MODIFY ORDER BY (model, variant, hour, pool);

-- The materialized views that fill them, made again with the pool (a view inserts into its table by column name).
DROP TABLE IF EXISTS stage_latency_1m_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS stage_latency_1m_mv TO stage_latency_1m AS
SELECT
    toStartOfMinute(event_time) AS minute,
    stage,
    ifNull(pool, '') AS pool,
    model,
    ifNull(variant, '') AS variant,
    uniqExactState(event_id) AS events,
    quantilesState(0.5, 0.95, 0.99)(queue_ms) AS queue_ms_q,
    quantilesState(0.5, 0.95, 0.99)(compute_ms) AS compute_ms_q
FROM stage_metrics
GROUP BY minute, stage, pool, model, variant;

DROP TABLE IF EXISTS cost_1h_metrics_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS cost_1h_metrics_mv TO cost_1h AS
SELECT
    toStartOfHour(event_time) AS hour,
    ifNull(pool, '') AS pool,
    model,
    ifNull(variant, '') AS variant,
    sum(cost_usd) AS cost_usd,
    sum(device_seconds) AS device_seconds,
    toUInt64(0) AS images
FROM stage_metrics
GROUP BY hour, pool, model, variant;

DROP TABLE IF EXISTS cost_1h_results_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS cost_1h_results_mv TO cost_1h AS
SELECT
    toStartOfHour(event_time) AS hour,
    ifNull(pool, '') AS pool,
    model,
    ifNull(variant, '') AS variant,
    toFloat64(0) AS cost_usd,
    toFloat64(0) AS device_seconds,
    sum(toUInt64(image_count)) AS images
FROM results
WHERE status = 'SUCCEEDED'
GROUP BY hour, pool, model, variant;

-- Cost per image by pool as well: moderation's cost counts in the pool it routed the request to.
DROP TABLE IF EXISTS cost_per_image;
CREATE VIEW IF NOT EXISTS cost_per_image AS
SELECT
    toDate(hour) AS day,
    pool,
    model,
    variant,
    sum(cost_usd) AS total_cost_usd,
    sum(images) AS total_images,
    total_cost_usd / total_images AS usd_per_image
FROM cost_1h
GROUP BY day, pool, model, variant;
