"""What each stage does with its messages, apart from Kafka: plain blocking code, run in an executor.

``ModerationStage.handle_batch`` moderates a take of requests. ``GenerateStage`` and ``EditStage`` (both
``RenderStage``) handle a take in two steps: ``render`` (the model calls) and ``finish`` (output moderation,
encoding, storage), so the two can be timed and, later, overlapped. Both return the events to send
(results, metrics, forwarded requests, dead letters); the agents in ``processors.app`` send them and only
then let the offsets be committed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image

from pixelpipe.core.clock import utc_now
from pixelpipe.core.codec import Codec, CodecError
from pixelpipe.core.events import DeadLetter, Event, ImageRequest, Stage, StageOutcome, StoredImage
from pixelpipe.core.experiments import Experiment
from pixelpipe.core.objects import ObjectStore, ObjectStoreError, StoredObject
from pixelpipe.core.settings import ModerationSettings, RequestLimits, StageSettings, TopicSettings
from pixelpipe.core.validation import (
    InvalidRequestError,
    check_compute,
    check_guidance,
    check_reply_topic,
    check_steps,
    normalised_request,
    require,
    validate_request,
)
from pixelpipe.processors.imaging import ImageError, decode_image, decode_mask, encode_png
from pixelpipe.processors.limits import UserLimits
from pixelpipe.processors.models import SCHEDULERS, BatchOutput, DiffusionModels, ModelError, ModelRegistry
from pixelpipe.processors.moderation import ImageModerator, PromptModerator, Verdict
from pixelpipe.processors.outcomes import (
    Outcome,
    Rendered,
    RenderParams,
    StageWork,
    image_result,
    stage_metric,
    unreadable_result,
)
from pixelpipe.processors.previews import Previews, PreviewSink, hook_for, passed_on, previewing
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.processors.telemetry import TELEMETRY

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_EDIT_STRENGTH = 0.75
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
    this worker's name and the moderation stamp."""

    topics: TopicSettings
    limits: RequestLimits
    stages: StageSettings
    codec: Codec
    worker_id: str
    stamp: ModerationStamp


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
    """Collects a stage's outgoing events, encoded."""

    def __init__(self, context: StageContext) -> None:
        self.context = context
        self.emissions: list[Emission] = []

    def _emit(self, topic: str, key: bytes | None, event: Event) -> None:
        self.emissions.append(Emission(topic, key, self.context.codec.encode(event)))

    def result(
        self, request: ImageRequest, outcome: Outcome, timings_ms: dict[str, float], rendered: Rendered | None = None
    ) -> None:
        value = self.context.codec.encode(image_result(request, outcome, timings_ms, rendered))
        TELEMETRY.result(outcome, request.kind)
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
        self._emit(self.context.topics.results, request_id.encode(), unreadable_result(request_id, outcome))
        TELEMETRY.result(outcome, "unknown")

    def metric(self, request: ImageRequest, work: StageWork, model: str | None = None) -> None:
        stages = self.context.stages
        metric = stage_metric(
            request, work, model or request.model, self.context.worker_id, stages.device_hour_price_usd
        )
        self._emit(self.context.topics.metrics, request.request_id.encode(), metric)
        TELEMETRY.work(work, metric.cost_usd)

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


