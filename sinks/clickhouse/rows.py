"""Typed events to row tuples for the raw tables of migrations/ (0006_dedup_by_event_id.sql declares them whole,
later migrations add columns).

One pure function per table; the column tuples name the columns in row order. Columns with a DEFAULT
(event_time, event_date, image_count) or MATERIALIZED (status_rank) are left to ClickHouse, so both backends derive
them the same way.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pixelpipe.core.events import ImageResult, StageMetric

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


def result_row(result: ImageResult) -> Row:
    """An ImageResult as a `results` row, in RESULT_COLUMNS order."""
    images = result.images
    scores = result.moderation_scores
    experiment_keys, experiment_variants = _sorted_map(result.experiments)
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
    )


def metric_row(metric: StageMetric) -> Row:
    """A StageMetric as a `stage_metrics` row, in METRIC_COLUMNS order."""
    experiment_keys, experiment_variants = _sorted_map(metric.experiments)
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
    )
