-- Rejections by moderation stage and top-scoring category, as a share of all results in the window.
SELECT
    moderation_stage,
    moderation_categories[indexOf(moderation_scores, arrayReduce('max', moderation_scores))] AS category,
    count() AS rejections,
    rejections / (SELECT count() FROM results_dedup WHERE $__timeFilter(event_time)) AS rejection_rate
FROM results_dedup
WHERE $__timeFilter(event_time) AND status = 'REJECTED'
GROUP BY moderation_stage, category
ORDER BY rejections DESC, moderation_stage, category
