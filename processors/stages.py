"""What each stage does with its messages, apart from Kafka: plain blocking code, run in an executor.

``ModerationStage.handle`` takes one request; ``RenderStage.handle_batch`` takes a micro-batch of generate or
edit requests. Both return the events to send (results, metrics, forwarded requests, dead letters); the Faust
agents in ``processors.app`` send them and only then let the offsets be committed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image

from pixelpipe.config import Settings
from pixelpipe.processors.events import (
    Outcome,
    StageWork,
    dead_letter_record,
    metric_record,
    result_record,
    utc_now,
)
from pixelpipe.processors.imaging import ImageError, decode_image, decode_mask, encode_png
from pixelpipe.processors.models import BatchOutput, DiffusionModels, ModelError
from pixelpipe.processors.moderation import ImageModerator, PromptModerator
from pixelpipe.producers.experiments import Experiment
from pixelpipe.producers.requests import InvalidRequestError, validate_request
from pixelpipe.schemas.codec import Codec, CodecError, Record
from pixelpipe.sinks.objects import ObjectStore, ObjectStoreError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Inbound:
    """The parts of a Kafka message a stage needs."""

    value: bytes
    key: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_s: float  # when it was produced: the start of its queue time


@dataclass(frozen=True)
class Emission:
    topic: str
    key: bytes | None
    value: bytes


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


def with_retries(action: Callable[[], T], settings: Settings, what: str) -> T:
    """Run ``action``, retrying transient failures with exponential backoff, at most ``retry_attempts`` times."""
    for attempt in range(1, settings.retry_attempts + 1):
        try:
            return action()
        except Exception as e:
            if not is_transient(e) or attempt == settings.retry_attempts:
                raise
            delay_s = settings.retry_backoff_ms / 1000 * 2 ** (attempt - 1)
            log.warning("transient failure, retrying", extra={"what": what, "attempt": attempt, "error": str(e)})
            time.sleep(delay_s)
    raise AssertionError("unreachable")


class Emitter:
    """Collects a stage's outgoing events, encoded."""

    def __init__(self, settings: Settings, codec: Codec, worker_id: str) -> None:
        self.settings = settings
        self.codec = codec
        self.worker_id = worker_id
        self.emissions: list[Emission] = []

    def result(self, request: Record, outcome: Outcome, timings_ms: dict[str, float]) -> None:
        value = self.codec.encode("ImageResult", result_record(request, outcome, timings_ms))
        key = request["request_id"].encode()
        self.emissions.append(Emission(self.settings.topic_results, key, value))
        if request.get("reply_topic"):
            self.emissions.append(Emission(request["reply_topic"], key, value))

    def metric(self, request: Record, work: StageWork) -> None:
        record = metric_record(request, work, self.worker_id, self.settings.device_hour_price_usd)
        value = self.codec.encode("StageMetric", record)
        self.emissions.append(Emission(self.settings.topic_metrics, request["request_id"].encode(), value))

    def forward(self, topic: str, message: Inbound) -> None:
        self.emissions.append(Emission(topic, message.key, message.value))

    def dead_letter(self, message: Inbound, reason: str, stage: str, request_id: str | None) -> None:
        record = dead_letter_record(
            value=message.value,
            key=message.key,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            reason=reason,
            stage=stage,
            request_id=request_id,
        )
        self.emissions.append(
            Emission(self.settings.topic_dead_letter, message.key, self.codec.encode("DeadLetter", record))
        )

    def take(self) -> list[Emission]:
        emissions, self.emissions = self.emissions, []
        return emissions


def decode_request(message: Inbound, settings: Settings, codec: Codec, emit: Emitter, stage: str) -> Record | None:
    """The request in ``message``, or None after dead-lettering it (and failing it, when its id is readable)."""
    try:
        request = codec.decode_as("ImageRequest", message.value)
    except CodecError as e:
        request_id = _readable_request_id(message.key)
        emit.dead_letter(message, f"undecodable: {e}", stage, request_id)
        if request_id is not None:
            emit.result(_unreadable_request(request_id), Outcome.failed("UNDECODABLE", str(e)), {})
        return None
    try:
        validate_request(request, settings, check_deadline=False)
    except InvalidRequestError as e:
        emit.result(request, Outcome.failed("INVALID_REQUEST", str(e)), {})
        return None
    return request


def _readable_request_id(key: bytes | None) -> str | None:
    try:
        return key.decode() if key else None
    except UnicodeDecodeError:
        return None