class ModerationStage:
    """Prompt and input-image checks on a micro-batch; forwards what passes to the generate or edit topic, or to
    its long lane when its compute is over ``PIXELPIPE_LONG_REQUEST_COMPUTE``.

    The compute of a request (``request_compute``) is read from the model ``registry`` (entries only, no weights)
    and the ``experiments``, as the render stages will resolve it: moderation fails a request over the
    per-request budget, and counts each user's compute against the per-user budget.
    """

    name: ClassVar[Stage] = "MODERATION"

    def __init__(
        self,
        context: StageContext,
        moderation: ModerationSettings,
        prompts: PromptModerator,
        images: ImageModerator,
        store: ObjectStore,
        registry: ModelRegistry | None = None,
        experiments: Mapping[str, Experiment] | None = None,
        limits: UserLimits | None = None,
        placed: bool = False,
    ) -> None:
        """``limits`` holds the users of the requests topic's partitions this worker owns (a Faust table's data in
        the worker); ``placed``: requests are counted on their user's partition (``limits.home``), and a request
        found elsewhere is moved there first."""
        self.context = context
        self.moderation = moderation
        self.prompts = prompts
        self.images = images
        self.store = store
        self.registry = registry or ModelRegistry({})
        self.experiments = experiments or {}
        self.limits = limits or UserLimits(
            moderation.max_requests_per_user_per_minute,
            moderation.rate_limit_burst,
            moderation.max_user_compute_per_minute,
        )
        self.placed = placed
        topics = context.topics
        self.next_topic = {"GENERATE": topics.generate, "EDIT": topics.edit}
        self.long_topic = {"GENERATE": topics.generate_long, "EDIT": topics.edit_long}

    def topic_for(self, request: ImageRequest, compute: float | None) -> str:
        """Where a request that passed goes: its kind's long lane when its compute is over the threshold (and the
        lane is on), else its kind's topic."""
        threshold = self.moderation.long_request_compute
        if threshold > 0 and compute is not None and compute > threshold:
            return self.long_topic[request.kind]
        return self.next_topic[request.kind]

    def handle_batch(self, messages: Sequence[Inbound]) -> list[Emission]:
        """Moderate a take of requests: one profanity-model call for all their prompts, then each on its own."""
        started_s = time.time()
        emit = Emitter(self.context)
        readable: list[tuple[Inbound, ImageRequest]] = []
        computes: list[float | None] = []
        refusals: list[Outcome | None] = []
        for message in messages:
            request = None
            try:
                request = decode_request(message, self.context, emit, "moderation")
                if request is None or not self._at_home(message, request, emit):
                    continue
                # Expired, over-budget and rate-limited requests end before the prompt model: a flood costs it
                # nothing.
                compute = request_compute(request, self.experiments, self.registry)
                refusal = self._refusal(request, arrival_s(message, started_s), compute)
            except Exception as e:  # a bug or an unforeseen input: this request fails, the stream goes on
                outcome = unforeseen(emit, message, "moderation", request, e)
                if request is None:
                    continue
                compute, refusal = None, outcome
            readable.append((message, request))
            computes.append(compute)
            refusals.append(refusal)
        admitted = [request for (_, request), refusal in zip(readable, refusals, strict=True) if refusal is None]
        verdicts: Iterator[Verdict | None]
        try:
            verdicts = iter(
                self.prompts.check_many([r.prompt for r in admitted], [r.negative_prompt for r in admitted])
            )
        except Exception:  # each request then fails on its own below, with a dead letter
            log.exception("prompt moderation failed", extra={"requests": len(admitted)})
            verdicts = iter([None] * len(admitted))
        shared_ms = (time.time() - started_s) * 1000.0 / max(1, len(readable))
        for (message, request), refusal, compute in zip(readable, refusals, computes, strict=True):
            own_started_s = time.time()
            try:
                outcome = refusal if refusal is not None else self._moderate(request, next(verdicts))
            except Exception as e:  # a bug or an unforeseen failure: fail this request, keep the stream going
                outcome = unforeseen(emit, message, "moderation", request, e)
            compute_ms = shared_ms + (time.time() - own_started_s) * 1000.0
            work = StageWork(
                self.name,
                "OK" if outcome is None else outcome.stage_outcome,
                queue_ms(message, started_s),
                compute_ms,
                "cpu",
                compute_ms / 1000.0,
                len(readable),
            )
            emit.metric(request, work)
            if outcome is None:
                emit.forward(self.topic_for(request, compute), message)
            else:
                emit.result(request, outcome, {"moderation": compute_ms})
        return emit.take()

    def _at_home(self, message: Inbound, request: ImageRequest, emit: Emitter) -> bool:
        """Whether ``message`` is on its user's partition, where the user's limits live; if not, it is moved there
        (unchanged) and counted when it arrives."""
        if not self.placed:
            return True
        home = self.limits.home(request.user_id)
        if message.partition == home:
            return True
        emit.move(message, home)
        return False

    def _refusal(self, request: ImageRequest, arrived_s: float, compute: float | None) -> Outcome | None:
        """The outcome of a request that ends before it is moderated (its deadline passed, its compute is over the
        per-request budget, or its user is over the rate limit or the compute budget); None when it goes on to
        moderation. ``compute`` is None for a model the registry does not hold: the render stage fails it."""
        if deadline_passed(request, utc_now()):
            assert request.deadline is not None
            return Outcome.failed("DEADLINE_EXCEEDED", f"deadline {request.deadline.isoformat()} passed")
        if compute is not None:
            try:
                check_compute(compute, self.context.limits)
            except InvalidRequestError as e:
                return Outcome.failed("INVALID_REQUEST", str(e))
        refused = self.limits.admit(request.user_id, arrived_s, compute)
        if refused == "requests":
            limit, burst = self.moderation.max_requests_per_user_per_minute, self.limits.requests.capacity
            return Outcome.failed(
                "RATE_LIMITED", f"user {request.user_id} is over {limit} requests per minute (bursts of {burst:.0f})"
            )
        if refused == "compute":
            budget = self.moderation.max_user_compute_per_minute
            return Outcome.failed(
                "RATE_LIMITED",
                f"user {request.user_id} is over the compute budget of {budget:g} device seconds per minute "
                f"(PIXELPIPE_MAX_USER_COMPUTE_PER_MINUTE); this request needs {compute or 0.0:.2f}",
            )
        return None

    def _moderate(self, request: ImageRequest, verdict: Verdict | None) -> Outcome | None:
        """None when the request may go on; otherwise its terminal outcome. ``verdict`` is its prompt's."""
        if verdict is None:
            raise RuntimeError("the prompt could not be moderated")
        if not verdict.allowed:
            return Outcome.rejected(verdict.stage, verdict.scores, verdict.rejected_categories)
        if request.source_image_uri is None:
            return None
        try:
            inputs = load_edit_inputs(request, self.store, self.context)
        except StageFailure as e:
            return Outcome.failed(e.code, str(e))
        # Every image the model will see is moderated: the references as much as the source.
        for verdict in self.images.check(inputs.images, "INPUT_IMAGE"):
            if not verdict.allowed:
                return Outcome.rejected(verdict.stage, verdict.scores, verdict.rejected_categories)
        return None


