"""Typed events to row tuples for the raw tables of migrations/ (0006_dedup_by_event_id.sql declares results and
stage_metrics whole, later migrations add columns; 0009_rollouts.sql declares rollout_decisions).

One pure function per table; the column tuples name the columns in row order. Columns with a DEFAULT
(event_time, event_date, image_count) or MATERIALIZED (status_rank) are left to ClickHouse, so both backends derive
them the same way.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pixelpipe.core.events import ImageResult, RolloutDecision, StageMetric

Row = tuple[Any, ...]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MILLISECOND = dt.timedelta(milliseconds=1)

RESULT_COLUMNS = (
    "event_id",
    "request_id",
    "schema_version",
    "event_time_ms",
    "status",
    "kind",
    "user_id",
    "image_uris",
    "image_sha256",
    "image_widths",
    "image_heights",
    "image_formats",
    "image_bytes",
    "moderation_stage",
    "moderation_categories",
    "moderation_scores",
    "error_code",
    "error_message",
    "model",
    "experiment_keys",
    "experiment_variants",
    "variant",
    "request_created_at_ms",
    "timing_stages",
    "timing_ms",
    "steps",
    "guidance",
    "scheduler",
    "width",
    "height",
    "seed",
    "strength",
    "batch_size",
    "pool",
    "experiment_revisions",
)

METRIC_COLUMNS = (
    "event_id",
    "request_id",
    "schema_version",
    "event_time_ms",
    "stage",
    "outcome",
    "queue_ms",
    "compute_ms",
    "batch_size",
    "device",
    "device_seconds",
    "cost_usd",
    "worker_id",
    "user_id",
    "model",
    "experiment_keys",
    "experiment_variants",
    "variant",
    "device_seconds_saved",
    "pool",
    "experiment_revisions",
)

ROLLOUT_COLUMNS = (
    "event_id",
    "schema_version",
    "event_time_ms",
    "rollout",
    "sequence",
    "action",
    "step",
    "percent_before",
    "percent_after",
    "revision_before",
    "revision_after",
    "reason",
    "figure_names",
    "figure_values",
    "decided_by",
    "control_model",
    "treatment_name",
    "treatment_model",
    "treatment_steps",
    "treatment_guidance",
    "treatment_scheduler",
    "step_percents",
    "min_users",
    "alpha",
    "guardrail_metrics",
    "guardrail_margins",
    "guardrail_relative",
)


def epoch_ms(value: dt.datetime | int) -> int:
    """fastavro reads timestamp-millis as an aware datetime; integer arithmetic keeps the milliseconds exact."""
    if isinstance(value, int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return (value - _EPOCH) // _MILLISECOND


def _sorted_map(mapping: dict[str, Any]) -> tuple[list[str], list[Any]]:
    # Avro maps become parallel key and value arrays (no Map type on 18.16); sorted so equal maps give equal rows.
    keys = sorted(mapping)
    return keys, [mapping[key] for key in keys]


def _experiment_arrays(event: ImageResult | StageMetric) -> tuple[list[str], list[str], list[int]]:
    """experiment_keys, experiment_variants and experiment_revisions, aligned: each key's revision, 0 where the
    event names none (an experiment of the experiments file)."""
    keys, variants = _sorted_map(event.experiments)
    return keys, variants, [event.experiment_revisions.get(key, 0) for key in keys]


def result_row(result: ImageResult) -> Row:
    """An ImageResult as a `results` row, in RESULT_COLUMNS order."""
    images = result.images
    scores = result.moderation_scores
    experiment_keys, experiment_variants, experiment_revisions = _experiment_arrays(result)
    timing_stages, timing_ms = _sorted_map(result.timings_ms)
    return (
        result.event_id,
        result.request_id,
        result.schema_version,
        epoch_ms(result.event_time),
        result.status,
        result.kind or "",
        result.user_id,
        [image.uri for image in images],
        [image.sha256 for image in images],
        [image.width for image in images],
        [image.height for image in images],
        [image.format for image in images],
        [image.bytes for image in images],
        result.moderation_stage or "",
        [score.category for score in scores],
        [score.score for score in scores],
        result.error_code,
        result.error_message,
        result.model,
        experiment_keys,
        experiment_variants,
        result.variant,
        epoch_ms(result.request_created_at) if result.request_created_at else 0,
        timing_stages,
        timing_ms,
        result.steps,
        result.guidance,
        result.scheduler,
        result.width,
        result.height,
        result.seed,
        result.strength,
        result.batch_size,
        result.pool,
        experiment_revisions,
    )


def metric_row(metric: StageMetric) -> Row:
    """A StageMetric as a `stage_metrics` row, in METRIC_COLUMNS order."""
    experiment_keys, experiment_variants, experiment_revisions = _experiment_arrays(metric)
    return (
        metric.event_id,
        metric.request_id,
        metric.schema_version,
        epoch_ms(metric.event_time),
        metric.stage,
        metric.outcome,
        metric.queue_ms,
        metric.compute_ms,
        metric.batch_size,
        metric.device,
        metric.device_seconds,
        metric.cost_usd,
        metric.worker_id,
        metric.user_id,
        metric.model,
        experiment_keys,
        experiment_variants,
        metric.variant,
        metric.device_seconds_saved,
        metric.pool,
        experiment_revisions,
    )


def rollout_row(decision: RolloutDecision) -> Row:
    """A RolloutDecision as a `rollout_decisions` row, in ROLLOUT_COLUMNS order: the plan's fields are null (its
    arrays empty) on every decision but START."""
    figure_names, figure_values = _sorted_map(decision.figures)
    plan = decision.plan
    treatment = plan.treatment if plan else None
    guardrails = plan.guardrails if plan else []
    return (
        decision.event_id,
        decision.schema_version,
        epoch_ms(decision.event_time),
        decision.rollout,
        decision.sequence,
        decision.action,
        decision.step,
        decision.percent_before,
        decision.percent_after,
        decision.revision_before,
        decision.revision_after,
        decision.reason,
        figure_names,
        figure_values,
        decision.decided_by,
        plan.control_model if plan else None,
        treatment.name if treatment else None,
        treatment.model if treatment else None,
        treatment.steps if treatment else None,
        treatment.guidance if treatment else None,
        treatment.scheduler if treatment else None,
        plan.steps if plan else [],
        plan.min_users if plan else None,
        plan.alpha if plan else None,
        [limit.metric for limit in guardrails],
        [limit.margin for limit in guardrails],
        [int(limit.relative) for limit in guardrails],
    )
