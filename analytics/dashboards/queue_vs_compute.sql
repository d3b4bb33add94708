-- Where the time goes: mean queue wait and compute by stage and model, and the queue's share of the total.
SELECT
    stage,
    model,
    avg(queue_ms) AS avg_queue_ms,
    avg(compute_ms) AS avg_compute_ms,
    sum(queue_ms) / (sum(queue_ms) + sum(compute_ms)) AS queue_share
FROM stage_metrics_dedup
WHERE $__timeFilter(event_time)
GROUP BY stage, model
ORDER BY stage, model