@dataclass(frozen=True)
class EditInputs:
    """An edit's images, decoded: the source, the references some models take beside it, and the mask."""

    source: Image.Image
    references: list[Image.Image]
    mask: Image.Image | None

    @property
    def images(self) -> list[Image.Image]:
        """The source, then the references: every picture the model is given."""
        return [self.source, *self.references]


def load_edit_inputs(request: ImageRequest, store: ObjectStore, context: StageContext) -> EditInputs:
    """The edit's source image, references and mask, read from the configured store and decoded safely."""
    source_uri, mask_uri = request.source_image_uri, request.mask_uri
    assert source_uri is not None  # validated: an EDIT has a source
    max_pixels, max_bytes = context.limits.max_source_pixels, context.limits.max_source_bytes

    def read(uri: str, what: str) -> bytes:
        return with_retries(lambda: store.get(uri, max_bytes), context.stages, f"read {what}", request.deadline)

    def reference(index: int, uri: str) -> Image.Image:
        try:
            return decode_image(read(uri, "reference image"), max_pixels=max_pixels)
        except (ObjectStoreError, ImageError) as e:  # named, as the source is by being the only other one
            raise StageFailure("INVALID_SOURCE", f"reference image {index} ({uri}): {e}") from e

    try:
        source = decode_image(read(source_uri, "source"), max_pixels=max_pixels)
        references = [reference(index, uri) for index, uri in enumerate(request.reference_image_uris, 1)]
        mask = decode_mask(read(mask_uri, "mask"), source, max_pixels=max_pixels) if mask_uri else None
    except (ObjectStoreError, ImageError) as e:
        raise StageFailure("INVALID_SOURCE", str(e)) from e
    except Exception as e:
        if is_transient(e):
            raise StageFailure("STORAGE_UNAVAILABLE", f"reading the edit inputs failed: {e}") from e
        raise
    return EditInputs(source, references, mask)


def request_seed(request: ImageRequest) -> int:
    """The request's seed, or one derived from its id, so a redelivered request draws the same pixels."""
    if request.seed is not None:
        return int(request.seed)
    return int.from_bytes(hashlib.sha256(request.request_id.encode()).digest()[:4], "big")


def variant_overrides(
    request: ImageRequest, experiments: Mapping[str, Experiment]
) -> tuple[dict[str, object], dict[str, str]]:
    """The overrides of a request's assigned variants, in experiment key order (a later key wins), and which
    variant set each."""
    overrides: dict[str, object] = {}
    set_by: dict[str, str] = {}
    for key, variant in sorted(request.experiments.items()):
        if key in experiments:
            for name, value in experiments[key].overrides_for(variant).items():
                overrides[name] = value
                set_by[name] = f"experiment {key}, variant {variant}"
    return overrides, set_by


def request_compute(
    request: ImageRequest, experiments: Mapping[str, Experiment], registry: ModelRegistry
) -> float | None:
    """The compute a request will ask of its model (``ModelEntry.compute``), with its variants' model and steps,
    as ``resolve_params`` resolves them, read from the registry alone; None when the model is not in the registry
    or the steps are invalid: the render stage then fails the request, naming the rule."""
    overrides, _ = variant_overrides(request, experiments)
    model, steps = overrides.get("model", request.model), overrides.get("steps", request.steps)
    if model not in registry or not (steps is None or (isinstance(steps, int) and not isinstance(steps, bool))):
        return None
    return registry.get(str(model)).compute(request.width, request.height, steps, request.n)


