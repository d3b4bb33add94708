-- Failures by error code, as a share of all results in the window.
SELECT
    ifNull(error_code, '') AS code,
    count() AS failures,
    failures / (SELECT count() FROM results_dedup WHERE $__timeFilter(event_time)) AS error_rate
FROM results_dedup
WHERE $__timeFilter(event_time) AND status = 'FAILED'
GROUP BY code
ORDER BY failures DESC, code
