-- Rollout decisions: the latest decisions of every guarded rollout in the window, newest first: the treatment's share
-- of users before and after each, the experiment revision that allocation is (results name it in
-- experiment_revisions), why, and who decided.
SELECT
    event_time,
    rollout,
    action,
    percent_before,
    percent_after,
    revision_after,
    reason,
    decided_by
FROM rollout_decisions_dedup
WHERE $__timeFilter(event_time)
ORDER BY event_time DESC, rollout, sequence DESC
LIMIT 50
