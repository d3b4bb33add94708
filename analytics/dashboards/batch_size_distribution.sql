-- How full the model batches run: stage metrics by stage and batch size.
SELECT
    stage,
    batch_size,
    count() AS events
FROM stage_metrics_dedup
WHERE $__timeFilter(event_time)
GROUP BY stage, batch_size
ORDER BY stage, batch_size
