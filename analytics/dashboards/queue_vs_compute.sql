-- Where the time goes: mean queue wait and compute by stage, model pool and model, and the queue's share of the
-- total. The pool is '' where there was none (a request that ended at moderation, an event older than pools).
SELECT
    stage,
    ifNull(pool, '') AS pool,
    model,
    avg(queue_ms) AS avg_queue_ms,
    avg(compute_ms) AS avg_compute_ms,
    sum(queue_ms) / (sum(queue_ms) + sum(compute_ms)) AS queue_share
FROM stage_metrics_dedup
WHERE $__timeFilter(event_time)
GROUP BY stage, pool, model
ORDER BY stage, pool, model
