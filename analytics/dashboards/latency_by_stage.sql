-- p50 / p95 / p99 latency (queue wait plus compute) by stage, in milliseconds.
SELECT
    stage,
    count() AS events,
    quantile(0.5)(queue_ms + compute_ms) AS p50_ms,
    quantile(0.95)(queue_ms + compute_ms) AS p95_ms,
    quantile(0.99)(queue_ms + compute_ms) AS p99_ms
FROM stage_metrics_dedup
WHERE $__timeFilter(event_time)
GROUP BY stage
ORDER BY stage
