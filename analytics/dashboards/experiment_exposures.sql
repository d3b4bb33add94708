-- Experiment exposures: users first exposed to each experiment's variants, per minute (deduplicated results).
SELECT
    toStartOfMinute(first_exposure) AS minute,
    experiment,
    variant,
    count() AS users
FROM experiment_exposures
WHERE $__timeFilter(first_exposure)
GROUP BY minute, experiment, variant
ORDER BY minute, experiment, variant
