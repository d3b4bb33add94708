"""What every stage works with besides its own job: the messages it reads (``Inbound``) and emits (``Emission``,
collected by an ``Emitter``), what the stages share (``StageContext``), a request read from its message
(``decode_request``) or ended when something unforeseen failed it (``unforeseen``), retries of transient failures
(``with_retries``), the headers moderation passes on, and a message's queue and arrival times.

Plain blocking code, run in an executor: the agents in ``processors.app`` send what a stage emits and only then let
the offsets be committed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from pixelpipe.core.codec import Codec, CodecError
from pixelpipe.core.events import DeadLetter, Event, ImageRequest
from pixelpipe.core.pools import DEFAULT_POOL
from pixelpipe.core.settings import RequestLimits, StageSettings, TopicSettings
from pixelpipe.core.topics import MAX_PARTIAL_IMAGES, PARTIAL_IMAGES_HEADER
from pixelpipe.core.validation import InvalidRequestError, check_reply_topic, normalised_request, validate_request
from pixelpipe.processors.outcomes import Outcome, Rendered, StageWork, image_result, stage_metric, unreadable_result
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.processors.telemetry import TELEMETRY

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_RETRY_DELAY_S = 5.0  # a recovered store is noticed within seconds, however long it was down
DEADLINE_MARGIN_S = 1.0  # retries stop this long before a request's deadline, leaving time to report it


@dataclass(frozen=True)
class Inbound:
    """The parts of a Kafka message a stage needs."""

    value: bytes
    key: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_s: float  # when it was produced: the start of its queue time
    appended_s: float | None = None  # when the broker appended it, on a topic with LogAppendTime; else None
    headers: Mapping[str, bytes] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Emission:
    topic: str
    key: bytes | None
    value: bytes
    reply: bool = False  # a copy of a result for the request's reply topic: sent after the rest, never awaited
    headers: Mapping[str, bytes] = dataclasses.field(default_factory=dict)
    partition: int | None = None  # None: the partitioner places it by key


@dataclass(frozen=True)
class StageContext:
    """What every stage shares: where events go and how they are encoded, the request limits, the stage settings,
    this worker's name, the moderation stamp and the model pool its render stages serve."""

    topics: TopicSettings
    limits: RequestLimits
    stages: StageSettings
    codec: Codec
    worker_id: str
    stamp: ModerationStamp
    pool: str = DEFAULT_POOL