def resolve_params(
    request: ImageRequest, experiments: Mapping[str, Experiment], models: DiffusionModels, limits: RequestLimits
) -> RenderParams:
    """The parameters that will run: the request's, then the overrides of its assigned variants (in experiment key
    order, so a later key wins), then the model's defaults; validated here, once, after every override, and the
    compute they ask for checked against the per-request budget.

    Raises InvalidRequestError naming the parameter (and the variant that set it), or ModelError for a model
    the registry does not hold.
    """
    overrides, set_by = variant_overrides(request, experiments)
    if "steps" in set_by or "model" in set_by:  # what a variant set is named when the compute is over the budget
        set_by["compute"] = set_by.get("steps") or set_by["model"]
    if "model" in set_by:  # so is a variant's model that cannot take the request's images or negative prompt
        set_by["reference_image_uris"] = set_by["negative_prompt"] = set_by["model"]
    model = str(overrides.get("model", request.model))
    entry = models.registry.get(model)
    default_scheduler = models.default_scheduler(model)
    steps = overrides.get("steps", request.steps)
    guidance = overrides.get("guidance", request.guidance)
    scheduler = overrides.get("scheduler") or default_scheduler
    try:
        check_steps(steps, limits)
        check_guidance(guidance)
        require(
            scheduler in SCHEDULERS or scheduler == default_scheduler,
            "scheduler",
            f"must be one of {', '.join(sorted(SCHEDULERS))}, got {scheduler!r}",
        )
        check_compute(entry.compute(request.width, request.height, steps, request.n), limits)  # type: ignore[arg-type]
        if request.kind == "EDIT":
            images = 1 + len(request.reference_image_uris)
            require(
                images <= entry.max_source_images,
                "reference_image_uris",
                f"model {model!r} takes at most {entry.max_source_images} source image(s) per edit, got {images} "
                f"(the source and {images - 1} references)",
            )
        require(
            not (entry.edits_by_reference and request.negative_prompt),
            "negative_prompt",
            f"model {model!r} ({entry.kind}) takes no negative prompt",
        )
    except InvalidRequestError as e:
        if e.field in set_by:
            raise InvalidRequestError(e.field, f"{e.rule} (set by {set_by[e.field]})") from None
        raise
    return RenderParams(
        model=model,
        steps=entry.default_steps if steps is None else int(steps),  # type: ignore[call-overload]
        guidance=entry.default_guidance if guidance is None else float(guidance),  # type: ignore[arg-type]
        scheduler=str(scheduler),
        width=request.width,
        height=request.height,
        n=request.n,
    )


@dataclass
class _Pending:
    message: Inbound
    request: ImageRequest
    params: RenderParams
    source: Image.Image | None = None  # EDIT: the decoded source image
    references: list[Image.Image] = dataclasses.field(default_factory=list)  # EDIT: images beside the source
    mask: Image.Image | None = None  # EDIT with a mask: inpainting

    @property
    def seed(self) -> int:
        return request_seed(self.request)


@dataclass(frozen=True)
class PlannedChunk:
    """Requests with equal parameters for one model call, within their model's batch limit."""

    params: RenderParams
    items: list[_Pending]
    take_started_s: float  # when the take began: the end of early endings' queue time


@dataclass
class RenderedChunk:
    """A chunk after its model call: its images, waiting to be moderated, stored and reported, or (``output`` None)
    the emissions that ended its requests when the call failed or was stopped. ``ended`` also holds those of the
    requests cancelled before the call, which ``items`` no longer lists. A chunk ``handed_back`` was left unrendered
    because the worker is stopping: none of its requests ends here; all are delivered again."""

    params: RenderParams
    items: list[_Pending]
    output: BatchOutput | None
    device: str
    started_s: float  # when the model call began: the end of the requests' queue time
    model_ms: float
    ended: list[Emission] = dataclasses.field(default_factory=list)
    previews: Previews | None = None  # still being checked and sent when the model call returns
    handed_back: bool = False

    def outputs(self) -> zip[tuple[_Pending, list[Image.Image]]]:
        """Each request with its images."""
        assert self.output is not None
        return zip(self.items, self.output.images, strict=True)


@dataclass
class _Reviewed:
    """A request's images after output moderation, and its outcome: REJECTED, else None until they are stored."""

    item: _Pending
    images: list[Image.Image]
    moderation_ms: float
    outcome: Outcome | None = None


@dataclass
class PlannedTake:
    """A take after ``RenderStage.plan``: what ended early (invalid, unmoderated, expired requests) and the chunks
    to render, most urgent first."""

    emissions: list[Emission]
    chunks: list[PlannedChunk]


def never_cancelled(request_id: str) -> bool:
    return False


def never_stopping() -> bool:
    return False


class _Interruption:
    """The stop check of one chunk's model call (``previews.StopCheck``): stop once the worker is stopping (the chunk
    is then handed back, to be rendered from the start by the partition's next owner), or once every request of the
    chunk is cancelled. It counts the denoising steps done, for the device time a cancellation saved."""

    def __init__(
        self, request_ids: list[str], cancelled: Callable[[str], bool], stopping: Callable[[], bool], calls: int
    ) -> None:
        self.request_ids = request_ids
        self.cancelled = cancelled
        self.stopping = stopping
        self.calls = calls  # pipeline calls the chunk takes: one, or one per image (per-image batching)
        self.steps_done = 0
        self.steps_planned = 0
        self.stopped = False  # every request cancelled
        self.handed_back = False  # the worker is stopping

    def __call__(self, steps: int) -> bool:
        self.steps_done += 1
        self.steps_planned = self.calls * steps
        self.handed_back = self.stopping()
        self.stopped = not self.handed_back and all(self.cancelled(request_id) for request_id in self.request_ids)
        return self.handed_back or self.stopped

    def saved_per_spent(self) -> float:
        """Device time saved per second spent: the steps left undone over the steps done."""
        return max(0, self.steps_planned - self.steps_done) / max(1, self.steps_done)