def _unreadable_request(request_id: str) -> Record:
    # Only the id is known; the result says so with empty fields.
    return {"request_id": request_id, "kind": None, "user_id": "", "model": "", "experiments": {}, "created_at": None}


def apply_overrides(request: Record, experiments: Mapping[str, Experiment]) -> Record:
    """The request with the overrides of its assigned variants applied (model, steps, guidance, scheduler).

    Experiments apply in key order, so when two override the same parameter the later key wins. ``scheduler``
    is not an ImageRequest field: it exists only on the record a stage works with.
    """
    changed = {"scheduler": None} | request
    for key, variant in sorted(request["experiments"].items()):
        if key in experiments:
            changed |= experiments[key].overrides_for(variant)
    return changed


def deadline_passed(request: Record, now: dt.datetime) -> bool:
    return request.get("deadline") is not None and request["deadline"] <= now


def queue_ms(message: Inbound, started_s: float) -> float:
    return (started_s - message.timestamp_s) * 1000.0


class UserRateLimiter:
    """A token bucket per user, on the requests' own timestamps: a user who floods the topic is cut back to
    ``per_minute`` at moderation, so the requests of everyone else behind the flood are not held up by it."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, at)

    def allow(self, user_id: str, at_s: float) -> bool:
        if self.per_minute <= 0:
            return True
        rate = self.per_minute / 60.0
        tokens, last = self._buckets.get(user_id, (float(self.per_minute), at_s))
        tokens = min(float(self.per_minute), tokens + max(0.0, at_s - last) * rate)
        allowed = tokens >= 1.0
        self._buckets[user_id] = (tokens - 1.0 if allowed else tokens, max(last, at_s))
        if len(self._buckets) > 100_000:  # forget users idle long enough for their bucket to be full again
            self._buckets = {u: b for u, b in self._buckets.items() if at_s - b[1] < 60.0}
        return allowed


class ModerationStage:
    """Prompt and input-image checks; forwards what passes to the generate or edit topic."""

    name = "MODERATION"

    def __init__(
        self,
        settings: Settings,
        codec: Codec,
        prompts: PromptModerator,
        images: ImageModerator,
        store: ObjectStore,
        worker_id: str,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.prompts = prompts
        self.images = images
        self.store = store
        self.emit = Emitter(settings, codec, worker_id)
        self.limiter = UserRateLimiter(settings.max_requests_per_user_per_minute)

    def handle(self, message: Inbound) -> list[Emission]:
        started_s = time.time()
        request = decode_request(message, self.settings, self.codec, self.emit, "moderation")
        if request is not None:
            try:
                outcome = self._moderate(request, message.timestamp_s)
            except Exception as e:  # a bug or an unforeseen failure: fail this request, keep the stream going
                log.exception("moderation failed", extra={"request_id": request["request_id"]})
                self.emit.dead_letter(message, f"internal error: {e!r}", "moderation", request["request_id"])
                outcome = Outcome.failed("INTERNAL_ERROR", repr(e))
            compute_ms = (time.time() - started_s) * 1000.0
            self.emit.metric(
                request,
                StageWork(
                    self.name,
                    "OK" if outcome is None else ("REJECTED" if outcome.status == "REJECTED" else "FAILED"),
                    queue_ms(message, started_s),
                    compute_ms,
                    "cpu",
                    compute_ms / 1000.0,
                ),
            )
            if outcome is None:
                topic = self.settings.topic_edit if request["kind"] == "EDIT" else self.settings.topic_generate
                self.emit.forward(topic, message)
            else:
                self.emit.result(request, outcome, {"moderation": compute_ms})
        return self.emit.take()

    def _moderate(self, request: Record, produced_s: float) -> Outcome | None:
        """None when the request may go on; otherwise its terminal outcome."""
        if deadline_passed(request, utc_now()):
            return Outcome.failed("DEADLINE_EXCEEDED", f"deadline {request['deadline'].isoformat()} passed")
        if not self.limiter.allow(request["user_id"], produced_s):
            limit = self.settings.max_requests_per_user_per_minute
            return Outcome.failed("RATE_LIMITED", f"user {request['user_id']} is over {limit} requests per minute")
        verdict = self.prompts.check(request["prompt"], request.get("negative_prompt"))
        if not verdict.allowed:
            return Outcome.rejected(verdict.stage, verdict.scores, verdict.rejected_categories)
        if request["kind"] != "EDIT":
            return None
        try:
            source, _ = load_edit_inputs(request, self.store, self.settings)
        except StageFailure as e:
            return Outcome.failed(e.code, str(e))
        (verdict,) = self.images.check([source], "INPUT_IMAGE")
        if not verdict.allowed:
            return Outcome.rejected(verdict.stage, verdict.scores, verdict.rejected_categories)
        return None


def load_edit_inputs(request: Record, store: ObjectStore, settings: Settings) -> tuple[Image.Image, Image.Image | None]:
    """The edit's source image and mask, read from the configured store and decoded safely."""
    try:
        source = decode_image(
            with_retries(lambda: store.get(request["source_image_uri"]), settings, "read source"),
            max_pixels=settings.max_source_pixels,
        )
        mask = None
        if request.get("mask_uri"):
            mask = decode_mask(
                with_retries(lambda: store.get(request["mask_uri"]), settings, "read mask"),
                source,
                max_pixels=settings.max_source_pixels,
            )
    except (ObjectStoreError, ImageError) as e:
        raise StageFailure("INVALID_SOURCE", str(e)) from e
    except Exception as e:
        if is_transient(e):
            raise StageFailure("STORAGE_UNAVAILABLE", f"reading the edit inputs failed: {e}") from e
        raise
    return source, mask