class StageFailure(Exception):
    """A request cannot be served; ``code`` goes into its FAILED result."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def is_transient(error: BaseException) -> bool:
    """Worth retrying: the storage or network may answer next time. Bad input never is."""
    if isinstance(error, ClientError):
        return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500) >= 500
    if isinstance(error, (ValueError, FileNotFoundError, PermissionError)):
        return False
    return isinstance(error, (BotoCoreError, OSError, TimeoutError))


def with_retries(action: Callable[[], T], stages: StageSettings, what: str, deadline: dt.datetime | None = None) -> T:
    """Run ``action``, retrying transient failures with exponential backoff (capped at ``MAX_RETRY_DELAY_S``) for
    up to ``storage_retry_budget_s``, and never past ``deadline`` less ``DEADLINE_MARGIN_S``: long enough to
    ride out a storage outage of a minute or two without failing requests whose images are already rendered."""
    give_up_s = time.time() + stages.storage_retry_budget_s
    if deadline is not None:
        give_up_s = min(give_up_s, deadline.timestamp() - DEADLINE_MARGIN_S)
    delay_s = stages.retry_backoff_ms / 1000
    for attempt in itertools.count(1):
        try:
            return action()
        except Exception as e:
            if not is_transient(e) or time.time() + delay_s > give_up_s:
                raise
            log.warning("transient failure, retrying", extra={"what": what, "attempt": attempt, "error": str(e)})
            TELEMETRY.retry(what)
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, MAX_RETRY_DELAY_S)
    raise AssertionError("unreachable")


class Emitter:
    """Collects a stage's outgoing events, encoded. Its results and metrics carry ``pool``, or the pool a call
    names: a render stage's emitter has its own pool (``context.pool``); moderation's has none, and names the pool
    it routed each request to."""

    def __init__(self, context: StageContext, pool: str | None = None) -> None:
        self.context = context
        self.pool = pool
        self.emissions: list[Emission] = []

    def _emit(self, topic: str, key: bytes | None, event: Event) -> None:
        self.emissions.append(Emission(topic, key, self.context.codec.encode(event)))

    def result(
        self,
        request: ImageRequest,
        outcome: Outcome,
        timings_ms: dict[str, float],
        rendered: Rendered | None = None,
        *,
        pool: str | None = None,
        model: str | None = None,
    ) -> None:
        """The request's result; ``pool``: the pool it was routed to, when not the emitter's; ``model``: the final
        model of a request that ended unrendered (see ``image_result``)."""
        result = image_result(request, outcome, timings_ms, rendered, pool or self.pool, model)
        value = self.context.codec.encode(result)
        TELEMETRY.result(outcome, request.kind, pool=result.pool)
        key = request.request_id.encode()
        self.emissions.append(Emission(self.context.topics.results, key, value))
        if request.reply_topic is not None and self._may_reply_to(request.reply_topic):
            self.emissions.append(Emission(request.reply_topic, key, value, reply=True))

    def _may_reply_to(self, topic: str) -> bool:
        # Checked again right before sending: an invalid request's own INVALID_REQUEST result goes here too.
        try:
            check_reply_topic(topic, self.context.topics)
        except InvalidRequestError:
            return False
        return True

    def unreadable(self, request_id: str, outcome: Outcome) -> None:
        self._emit(self.context.topics.results, request_id.encode(), unreadable_result(request_id, outcome, self.pool))
        TELEMETRY.result(outcome, "unknown", pool=self.pool)

    def metric(
        self, request: ImageRequest, work: StageWork, model: str | None = None, *, pool: str | None = None
    ) -> None:
        """The stage's metric of the request; ``pool``: the pool it was routed to, when not the emitter's."""
        price = self.context.stages.device_hour_price_usd
        pool = pool or self.pool
        metric = stage_metric(request, work, model or request.model, pool, self.context.worker_id, price)
        self._emit(self.context.topics.metrics, request.request_id.encode(), metric)
        TELEMETRY.work(work, metric.cost_usd, pool=pool)

    def move(self, message: Inbound, partition: int) -> None:
        """``message`` as it came, to another partition of its topic."""
        self.emissions.append(
            Emission(message.topic, message.key, message.value, headers=message.headers, partition=partition)
        )

    def forward(self, topic: str, message: Inbound) -> None:
        headers = passed_on(message.headers) | self.context.stamp.headers(topic, message.value)
        self.emissions.append(Emission(topic, message.key, message.value, headers=headers))

    def dead_letter(self, message: Inbound, reason: str, stage: str, request_id: str | None) -> None:
        letter = DeadLetter.of(
            value=message.value,
            key=message.key,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            reason=reason,
            stage=stage,
            request_id=request_id,
        )
        self._emit(self.context.topics.dead_letter, message.key, letter)
        TELEMETRY.dead_letter(stage, reason)

    def take(self) -> list[Emission]:
        emissions, self.emissions = self.emissions, []
        return emissions


def decode_request(message: Inbound, context: StageContext, emit: Emitter, stage: str) -> ImageRequest | None:
    """The request in ``message``, or None after dead-lettering it (and failing it, when its id is readable)."""
    try:
        request = normalised_request(context.codec.decode_as(ImageRequest, message.value))
    except CodecError as e:
        request_id = _readable_request_id(message.key)
        emit.dead_letter(message, f"undecodable: {e}", stage, request_id)
        if request_id is not None:
            emit.unreadable(request_id, Outcome.failed("UNDECODABLE", str(e)))
        return None
    try:
        validate_request(request, context.limits, check_deadline=False)
        check_reply_topic(request.reply_topic, context.topics)
    except InvalidRequestError as e:
        emit.result(request, Outcome.failed("INVALID_REQUEST", str(e)), {})
        return None
    return request


def unforeseen(emit: Emitter, message: Inbound, stage: str, request: ImageRequest | None, error: Exception) -> Outcome:
    """A stage's failure on one message that no check foresaw (a bug, an input nothing anticipated): logged with its
    traceback and the message dead-lettered. Returns the FAILED ``INTERNAL_ERROR`` outcome the caller ends the
    ``request`` with; a message whose request was not decoded is ended here, by its key. The stream goes on."""
    request_id = request.request_id if request is not None else _readable_request_id(message.key)
    log.exception("a stage failed on one message", extra={"stage": stage, "request_id": request_id})
    emit.dead_letter(message, f"internal error: {error!r}", stage, request_id)
    outcome = Outcome.failed("INTERNAL_ERROR", f"{stage} failed on this request: {error!r}")
    if request is None and request_id is not None:
        emit.unreadable(request_id, outcome)
    return outcome


def _readable_request_id(key: bytes | None) -> str | None:
    try:
        return key.decode() if key else None
    except UnicodeDecodeError:
        return None


def deadline_passed(request: ImageRequest, now: dt.datetime) -> bool:
    return request.deadline is not None and request.deadline <= now


def queue_ms(message: Inbound, started_s: float) -> float:
    return (started_s - message.timestamp_s) * 1000.0


def arrival_s(message: Inbound, read_s: float) -> float:
    """When ``message`` arrived, by a clock its producer cannot set: the broker's append time on a topic with
    LogAppendTime (pixelpipe creates the requests topic so), else the worker's clock when it was read."""
    return read_s if message.appended_s is None else message.appended_s


def partial_images(headers: Mapping[str, bytes]) -> int:
    """How many previews a request's headers ask for (0 to MAX_PARTIAL_IMAGES; anything else is 0)."""
    raw = headers.get(PARTIAL_IMAGES_HEADER, b"")
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return int(text) if text.isdigit() and int(text) <= MAX_PARTIAL_IMAGES else 0


def passed_on(headers: Mapping[str, bytes]) -> dict[str, bytes]:
    """The headers moderation forwards with a request besides its stamp."""
    count = partial_images(headers)
    return {PARTIAL_IMAGES_HEADER: str(count).encode()} if count else {}
