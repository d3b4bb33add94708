-- Cost per image by model pool, model and variant: every stage's cost over the images of successful results.
-- Moderation's cost counts in the pool it routed the request to; '' where there was none.
SELECT
    pool,
    model,
    variant,
    sum(cost) AS total_cost_usd,
    sum(image_n) AS total_images,
    if(total_images = 0, 0, total_cost_usd / total_images) AS usd_per_image
FROM
(
    SELECT
        ifNull(pool, '') AS pool,
        model,
        ifNull(variant, '') AS variant,
        cost_usd AS cost,
        toUInt64(0) AS image_n
    FROM stage_metrics_dedup
    WHERE $__timeFilter(event_time)
    UNION ALL
    SELECT
        ifNull(pool, '') AS pool,
        model,
        ifNull(variant, '') AS variant,
        toFloat64(0) AS cost,
        toUInt64(image_count) AS image_n
    FROM results_dedup
    WHERE $__timeFilter(event_time) AND status = 'SUCCEEDED'
)
GROUP BY pool, model, variant
ORDER BY pool, model, variant