@dataclass
class _Pending:
    message: Inbound
    request: Record
    source: Image.Image | None = None  # EDIT: the decoded source image
    mask: Image.Image | None = None  # EDIT with a mask: inpainting


def batch_key(request: Record) -> tuple[Any, ...]:
    """Requests with equal keys can share one model call."""
    return (
        request["model"],
        request["width"],
        request["height"],
        request["steps"],
        request["guidance"],
        request["n"],
        request["strength"],
        request["mask_uri"] is not None,
        request.get("scheduler"),
    )


def service_order(pending: _Pending) -> tuple[int, dt.datetime, float]:
    """INTERACTIVE before BATCH, then the earliest deadline, then the oldest."""
    request = pending.request
    far = dt.datetime.max.replace(tzinfo=dt.UTC)
    return (request["priority"] != "INTERACTIVE", request["deadline"] or far, pending.message.timestamp_s)


def request_seed(request: Record) -> int:
    """The request's seed, or one derived from its id, so a redelivered request draws the same pixels."""
    if request["seed"] is not None:
        return int(request["seed"])
    return int.from_bytes(hashlib.sha256(request["request_id"].encode()).digest()[:4], "big")


class RenderStage:
    """Text-to-image (GENERATE) or image-to-image and inpainting (EDIT), then output moderation and storage."""

    def __init__(
        self,
        kind: str,
        settings: Settings,
        codec: Codec,
        models: DiffusionModels,
        images: ImageModerator,
        store: ObjectStore,
        worker_id: str,
        experiments: Mapping[str, Experiment],
    ) -> None:
        self.kind = kind
        self.experiments = experiments
        self.name = kind  # the StageMetric stage: GENERATE or EDIT
        self.settings = settings
        self.codec = codec
        self.models = models
        self.images = images
        self.store = store
        self.emit = Emitter(settings, codec, worker_id)

    def handle_batch(self, messages: Sequence[Inbound]) -> list[Emission]:
        started_s = time.time()
        pending: list[_Pending] = []
        for message in messages:
            request = decode_request(message, self.settings, self.codec, self.emit, self.kind.lower())
            if request is None:
                continue
            item = _Pending(message, apply_overrides(request, self.experiments))
            if deadline_passed(request, utc_now()):
                self._fail(item, started_s, "DEADLINE_EXCEEDED", "deadline passed in the queue")
                continue
            if self.kind == "EDIT":
                try:
                    item.source, item.mask = load_edit_inputs(request, self.store, self.settings)
                except StageFailure as e:
                    self._fail(item, started_s, e.code, str(e))
                    continue
            pending.append(item)
        pending.sort(key=service_order)
        groups: dict[tuple[Any, ...], list[_Pending]] = {}
        for item in pending:
            groups.setdefault(batch_key(item.request), []).append(item)
        # Groups in the order of their most urgent request; each group in chunks of max_batch.
        for group in groups.values():
            for start in range(0, len(group), self.settings.max_batch):
                chunk = group[start : start + self.settings.max_batch]
                try:
                    self._render(chunk, started_s)
                except Exception as e:  # a bug or an unforeseen failure: fail these requests, keep the stream going
                    log.exception("render failed", extra={"stage": self.name, "requests": len(chunk)})
                    for item in chunk:
                        self.emit.dead_letter(item.message, f"internal error: {e!r}", self.kind.lower(), None)
                        self._fail(item, started_s, "INTERNAL_ERROR", repr(e))
        return self.emit.take()

    def _fail(self, item: _Pending, started_s: float, code: str, message: str) -> None:
        self.emit.result(item.request, Outcome.failed(code, message), {})
        self.emit.metric(
            item.request, StageWork(self.name, "FAILED", queue_ms(item.message, started_s), 0.0, "none", 0.0)
        )

    def _render(self, chunk: list[_Pending], batch_started_s: float) -> None:
        first = chunk[0].request
        try:
            device = str(self.models.load(first["model"]).device)  # a first load is not the batch's compute time
            work_started_s = time.time()
            output = self._run_model(chunk)
        except ModelError as e:
            for item in chunk:
                self._fail(item, batch_started_s, "MODEL_ERROR", str(e))
            return
        except StageFailure as e:
            for item in chunk:
                self._fail(item, batch_started_s, e.code, str(e))
            return
        model_ms = (time.time() - work_started_s) * 1000.0
        images_in_batch = sum(len(images) for images in output.images)
        for item, images in zip(chunk, output.images, strict=True):
            share_s = output.device_seconds * len(images) / images_in_batch
            outcome, moderation_ms = self._finish(item, images)
            self.emit.metric(
                item.request,
                StageWork(
                    self.name,
                    "FAILED" if outcome.status == "FAILED" else "OK",
                    queue_ms(item.message, work_started_s),
                    model_ms,
                    device,
                    share_s,
                    len(chunk),
                ),
            )
            self.emit.metric(
                item.request,
                StageWork(
                    "OUTPUT_MODERATION",
                    {"SUCCEEDED": "OK", "REJECTED": "REJECTED"}.get(outcome.status, "FAILED"),
                    0.0,
                    moderation_ms,
                    "cpu",
                    moderation_ms / 1000.0,
                    len(images),
                ),
            )
            total_ms = (utc_now() - item.request["created_at"]).total_seconds() * 1000.0
            timings = {
                "queue": queue_ms(item.message, work_started_s),
                self.kind.lower(): model_ms,
                "output_moderation": moderation_ms,
                "total": total_ms,
            }
            self.emit.result(item.request, outcome, timings)

    def _run_model(self, chunk: list[_Pending]) -> BatchOutput:
        requests = [item.request for item in chunk]
        first = requests[0]
        common = {
            "prompts": [r["prompt"] for r in requests],
            "negative_prompts": [r["negative_prompt"] or "" for r in requests],
            "width": first["width"],
            "height": first["height"],
            "steps": first["steps"],
            "guidance": first["guidance"],
            "seeds": [request_seed(r) for r in requests],
            "n_per_prompt": first["n"],
            "scheduler": first.get("scheduler"),
        }
        if self.kind == "GENERATE":
            return self.models.generate(first["model"], **common)
        return self.models.edit(
            first["model"],
            images=[item.source for item in chunk],
            masks=None if first["mask_uri"] is None else [item.mask for item in chunk],
            strength=first["strength"] if first["strength"] is not None else 0.75,
            **common,
        )

    def _finish(self, item: _Pending, images: list[Image.Image]) -> tuple[Outcome, float]:
        """Moderate the outputs, then store them; returns the outcome and the moderation time."""
        started_s = time.time()
        verdicts = self.images.check(images, "OUTPUT_IMAGE")
        moderation_ms = (time.time() - started_s) * 1000.0
        rejected = [v for v in verdicts if not v.allowed]
        if rejected:
            scores = {c: max(v.scores.get(c, 0.0) for v in verdicts) for v in rejected for c in v.scores}
            categories = sorted({c for v in rejected for c in v.rejected_categories})
            return Outcome.rejected("OUTPUT_IMAGE", scores, categories), moderation_ms
        try:
            stored = [self._store(item.request, index, image) for index, image in enumerate(images)]
        except StageFailure as e:
            return Outcome.failed(e.code, str(e)), moderation_ms
        return Outcome("SUCCEEDED", images=stored), moderation_ms

    def _store(self, request: Record, index: int, image: Image.Image) -> Record:
        data = encode_png(image)
        key = self.store.image_key(request["request_id"], index, "png", request["created_at"])
        try:
            stored = with_retries(lambda: self.store.put(key, data, "image/png"), self.settings, "store image")
        except Exception as e:
            if is_transient(e):
                raise StageFailure("STORAGE_UNAVAILABLE", f"storing image {index} failed: {e}") from e
            raise
        return {
            "uri": stored.uri,
            "sha256": stored.sha256,
            "width": image.width,
            "height": image.height,
            "format": "PNG",
            "bytes": stored.bytes,
        }