def urgency(pending: _Pending) -> tuple[bool, dt.datetime, float]:
    """INTERACTIVE before BATCH, then the earliest deadline, then the oldest."""
    request = pending.request
    far = dt.datetime.max.replace(tzinfo=dt.UTC)
    return (request.priority != "INTERACTIVE", request.deadline or far, pending.message.timestamp_s)


def in_service_order(pending: Sequence[_Pending]) -> list[_Pending]:
    """``pending`` taking turns across users: each user's requests in order of urgency, and a user's k-th request
    behind every user's (k-1)-th of the same priority, so one user's many requests in a take do not hold another
    user's few behind them; within a turn, by urgency."""
    by_user: dict[tuple[str, str], list[_Pending]] = {}
    for item in sorted(pending, key=urgency):
        by_user.setdefault((item.request.user_id, item.request.priority), []).append(item)
    turn = {id(item): k for items in by_user.values() for k, item in enumerate(items)}
    return sorted(pending, key=lambda item: (urgency(item)[0], turn[id(item)], *urgency(item)[1:]))


class RenderStage:
    """Renders micro-batches, then moderates and stores the outputs. Subclasses say how a request's inputs are
    prepared and how a batch calls the model."""

    name: ClassVar[Stage]
    preview_sink: PreviewSink | None = None  # where previews go (the worker's reply producer); None sends none

    def __init__(
        self,
        context: StageContext,
        models: DiffusionModels,
        images: ImageModerator,
        store: ObjectStore,
        experiments: Mapping[str, Experiment],
    ) -> None:
        self.context = context
        self.models = models
        self.images = images
        self.store = store
        self.experiments = experiments
        # Checks and sends previews while the model renders; one thread keeps each request's previews in order.
        self.preview_executor = ThreadPoolExecutor(1, thread_name_prefix="previews")
        # Whether a request was cancelled: the worker sets its lookup in the cancellations topic's global table.
        # Asked at planning, before the model call, after each denoising step and before output moderation, on the
        # model and finishing threads: it must be quick and safe from any thread.
        self.cancelled: Callable[[str], bool] = never_cancelled
        # Whether the worker is stopping: asked before each model call and after each denoising step, on the model
        # thread. A call in progress then ends at the next step and its chunk is handed back.
        self.stopping: Callable[[], bool] = never_stopping

    def preview_hook(self, params: RenderParams, items: Sequence[_Pending]) -> Previews | None:
        """Sends the previews of images in progress that the chunk's requests asked for (processors/previews.py)."""
        requests = [(i.request.request_id, i.request.reply_topic, i.request.n, i.message.headers) for i in items]
        return hook_for(requests, params.width, params.height, self.preview_sink, self.images, self.preview_executor)

    # -- what subclasses define ------------------------------------------------------------------------------
    def params(self, request: ImageRequest) -> RenderParams:
        return resolve_params(request, self.experiments, self.models, self.context.limits)

    def prepare(self, item: _Pending) -> None:
        """Get what the model call needs beyond the request (raises StageFailure)."""

    def batch_limit(self, params: RenderParams) -> int:
        """Most requests of ``params`` one model call may take."""
        return self.models.registry.get(params.model).batch_limit(self.context.stages.max_batch)

    def run_model(self, params: RenderParams, chunk: list[_Pending]) -> BatchOutput:
        raise NotImplementedError

    # -- one take of the stream: planned, then each chunk rendered and finished (see processors.takes) ----------
    def plan(self, messages: Sequence[Inbound]) -> PlannedTake:
        """Read and check a take's requests, and group them into chunks of equal parameters, one model call
        each; what ended early is in the plan's emissions."""
        started_s = time.time()
        emit = Emitter(self.context)
        pending: list[_Pending] = []
        for message in messages:
            request = None
            try:
                request = decode_request(message, self.context, emit, self.name.lower())
                item = None if request is None else self._admit(emit, message, request, started_s)
            except Exception as e:  # a bug or an unforeseen input: this request fails, the stream goes on
                outcome = unforeseen(emit, message, self.name.lower(), request, e)
                if request is not None:
                    self._end_failed(emit, request, message, started_s, outcome)
                continue
            if item is not None:
                pending.append(item)
        groups: dict[RenderParams, list[_Pending]] = {}
        for item in in_service_order(pending):
            groups.setdefault(item.params, []).append(item)
        # Groups in the order of their most urgent request; each group in chunks of its model's batch limit.
        chunks: list[PlannedChunk] = []
        for params, group in groups.items():
            max_batch = self.batch_limit(params)
            for start in range(0, len(group), max_batch):
                chunks.append(PlannedChunk(params, group[start : start + max_batch], started_s))
        return PlannedTake(emit.take(), chunks)

    def _admit(self, emit: Emitter, message: Inbound, request: ImageRequest, started_s: float) -> _Pending | None:
        """The request of ``message`` ready to render; None after ending it (unmoderated, cancelled, expired,
        invalid for its model, its inputs unreadable)."""
        if not self.context.stamp.verify(message.topic, message.value, message.headers):
            reason = f"no valid moderation stamp for {message.topic}: moderation did not forward it there"
            emit.dead_letter(message, f"unmoderated: {reason}", self.name.lower(), request.request_id)
            self._fail(emit, request, message, started_s, "UNMODERATED", f"not rendered: {reason}")
            return None
        if request.kind != self.name:  # stamped for this topic, so forwarded here by a moderation that misrouted
            reason = f"a {request.kind} request cannot be rendered by the {self.name} stage"
            emit.dead_letter(message, f"misrouted: {reason}", self.name.lower(), request.request_id)
            self._fail(emit, request, message, started_s, "INVALID_REQUEST", reason)
            return None
        if self.cancelled(request.request_id):
            self._cancel(emit, request, message, started_s)
            return None
        if deadline_passed(request, utc_now()):
            self._fail(emit, request, message, started_s, "DEADLINE_EXCEEDED", "deadline passed in the queue")
            return None
        try:
            item = _Pending(message, request, self.params(request))
            self.prepare(item)
        except InvalidRequestError as e:
            self._fail(emit, request, message, started_s, "INVALID_REQUEST", str(e))
        except ModelError as e:
            self._fail(emit, request, message, started_s, "MODEL_ERROR", str(e))
        except StageFailure as e:
            self._fail(emit, request, message, started_s, e.code, str(e))
        else:
            return item
        return None

    def render(self, chunk: PlannedChunk) -> RenderedChunk:
        """The chunk's model call, for its requests not cancelled by now. A failed call ends them FAILED (and
        dead-lettered when unforeseen); a call stopped because all of them were cancelled meanwhile ends them
        CANCELLED."""
        params = chunk.params
        started_s = time.time()
        if self.stopping():
            return RenderedChunk(params, [], None, "none", started_s, 0.0, handed_back=True)
        emit = Emitter(self.context)
        items: list[_Pending] = []
        for item in chunk.items:
            if self.cancelled(item.request.request_id):  # since the take was planned: still no device time spent
                self._cancel(emit, item.request, item.message, started_s, params.model)
            else:
                items.append(item)
        if not items:
            return RenderedChunk(params, [], None, "none", started_s, 0.0, emit.take())
        try:
            model = self.models.load(params.model)
            device = str(model.device)
            stop = _Interruption(
                [item.request.request_id for item in items],
                self.cancelled,
                self.stopping,
                calls=1 if model.batched else len(items) * params.n,
            )
            previews = self.preview_hook(params, items)
            with previewing(previews, stop):
                output = self.run_model(params, items)
        except (ModelError, StageFailure) as e:
            code = e.code if isinstance(e, StageFailure) else "MODEL_ERROR"
            for item in items:
                self._fail(emit, item.request, item.message, started_s, code, str(e), params.model)
            return RenderedChunk(params, items, None, "none", started_s, 0.0, emit.take())
        except Exception as e:
            self._fail_internally(emit, params, items, e, chunk.take_started_s)
            return RenderedChunk(params, items, None, "none", started_s, 0.0, emit.take())
        model_ms = (time.time() - started_s) * 1000.0
        if stop.handed_back:  # what ended before the call ends again when the chunk is delivered again
            return RenderedChunk(params, items, None, device, started_s, model_ms, [], previews, handed_back=True)
        if stop.stopped:
            self._report_stopped(emit, params, items, output, stop, device, started_s, model_ms)
            return RenderedChunk(params, items, None, device, started_s, model_ms, emit.take(), previews)
        return RenderedChunk(params, items, output, device, started_s, model_ms, emit.take(), previews)

    def finish(self, chunk: RenderedChunk) -> list[Emission]:
        """The rest of a chunk: moderate its images, encode and store the allowed ones in one write (durable
        together), then the results and metrics. Returns everything the chunk emits."""
        if chunk.previews is not None:  # previews first: the results' reply copies must follow them
            chunk.previews.wait()
        if chunk.output is None:
            return chunk.ended
        emit = Emitter(self.context)
        try:
            reviews = [self._review(item, images) for item, images in chunk.outputs()]
            self._store([review for review in reviews if review.outcome is None])
            self._report(emit, chunk, reviews)
        except Exception as e:
            emit = Emitter(self.context)  # nothing half-reported: every request of the chunk fails alike
            self._fail_internally(emit, chunk.params, chunk.items, e, chunk.started_s)
        return [*chunk.ended, *emit.take()]

    def _cancel(
        self, emit: Emitter, request: ImageRequest, message: Inbound, started_s: float, model: str | None = None
    ) -> None:
        """A request cancelled before its model call: CANCELLED, no device time spent, none known to be saved."""
        emit.result(request, Outcome.cancelled("cancelled before its render: nothing rendered"), {})
        work = StageWork(self.name, "CANCELLED", queue_ms(message, started_s), 0.0, "none", 0.0)
        emit.metric(request, work, model)

    def _report_stopped(
        self,
        emit: Emitter,
        params: RenderParams,
        items: list[_Pending],
        output: BatchOutput,
        stop: _Interruption,
        device: str,
        started_s: float,
        model_ms: float,
    ) -> None:
        """A model call stopped once all its requests were cancelled: each CANCELLED, with its share of the device
        time spent and of the remaining steps' share of the time the whole call would have taken."""
        spent_s = output.device_seconds / len(items)
        how = f"cancelled while rendering: stopped after {stop.steps_done} of {stop.steps_planned} denoising steps"
        for item in items:
            work = StageWork(
                self.name,
                "CANCELLED",
                queue_ms(item.message, started_s),
                model_ms,
                device,
                spent_s,
                len(items),
                spent_s * stop.saved_per_spent(),
            )
            emit.metric(item.request, work, params.model)
            timings = self._timings(item, started_s, model_ms)
            emit.result(item.request, Outcome.cancelled(how), timings, Rendered(params, item.seed, len(items)))

    def _timings(
        self, item: _Pending, started_s: float, model_ms: float, moderation_ms: float | None = None
    ) -> dict[str, float]:
        """A rendered request's result timings: its queue, its model call, its output moderation, its whole life."""
        timings = {"queue": queue_ms(item.message, started_s), self.name.lower(): model_ms}
        if moderation_ms is not None:
            timings["output_moderation"] = moderation_ms
        return timings | {"total": (utc_now() - item.request.created_at).total_seconds() * 1000.0}

    def _fail(
        self,
        emit: Emitter,
        request: ImageRequest,
        message: Inbound,
        started_s: float,
        code: str,
        reason: str,
        model: str | None = None,
    ) -> None:
        self._end_failed(emit, request, message, started_s, Outcome.failed(code, reason), model)

    def _end_failed(
        self,
        emit: Emitter,
        request: ImageRequest,
        message: Inbound,
        started_s: float,
        outcome: Outcome,
        model: str | None = None,
    ) -> None:
        """A request FAILED before its model call: its result, and a metric with no device time."""
        emit.result(request, outcome, {})
        emit.metric(request, StageWork(self.name, "FAILED", queue_ms(message, started_s), 0.0, "none", 0.0), model)

    def _fail_internally(
        self, emit: Emitter, params: RenderParams, chunk: list[_Pending], error: Exception, started_s: float
    ) -> None:
        """A bug or an unforeseen failure: dead-letter and fail these requests, keep the stream going."""
        log.exception("render failed", extra={"stage": self.name, "requests": len(chunk)}, exc_info=error)
        for item in chunk:
            emit.dead_letter(item.message, f"internal error: {error!r}", self.name.lower(), None)
            self._fail(emit, item.request, item.message, started_s, "INTERNAL_ERROR", repr(error), params.model)

    def _review(self, item: _Pending, images: list[Image.Image]) -> _Reviewed:
        """Output moderation of one request's images: REJECTED, or no outcome yet while they wait to be stored. A
        request cancelled while its batch rendered is CANCELLED instead: its images are neither moderated nor
        stored."""
        if self.cancelled(item.request.request_id):
            how = "cancelled while its batch rendered: its images were discarded"
            return _Reviewed(item, images, 0.0, Outcome.cancelled(how))
        started_s = time.time()
        verdicts = self.images.check(images, "OUTPUT_IMAGE")
        moderation_ms = (time.time() - started_s) * 1000.0
        rejected = [v for v in verdicts if not v.allowed]
        if not rejected:
            return _Reviewed(item, images, moderation_ms)
        scores = {c: max(v.scores.get(c, 0.0) for v in verdicts) for v in rejected for c in v.scores}
        categories = sorted({c for v in rejected for c in v.rejected_categories})
        return _Reviewed(item, images, moderation_ms, Outcome.rejected("OUTPUT_IMAGE", scores, categories))

    def _store(self, reviews: list[_Reviewed]) -> None:
        """Encode and store the allowed images of a chunk in one write; each review gets its outcome: SUCCEEDED,
        or FAILED when the store stayed unavailable through the retries."""
        objects = [
            (self.store.image_key(r.item.request.request_id, i, "png", r.item.request.created_at), encode_png(image))
            for r in reviews
            for i, image in enumerate(r.images)
        ]
        if not objects:
            return
        # Stored together, so retried until the earliest deadline among them.
        deadlines = [r.item.request.deadline for r in reviews if r.item.request.deadline is not None]
        try:
            stored = iter(
                with_retries(
                    lambda: self.store.put_many([(key, data, "image/png") for key, data in objects]),
                    self.context.stages,
                    "store images",
                    min(deadlines, default=None),
                )
            )
        except Exception as e:
            if not is_transient(e):
                raise
            for review in reviews:
                review.outcome = Outcome.failed("STORAGE_UNAVAILABLE", f"storing the images failed: {e}")
            return
        for review in reviews:
            images = [_stored_image(next(stored), image) for image in review.images]
            review.outcome = Outcome("SUCCEEDED", images=images)

    def _report(self, emit: Emitter, chunk: RenderedChunk, reviews: list[_Reviewed]) -> None:
        """The metrics and the result of each request of a chunk."""
        params, output = chunk.params, chunk.output
        images_in_batch = sum(len(review.images) for review in reviews)
        for review in reviews:
            item, outcome = review.item, review.outcome
            assert outcome is not None  # every review was rejected, cancelled or stored
            cancelled = outcome.status == "CANCELLED"
            # A rejection is output moderation's: the render itself went well.
            rendering: StageOutcome = "FAILED" if outcome.status == "FAILED" else "CANCELLED" if cancelled else "OK"
            share_s = output.device_seconds * len(review.images) / images_in_batch
            emit.metric(
                item.request,
                StageWork(
                    self.name,
                    rendering,
                    queue_ms(item.message, chunk.started_s),
                    chunk.model_ms,
                    chunk.device,
                    share_s,
                    len(chunk.items),
                    0.0 if cancelled else None,  # the batch rendered its images all the same
                ),
                params.model,
            )
            if not cancelled:  # a cancelled request's images were never moderated
                emit.metric(
                    item.request,
                    StageWork(
                        "OUTPUT_MODERATION",
                        outcome.stage_outcome,
                        0.0,
                        review.moderation_ms,
                        "cpu",
                        review.moderation_ms / 1000.0,
                        len(review.images),
                    ),
                    params.model,
                )
            timings = self._timings(item, chunk.started_s, chunk.model_ms, None if cancelled else review.moderation_ms)
            emit.result(item.request, outcome, timings, Rendered(params, item.seed, len(chunk.items)))


