"""The events the stages emit: ImageResult, StageMetric and DeadLetter records.

Result and metric ids derive from the request id, so a request processed twice (a redelivery after a crash)
emits events with the same ids, and the deduplicated ClickHouse tables count it once.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

from pixelpipe.schemas.codec import Record

_EVENT_NAMESPACE = uuid.UUID("6f1e3c2a-8d4b-4f0e-9a7c-5b2d1e0f3a4c")


def derived_event_id(request_id: str, what: str) -> str:
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{request_id}/{what}"))


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def variant_label(request: Record) -> str | None:
    """``experiment:variant`` pairs of the request, sorted; None outside experiments."""
    experiments = request.get("experiments") or {}
    return ",".join(f"{k}:{v}" for k, v in sorted(experiments.items())) or None


@dataclass
class Outcome:
    """How a request ended, as the result will say."""

    status: str  # SUCCEEDED, REJECTED, FAILED
    images: list[Record] = field(default_factory=list)
    moderation_stage: str | None = None
    moderation_scores: dict[str, float] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str | None = None

    @classmethod
    def failed(cls, code: str, message: str) -> Outcome:
        return cls("FAILED", error_code=code, error_message=message[:2000])

    @classmethod
    def rejected(cls, stage: str, scores: dict[str, float], categories: list[str]) -> Outcome:
        return cls(
            "REJECTED",
            moderation_stage=stage,
            moderation_scores=scores,
            error_code="MODERATION_REJECTED",
            error_message=f"{stage.lower().replace('_', ' ')} rejected: {', '.join(categories)}",
        )


def result_record(request: Record, outcome: Outcome, timings_ms: dict[str, float]) -> Record:
    return {
        "event_id": derived_event_id(request["request_id"], "result"),
        "request_id": request["request_id"],
        "schema_version": 1,
        "event_time": utc_now(),
        "status": outcome.status,
        "kind": request["kind"],
        "user_id": request["user_id"],
        "images": outcome.images,
        "moderation_stage": outcome.moderation_stage,
        "moderation_scores": [{"category": c, "score": float(s)} for c, s in sorted(outcome.moderation_scores.items())],
        "error_code": outcome.error_code,
        "error_message": outcome.error_message,
        "model": request["model"],
        "experiments": dict(request.get("experiments") or {}),
        "variant": variant_label(request),
        "request_created_at": request["created_at"],
        "timings_ms": timings_ms,
    }


@dataclass(frozen=True)
class StageWork:
    """What a stage measured for one request."""

    stage: str  # MODERATION, GENERATE, EDIT, OUTPUT_MODERATION
    outcome: str  # OK, REJECTED, FAILED
    queue_ms: float
    compute_ms: float
    device: str
    device_seconds: float
    batch_size: int = 1


def metric_record(request: Record, work: StageWork, worker_id: str, device_hour_price_usd: float) -> Record:
    return {
        "event_id": derived_event_id(request["request_id"], f"metric/{work.stage}"),
        "request_id": request["request_id"],
        "schema_version": 1,
        "event_time": utc_now(),
        "stage": work.stage,
        "outcome": work.outcome,
        "queue_ms": max(0.0, work.queue_ms),
        "compute_ms": work.compute_ms,
        "batch_size": work.batch_size,
        "device": work.device,
        "device_seconds": work.device_seconds,
        "cost_usd": work.device_seconds * device_hour_price_usd / 3600.0,
        "worker_id": worker_id,
        "user_id": request["user_id"],
        "model": request["model"],
        "experiments": dict(request.get("experiments") or {}),
        "variant": variant_label(request),
    }


def dead_letter_record(
    *,
    value: bytes,
    key: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    reason: str,
    stage: str,
    request_id: str | None = None,
) -> Record:
    return {
        "event_id": derived_event_id(f"{topic}/{partition}/{offset}", "dead-letter"),
        "request_id": request_id,
        "schema_version": 1,
        "event_time": utc_now(),
        "original_key": key,
        "original_value": value,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "error_reason": reason[:4000],
        "stage": stage,
    }
