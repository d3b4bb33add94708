-- First exposure of each user to each experiment: the moment their first request in it was created.
-- A view over the deduplicated results, so a redelivered event never moves or repeats an exposure.
CREATE VIEW IF NOT EXISTS experiment_exposures AS
SELECT
    experiment,
    variant,
    user_id,
    min(request_created_at_ms) AS first_exposure_ms,
    toDateTime(intDiv(min(request_created_at_ms), 1000)) AS first_exposure
FROM results_dedup
ARRAY JOIN experiment_keys AS experiment, experiment_variants AS variant
WHERE request_created_at_ms > 0
GROUP BY experiment, variant, user_id;
