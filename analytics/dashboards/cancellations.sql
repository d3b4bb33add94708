-- Cancellations by stage, model pool and model: the requests their callers cancelled, the device time they still
-- took, and the device time their cancellation saved where it is known (a render stopped part way; 0 for a request
-- whose batch rendered anyway); saved_unknown counts those cancelled before their render, whose saving nothing
-- measured.
SELECT
    stage,
    ifNull(pool, '') AS pool,
    model,
    count() AS cancelled,
    sum(device_seconds) AS device_s_spent,
    -- aliases other than the columns' names: 18.16 would read device_seconds_saved below as the alias
    sum(ifNull(device_seconds_saved, 0)) AS device_s_saved,
    countIf(isNull(device_seconds_saved)) AS saved_unknown
FROM stage_metrics_dedup
WHERE $__timeFilter(event_time) AND outcome = 'CANCELLED'
GROUP BY stage, pool, model
ORDER BY cancelled DESC, stage, pool, model
