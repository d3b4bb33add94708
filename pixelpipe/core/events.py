"""Typed events: the contracts of ``schemas/*.avsc`` as dataclasses.

Code works with these classes; ``to_avro()`` and ``from_avro()`` turn them into and out of the plain records
fastavro reads and writes, at the codec boundary only. ``tests/unit/test_events.py`` checks every class against
its ``.avsc`` file: the same fields, the same defaults.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self, TypeVar

from pixelpipe.core.clock import utc_now
from pixelpipe.core.ids import derived_event_id, new_event_id

Record = dict[str, Any]

RequestKind = Literal["GENERATE", "EDIT"]
Priority = Literal["INTERACTIVE", "BATCH"]
ResultStatus = Literal["SUCCEEDED", "REJECTED", "FAILED", "CANCELLED"]
ModerationStage = Literal["PROMPT", "INPUT_IMAGE", "OUTPUT_IMAGE"]
Stage = Literal["MODERATION", "GENERATE", "EDIT", "OUTPUT_MODERATION"]
StageOutcome = Literal["OK", "REJECTED", "FAILED", "CANCELLED"]

MAX_DEAD_LETTER_REASON_CHARS = 4000
R = TypeVar("R", bound="AvroRecord")


class AvroRecord:
    """Plain conversion between a dataclass and its Avro record; records with nested records override the two."""

    __slots__ = ()
    schema_name: ClassVar[str]

    def to_avro(self) -> Record:
        return {name: getattr(self, name) for name, _ in _slots(type(self))}

    @classmethod
    def from_avro(cls, record: Record) -> Self:
        return _filled(cls, record)


def _filled(cls: type[R], record: Record) -> R:
    # A decoded Avro record has every field, so the slots are set directly: cls(**record) spends a third of a
    # decode matching twenty-odd keyword names.
    event = object.__new__(cls)
    for name, set_slot in _slots(cls):
        set_slot(event, record[name])
    return event


_SLOTS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _slots(cls: type) -> tuple[tuple[str, Any], ...]:
    """Each field's name and its slot's setter, in field order."""
    if cls not in _SLOTS:
        _SLOTS[cls] = tuple((f.name, cls.__dict__[f.name].__set__) for f in dataclasses.fields(cls))
    return _SLOTS[cls]


@dataclass(kw_only=True, slots=True)
class ImageRequest(AvroRecord):
    """A request to generate images from a prompt (GENERATE) or to edit an existing image (EDIT)."""

    schema_name: ClassVar[str] = "ImageRequest"

    event_id: str = field(default_factory=new_event_id)
    request_id: str
    schema_version: int = 3  # 2 added reference_image_uris, 3 experiment_revisions
    event_time: dt.datetime = field(default_factory=utc_now)
    kind: RequestKind
    user_id: str
    prompt: str
    negative_prompt: str | None = None
    n: int = 1
    width: int = 512
    height: int = 512
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    model: str
    source_image_uri: str | None = None
    reference_image_uris: list[str] = field(default_factory=list)  # EDIT: images besides the source (some models)
    mask_uri: str | None = None
    strength: float | None = None
    experiments: dict[str, str] = field(default_factory=dict)
    priority: Priority = "BATCH"
    deadline: dt.datetime | None = None
    created_at: dt.datetime = field(default_factory=utc_now)
    reply_topic: str | None = None
    experiment_revisions: dict[str, int] = field(default_factory=dict)  # set by moderation: the allocation in force

    @property
    def variant(self) -> str | None:
        """``experiment:variant`` pairs, sorted; None outside experiments."""
        return ",".join(f"{k}:{v}" for k, v in sorted(self.experiments.items())) or None


@dataclass(kw_only=True, slots=True)
class StoredImage(AvroRecord):
    uri: str
    sha256: str
    width: int
    height: int
    format: str  # PNG, JPEG or WEBP
    bytes: int


@dataclass(kw_only=True, slots=True)
class CategoryScore(AvroRecord):
    category: str
    score: float


@dataclass(kw_only=True, slots=True)
class ImageResult(AvroRecord):
    """The one terminal outcome of a request, with the parameters that actually ran."""

    schema_name: ClassVar[str] = "ImageResult"

    event_id: str
    request_id: str
    schema_version: int = 4  # 2 added what ran, 3 the status CANCELLED, 4 the pool and experiment_revisions
    event_time: dt.datetime = field(default_factory=utc_now)
    status: ResultStatus
    kind: RequestKind | None = None
    user_id: str
    images: list[StoredImage] = field(default_factory=list)
    moderation_stage: ModerationStage | None = None
    moderation_scores: list[CategoryScore] = field(default_factory=list)
    error_code: str | None = None
    error_message: str | None = None
    model: str
    experiments: dict[str, str] = field(default_factory=dict)
    variant: str | None = None
    request_created_at: dt.datetime | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    # What ran (set once a render stage fixed the final parameters, after overrides and model defaults).
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    strength: float | None = None
    batch_size: int | None = None
    pool: str | None = None  # the pool that rendered it, or that moderation routed it to
    experiment_revisions: dict[str, int] = field(default_factory=dict)  # the allocation in force when assigned

    def to_avro(self) -> Record:
        return AvroRecord.to_avro(self) | {
            "images": [image.to_avro() for image in self.images],
            "moderation_scores": [score.to_avro() for score in self.moderation_scores],
        }

    @classmethod
    def from_avro(cls, record: Record) -> Self:
        return _filled(
            cls,
            record
            | {
                "images": [StoredImage.from_avro(image) for image in record["images"]],
                "moderation_scores": [CategoryScore.from_avro(score) for score in record["moderation_scores"]],
            },
        )


@dataclass(kw_only=True, slots=True)
class StageMetric(AvroRecord):
    """Latency and cost of one request passing one stage."""

    schema_name: ClassVar[str] = "StageMetric"

    event_id: str
    request_id: str
    schema_version: int = 3  # 2 added the outcome CANCELLED and device_seconds_saved, 3 the pool, experiment_revisions
    event_time: dt.datetime = field(default_factory=utc_now)
    stage: Stage
    outcome: StageOutcome
    queue_ms: float
    compute_ms: float
    batch_size: int = 1
    device: str
    device_seconds: float
    cost_usd: float
    worker_id: str
    user_id: str
    model: str
    experiments: dict[str, str] = field(default_factory=dict)
    variant: str | None = None
    device_seconds_saved: float | None = None  # CANCELLED: what the cancellation spared; None where unknown
    pool: str | None = None  # the pool that rendered it, or that moderation routed it to
    experiment_revisions: dict[str, int] = field(default_factory=dict)  # the allocation in force when assigned


@dataclass(kw_only=True, slots=True)
class DeadLetter(AvroRecord):
    """An event that could not be processed, kept whole with the reason."""

    schema_name: ClassVar[str] = "DeadLetter"

    event_id: str
    request_id: str | None = None
    schema_version: int = 1
    event_time: dt.datetime = field(default_factory=utc_now)
    original_key: bytes | None = None
    original_value: bytes
    topic: str
    partition: int
    offset: int
    error_reason: str
    stage: str

    @classmethod
    def of(
        cls,
        *,
        value: bytes | None,
        key: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        reason: str,
        stage: str,
        request_id: str | None,
    ) -> DeadLetter:
        """The dead letter of the message at ``topic``/``partition``/``offset``, given up by ``stage``.

        Its id derives from where the message was and who gave up, so a replay dead-letters it under the same id.
        A tombstone's null value is kept as empty bytes (the reason says what was wrong with it).
        """
        return cls(
            event_id=derived_event_id(f"{topic}/{partition}/{offset}", f"dead-letter/{stage}"),
            request_id=request_id,
            original_key=key,
            original_value=value or b"",
            topic=topic,
            partition=partition,
            offset=offset,
            error_reason=reason[:MAX_DEAD_LETTER_REASON_CHARS],
            stage=stage,
        )


@dataclass(kw_only=True, slots=True)
class Cancellation(AvroRecord):
    """A caller gave up on a request; keyed by its request id on the compacted cancellations topic."""

    schema_name: ClassVar[str] = "Cancellation"

    event_id: str = field(default_factory=new_event_id)
    request_id: str
    schema_version: int = 1
    event_time: dt.datetime = field(default_factory=utc_now)
    reason: str | None = None
    requested_by: str | None = None


@dataclass(kw_only=True, slots=True)
class ModelPool(AvroRecord):
    """A model pool: models its render workers serve, on render topics of their own; keyed by its name on the
    compacted model-pools topic (``pixelpipe.core.pools``)."""

    schema_name: ClassVar[str] = "ModelPool"

    event_id: str = field(default_factory=new_event_id)
    schema_version: int = 1
    event_time: dt.datetime = field(default_factory=utc_now)
    name: str
    models: list[str]
    partitions: int | None = None
    min_replicas: int = 1
    max_replicas: int | None = None
    lag_threshold: int = 16
    applied_by: str | None = None


ExperimentState = Literal["RUNNING", "STOPPED"]


@dataclass(kw_only=True, slots=True)
class VariantDefinition(AvroRecord):
    name: str
    weight: float
    model: str | None = None
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None


@dataclass(kw_only=True, slots=True)
class ExperimentDefinition(AvroRecord):
    """An experiment as it is in force, keyed by its key on the compacted experiments topic
    (``pixelpipe.core.experiments``); each change is the whole definition with the next revision."""

    schema_name: ClassVar[str] = "ExperimentDefinition"

    event_id: str = field(default_factory=new_event_id)
    schema_version: int = 1
    event_time: dt.datetime = field(default_factory=utc_now)
    key: str
    revision: int
    state: ExperimentState
    control: str
    variants: list[VariantDefinition]
    start: dt.datetime
    end: dt.datetime | None = None
    description: str | None = None
    applied_by: str | None = None

    def to_avro(self) -> Record:
        return AvroRecord.to_avro(self) | {"variants": [variant.to_avro() for variant in self.variants]}

    @classmethod
    def from_avro(cls, record: Record) -> Self:
        return _filled(cls, record | {"variants": [VariantDefinition.from_avro(v) for v in record["variants"]]})


RolloutAction = Literal["START", "HOLD", "ADVANCE", "ROLLBACK", "COMPLETE", "PAUSE", "RESUME", "ABORT"]


@dataclass(kw_only=True, slots=True)
class RolloutTreatment(AvroRecord):
    name: str
    model: str | None = None
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None


@dataclass(kw_only=True, slots=True)
class GuardrailLimit(AvroRecord):
    metric: str
    margin: float
    relative: bool


@dataclass(kw_only=True, slots=True)
class RolloutPlan(AvroRecord):
    control_model: str
    treatment: RolloutTreatment
    steps: list[float]
    min_users: int
    alpha: float
    guardrails: list[GuardrailLimit]

    def to_avro(self) -> Record:
        return AvroRecord.to_avro(self) | {
            "treatment": self.treatment.to_avro(),
            "guardrails": [g.to_avro() for g in self.guardrails],
        }

    @classmethod
    def from_avro(cls, record: Record) -> Self:
        return _filled(
            cls,
            record
            | {
                "treatment": RolloutTreatment.from_avro(record["treatment"]),
                "guardrails": [GuardrailLimit.from_avro(g) for g in record["guardrails"]],
            },
        )


@dataclass(kw_only=True, slots=True)
class RolloutDecision(AvroRecord):
    """One decision of a guarded rollout, keyed by its experiment key on the rollouts topic: a rollout's state is
    the sequence of its decisions."""

    schema_name: ClassVar[str] = "RolloutDecision"

    event_id: str
    schema_version: int = 1
    event_time: dt.datetime = field(default_factory=utc_now)
    rollout: str
    sequence: int
    action: RolloutAction
    step: int
    percent_before: float
    percent_after: float
    revision_before: int
    revision_after: int
    reason: str
    figures: dict[str, float] = field(default_factory=dict)
    decided_by: str
    plan: RolloutPlan | None = None

    def to_avro(self) -> Record:
        return AvroRecord.to_avro(self) | {"plan": None if self.plan is None else self.plan.to_avro()}

    @classmethod
    def from_avro(cls, record: Record) -> Self:
        plan = record["plan"]
        return _filled(cls, record | {"plan": None if plan is None else RolloutPlan.from_avro(plan)})


Event = (
    ImageRequest
    | ImageResult
    | StageMetric
    | DeadLetter
    | Cancellation
    | ModelPool
    | ExperimentDefinition
    | RolloutDecision
)
EVENT_TYPES: dict[str, type[Event]] = {
    cls.schema_name: cls
    for cls in (
        ImageRequest,
        ImageResult,
        StageMetric,
        DeadLetter,
        Cancellation,
        ModelPool,
        ExperimentDefinition,
        RolloutDecision,
    )
}
