-- Latency (queue wait plus compute) by stage per minute: p50 and p95, in milliseconds.
SELECT
    toStartOfMinute(event_time) AS minute,
    stage,
    quantile(0.5)(queue_ms + compute_ms) AS p50_ms,
    quantile(0.95)(queue_ms + compute_ms) AS p95_ms
FROM stage_metrics_dedup
WHERE $__timeFilter(event_time)
GROUP BY minute, stage
ORDER BY minute, stage
