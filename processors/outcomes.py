"""How a request ended and what a stage measured, turned into the ImageResult and StageMetric events.

Result and metric ids derive from the request id, so a request processed twice (a redelivery after a crash)
emits events with the same ids, and the deduplicated ClickHouse tables count it once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pixelpipe.core.events import (
    CategoryScore,
    ImageRequest,
    ImageResult,
    ModerationStage,
    ResultStatus,
    Stage,
    StageMetric,
    StageOutcome,
    StoredImage,
)
from pixelpipe.core.ids import derived_event_id

MAX_ERROR_MESSAGE_CHARS = 2000


@dataclass
class Outcome:
    """How a request ended, as the result will say."""

    status: ResultStatus
    images: list[StoredImage] = field(default_factory=list)
    moderation_stage: ModerationStage | None = None
    moderation_scores: dict[str, float] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str | None = None
    rejected_categories: list[str] = field(default_factory=list)  # REJECTED: the categories over their threshold

    @classmethod
    def failed(cls, code: str, message: str) -> Outcome:
        return cls("FAILED", error_code=code, error_message=message[:MAX_ERROR_MESSAGE_CHARS])

    @classmethod
    def cancelled(cls, how: str) -> Outcome:
        """Its caller cancelled it (a Cancellation on the cancellations topic); ``how`` says when and what was done."""
        return cls("CANCELLED", error_message=how)

    @classmethod
    def rejected(cls, stage: ModerationStage, scores: dict[str, float], categories: list[str]) -> Outcome:
        return cls(
            "REJECTED",
            moderation_stage=stage,
            moderation_scores=scores,
            error_code="MODERATION_REJECTED",
            error_message=f"{stage.lower().replace('_', ' ')} rejected: {', '.join(categories)}",
            rejected_categories=list(categories),
        )

    @property
    def stage_outcome(self) -> StageOutcome:
        outcomes = {"SUCCEEDED": "OK", "REJECTED": "REJECTED", "CANCELLED": "CANCELLED"}
        return outcomes.get(self.status, "FAILED")  # type: ignore[return-value]


@dataclass(frozen=True)
class RenderParams:
    """The final parameters of one request's render: the request's own, then its experiment variants' overrides,
    then the model's defaults. Requests with equal parameters can share one model call."""

    model: str
    steps: int
    guidance: float
    scheduler: str
    width: int
    height: int
    n: int
    strength: float | None = None  # EDIT
    inpaint: bool = False  # EDIT with a mask


@dataclass(frozen=True)
class Rendered:
    """What ran for one request: its parameters, its seed and how many requests shared the call."""

    params: RenderParams
    seed: int
    batch_size: int


def image_result(
    request: ImageRequest,
    outcome: Outcome,
    timings_ms: dict[str, float],
    rendered: Rendered | None,
    pool: str | None,
    model: str | None = None,
) -> ImageResult:
    """``model``: the model a request that ended unrendered would have run with (after its variants' overrides);
    the request's own when None."""
    params = rendered.params if rendered else None
    return ImageResult(
        event_id=derived_event_id(request.request_id, "result"),
        request_id=request.request_id,
        status=outcome.status,
        kind=request.kind,
        user_id=request.user_id,
        images=outcome.images,
        moderation_stage=outcome.moderation_stage,
        moderation_scores=[
            CategoryScore(category=c, score=float(s)) for c, s in sorted(outcome.moderation_scores.items())
        ],
        error_code=outcome.error_code,
        error_message=outcome.error_message,
        model=params.model if params else (model or request.model),
        experiments=dict(request.experiments),
        variant=request.variant,
        request_created_at=request.created_at,
        timings_ms=timings_ms,
        steps=params.steps if params else None,
        guidance=params.guidance if params else None,
        scheduler=params.scheduler if params else None,
        width=params.width if params else None,
        height=params.height if params else None,
        seed=rendered.seed if rendered else None,
        strength=params.strength if params else None,
        batch_size=rendered.batch_size if rendered else None,
        pool=pool,
        experiment_revisions=dict(request.experiment_revisions),
    )


def unreadable_result(request_id: str, outcome: Outcome, pool: str | None) -> ImageResult:
    """The result of a request whose event could not be read: only its id (the Kafka key) is known."""
    return ImageResult(
        event_id=derived_event_id(request_id, "result"),
        request_id=request_id,
        status=outcome.status,
        user_id="",
        error_code=outcome.error_code,
        error_message=outcome.error_message,
        model="",
        pool=pool,
    )


@dataclass(frozen=True)
class StageWork:
    """What a stage measured for one request."""

    stage: Stage
    outcome: StageOutcome
    queue_ms: float
    compute_ms: float
    device: str
    device_seconds: float
    batch_size: int = 1
    device_seconds_saved: float | None = None  # CANCELLED: what the cancellation spared; None where unknown


def stage_metric(
    request: ImageRequest, work: StageWork, model: str, pool: str | None, worker_id: str, device_hour_price_usd: float
) -> StageMetric:
    return StageMetric(
        event_id=derived_event_id(request.request_id, f"metric/{work.stage}"),
        request_id=request.request_id,
        stage=work.stage,
        outcome=work.outcome,
        queue_ms=max(0.0, work.queue_ms),
        compute_ms=work.compute_ms,
        batch_size=work.batch_size,
        device=work.device,
        device_seconds=work.device_seconds,
        cost_usd=work.device_seconds * device_hour_price_usd / 3600.0,
        worker_id=worker_id,
        user_id=request.user_id,
        model=model,
        experiments=dict(request.experiments),
        variant=request.variant,
        device_seconds_saved=work.device_seconds_saved,
        pool=pool,
        experiment_revisions=dict(request.experiment_revisions),
    )
