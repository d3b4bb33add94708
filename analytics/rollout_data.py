"""The data of one rollout step, from ClickHouse: per arm, what ``guardrails.decide`` takes for each guardrail metric.

A step is one revision of the rollout's experiment, so only rows whose ``experiment_revisions`` names that revision
for the key are read (``experiment_revisions[indexOf(experiment_keys, key)]``, migration 0009): within a revision
the allocation is constant, and results that land late still count in the step they were assigned in.

Per user (one per arm within a revision: assignment is by user), over the step's results and stage metrics:

* ``failure_rate``: the share of the user's requests that ended FAILED;
* ``moderation_rejection_rate``: the share REJECTED at OUTPUT_IMAGE (the candidate's images refused; a prompt
  refused before rendering says nothing of the model);
* ``cost_per_image``: the user's cost over every stage divided by their images (users with an image);
* ``latency_p95``: the user's mean latency of succeeded requests (result time - request created, ms), whose p95
  over users the guardrail takes; the values themselves leave ClickHouse, capped per arm as ``sufficient_stats``
  caps them.

The shares and the cost leave ClickHouse as sums and sums of squares only. The SQL keeps to what ClickHouse 18.16
and chDB both accept, as ``sufficient_stats`` does: a UNION ALL of both tables grouped, no JOIN.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pixelpipe.analytics.guardrails import ArmData
from pixelpipe.analytics.stats import MeanStats
from pixelpipe.analytics.sufficient_stats import QUANTILE_SAMPLE_CAP, Client, quote

# The metrics a rollout's guardrails may name: the ones this query measures.
STEP_METRICS = ("failure_rate", "moderation_rejection_rate", "latency_p95", "cost_per_image")

_COLUMNS = (
    "arm",
    "users",
    "failure_sum",
    "failure_sum_sq",
    "rejection_sum",
    "rejection_sum_sq",
    "cost_users",
    "cost_sum",
    "cost_sum_sq",
    "latencies",
)


def step_sql(key: str, revision: int, cap: int = QUANTILE_SAMPLE_CAP) -> str:
    """One row per arm of the step (revision ``revision`` of experiment ``key``), in ``_COLUMNS`` order."""
    k = quote(key)
    arm = f"experiment_variants[indexOf(experiment_keys, {k})] AS arm"
    in_step = f"has(experiment_keys, {k}) AND experiment_revisions[indexOf(experiment_keys, {k})] = {int(revision)}"
    return f"""SELECT arm,
    count() AS users,
    sum(failed / requests) AS failure_sum,
    sum(pow(failed / requests, 2)) AS failure_sum_sq,
    sum(rejected / requests) AS rejection_sum,
    sum(pow(rejected / requests, 2)) AS rejection_sum_sq,
    countIf(images > 0) AS cost_users,
    sumIf(cost / images, images > 0) AS cost_sum,
    sumIf(pow(cost / images, 2), images > 0) AS cost_sum_sq,
    groupArrayIf({int(cap)})(latency_sum / successes, successes > 0) AS latencies
FROM (
    SELECT user_id, arm, sum(e_request) AS requests, sum(e_failed) AS failed, sum(e_rejected) AS rejected,
        sum(e_success) AS successes, sum(e_latency) AS latency_sum, sum(e_images) AS images, sum(e_cost) AS cost
    FROM (
        SELECT user_id, {arm}, toFloat64(1) AS e_request, toFloat64(status = 'FAILED') AS e_failed,
            toFloat64(status = 'REJECTED' AND moderation_stage = 'OUTPUT_IMAGE') AS e_rejected,
            toFloat64(status = 'SUCCEEDED') AS e_success,
            if(status = 'SUCCEEDED', toFloat64(event_time_ms) - toFloat64(request_created_at_ms), 0) AS e_latency,
            toFloat64(if(status = 'SUCCEEDED', image_count, 0)) AS e_images, toFloat64(0) AS e_cost
        FROM results_dedup WHERE {in_step}
        UNION ALL
        SELECT user_id, {arm}, toFloat64(0) AS e_request, toFloat64(0) AS e_failed, toFloat64(0) AS e_rejected,
            toFloat64(0) AS e_success, toFloat64(0) AS e_latency, toFloat64(0) AS e_images,
            toFloat64(cost_usd) AS e_cost
        FROM stage_metrics_dedup WHERE {in_step}
    )
    GROUP BY user_id, arm
)
WHERE requests > 0
GROUP BY arm
ORDER BY arm"""


def fetch_arms(client: Client, key: str, revision: int) -> dict[str, ArmData]:
    """Each arm's data for the guardrails in this step, by variant name; an arm without results yet is absent."""
    return {
        str(row[0]): arm_data(dict(zip(_COLUMNS, row, strict=True))) for row in client.execute(step_sql(key, revision))
    }


def arm_data(row: Mapping[str, Any]) -> ArmData:
    """One arm's row of ``step_sql`` as ``guardrails.decide`` takes it."""
    users = int(row["users"])
    return {
        "failure_rate": MeanStats(users, float(row["failure_sum"]), float(row["failure_sum_sq"])),
        "moderation_rejection_rate": MeanStats(users, float(row["rejection_sum"]), float(row["rejection_sum_sq"])),
        "cost_per_image": MeanStats(int(row["cost_users"]), float(row["cost_sum"]), float(row["cost_sum_sq"])),
        "latency_p95": np.asarray(row["latencies"], dtype=float),
    }
