-- Throughput: terminal results per minute, by status (deduplicated rows).
SELECT
    toStartOfMinute(event_time) AS minute,
    count() AS results,
    countIf(status = 'SUCCEEDED') AS succeeded,
    countIf(status = 'REJECTED') AS rejected,
    countIf(status = 'FAILED') AS failed,
    countIf(status = 'CANCELLED') AS cancelled,
    sum(image_count) AS images
FROM results_dedup
WHERE $__timeFilter(event_time)
GROUP BY minute
ORDER BY minute
