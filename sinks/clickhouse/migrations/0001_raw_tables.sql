-- Raw events, one row per Avro event, flattened so the same DDL runs on ClickHouse 18.16 and current engines:
-- no Map (arrays of keys and values), no DateTime64 (DateTime seconds plus the exact epoch milliseconds),
-- no LowCardinality (needs an experimental setting on 18.16; Enum8 covers the closed sets).
-- ReplacingMergeTree with event_id last in ORDER BY: a redelivered event has identical values, so it lands in the
-- same partition and sorting key and merges collapse it; merges happen whenever, so readers use the *_dedup views.
-- ORDER BY runs from low to high cardinality. {ttl} is a TTL clause on engines that have table TTL (19.6+),
-- empty on 18.16 where retention drops whole month partitions instead (migrate.drop_expired_partitions).

CREATE TABLE IF NOT EXISTS requests
(
    event_id String,
    request_id String,
    schema_version UInt16,
    event_time_ms UInt64,
    event_time DateTime DEFAULT toDateTime(intDiv(event_time_ms, 1000)),
    event_date Date DEFAULT toDate(event_time),
    kind Enum8('GENERATE' = 1, 'EDIT' = 2),
    user_id String,
    prompt String,
    negative_prompt Nullable(String),
    n UInt8,
    width UInt16,
    height UInt16,
    steps Nullable(UInt16),
    guidance Nullable(Float64),
    seed Nullable(Int64),
    model String,
    source_image_uri Nullable(String),
    mask_uri Nullable(String),
    strength Nullable(Float64),
    experiment_keys Array(String),
    experiment_variants Array(String),
    priority Enum8('INTERACTIVE' = 1, 'BATCH' = 2),
    deadline_ms Nullable(UInt64),
    created_at_ms UInt64,
    reply_topic Nullable(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_date)
ORDER BY (kind, priority, model, event_date, event_id)
{ttl};

CREATE TABLE IF NOT EXISTS results
(
    event_id String,
    request_id String,
    schema_version UInt16,
    event_time_ms UInt64,
    event_time DateTime DEFAULT toDateTime(intDiv(event_time_ms, 1000)),
    event_date Date DEFAULT toDate(event_time),
    status Enum8('SUCCEEDED' = 1, 'REJECTED' = 2, 'FAILED' = 3),
    -- '' and 0 below: the request could not be decoded, so its kind and creation time are unknown
    kind Enum8('' = 0, 'GENERATE' = 1, 'EDIT' = 2),
    user_id String,
    -- images: one element per stored image in each parallel array
    image_count UInt16 DEFAULT length(image_uris),
    image_uris Array(String),
    image_sha256 Array(String),
    image_widths Array(UInt16),
    image_heights Array(UInt16),
    image_formats Array(String),
    image_bytes Array(UInt64),
    -- '' unless REJECTED (Avro null): a plain Enum8 casts cleanly everywhere, Nullable(Enum8) trips 18.16's casts
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
    timing_ms Array(Float64)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_date)
ORDER BY (status, kind, model, event_date, event_id)
{ttl};

CREATE TABLE IF NOT EXISTS stage_metrics
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
PARTITION BY toYYYYMM(event_date)
ORDER BY (stage, outcome, model, event_date, event_id)
{ttl};