def _stored_image(stored: StoredObject, image: Image.Image) -> StoredImage:
    return StoredImage(
        uri=stored.uri, sha256=stored.sha256, width=image.width, height=image.height, format="PNG", bytes=stored.bytes
    )


class GenerateStage(RenderStage):
    """Text to image."""

    name: ClassVar[Stage] = "GENERATE"

    def run_model(self, params: RenderParams, chunk: list[_Pending]) -> BatchOutput:
        return self.models.generate(params.model, **_common_arguments(params, chunk))


class EditStage(RenderStage):
    """Image to image, or inpainting where the request has a mask; the source and mask come from the store."""

    name: ClassVar[Stage] = "EDIT"

    def params(self, request: ImageRequest) -> RenderParams:
        params = super().params(request)
        entry = self.models.registry.get(params.model)
        if entry.edits_by_reference:
            # Conditioned on its images, not noised from the source: a mask or a strength would mean nothing.
            for field in ("mask_uri", "strength"):
                rule = f"is not taken by model {params.model!r} ({entry.kind}), which edits from reference images"
                require(getattr(request, field) is None, field, rule)
            return params
        strength = DEFAULT_EDIT_STRENGTH if request.strength is None else request.strength
        return dataclasses.replace(params, strength=strength, inpaint=request.mask_uri is not None)

    def batch_limit(self, params: RenderParams) -> int:
        # A reference family's images condition a whole pipeline call: one request per call.
        return 1 if self.models.registry.get(params.model).edits_by_reference else super().batch_limit(params)

    def prepare(self, item: _Pending) -> None:
        inputs = load_edit_inputs(item.request, self.store, self.context)
        item.source, item.references, item.mask = inputs.source, inputs.references, inputs.mask

    def run_model(self, params: RenderParams, chunk: list[_Pending]) -> BatchOutput:
        return self.models.edit(
            params.model,
            images=[item.source for item in chunk if item.source is not None],
            masks=[item.mask for item in chunk if item.mask is not None] if params.inpaint else None,
            strength=params.strength,
            references=[item.references for item in chunk],
            **_common_arguments(params, chunk),
        )


def _common_arguments(params: RenderParams, chunk: list[_Pending]) -> dict[str, object]:
    return {
        "prompts": [item.request.prompt for item in chunk],
        "negative_prompts": [item.request.negative_prompt or "" for item in chunk],
        "width": params.width,
        "height": params.height,
        "steps": params.steps,
        "guidance": params.guidance,
        "seeds": [item.seed for item in chunk],
        "n_per_prompt": params.n,
        "scheduler": params.scheduler,
    }
