"""The render stages: ``GenerateStage`` and ``EditStage`` (both ``RenderStage``) handle a take in three steps:
``plan`` (its requests read, checked and grouped into chunks, ``processors.chunks``), ``render`` (a chunk's model
call) and ``finish`` (output moderation, encoding, storage), so that a chunk renders while the one before it is
finished (``processors.takes``). Each returns the events to send (results, metrics, dead letters); the agents in
``processors.app`` send them and only then let the offsets be committed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

from PIL import Image

from pixelpipe.core.clock import utc_now
from pixelpipe.core.events import ImageRequest, Stage, StageOutcome, StoredImage
from pixelpipe.core.experiments import Experiment
from pixelpipe.core.live_experiments import ASSIGNED_REVISION_WAIT_S
from pixelpipe.core.objects import ObjectStore, StoredObject
from pixelpipe.core.registry import ModelError
from pixelpipe.core.validation import InvalidRequestError, require
from pixelpipe.processors.chunks import (
    Interruption,
    Pending,
    PlannedChunk,
    PlannedTake,
    RenderedChunk,
    in_service_order,
)
from pixelpipe.processors.edit_inputs import load_edit_inputs
from pixelpipe.processors.imaging import encode_png
from pixelpipe.processors.messages import (
    Emission,
    Emitter,
    Inbound,
    StageContext,
    StageFailure,
    deadline_passed,
    decode_request,
    is_transient,
    queue_ms,
    unforeseen,
    with_retries,
)
from pixelpipe.processors.models import BatchOutput, DiffusionModels
from pixelpipe.processors.moderation import ImageModerator
from pixelpipe.processors.outcomes import Outcome, Rendered, RenderParams, StageWork
from pixelpipe.processors.params import model_of_unrendered, resolve_params
from pixelpipe.processors.previews import Previews, PreviewSink, hook_for, previewing

log = logging.getLogger(__name__)

DEFAULT_EDIT_STRENGTH = 0.75


@dataclass
class _Reviewed:
    """A request's images after output moderation, and its outcome: REJECTED, else None until they are stored."""

    item: Pending
    images: list[Image.Image]
    moderation_ms: float
    outcome: Outcome | None = None


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
        self.cancelled: Callable[[str], bool] = lambda _: False
        # Whether the worker is stopping: asked before each model call and after each denoising step, on the model
        # thread. A call in progress then ends at the next step and its chunk is handed back.
        self.stopping: Callable[[], bool] = lambda: False
        # Waits, up to a deadline, until the worker holds each experiment at the revision a request was assigned
        # under; says which it still lacks (``LiveExperiments.unread``). Else a variant's overrides not read here yet
        # would be missed while the result names the variant.
        self.unread_experiments: Callable[[Mapping[str, int], float], str | None] = lambda *_: None

    def preview_hook(self, params: RenderParams, items: Sequence[Pending]) -> Previews | None:
        """Sends the previews of images in progress that the chunk's requests asked for (processors/previews.py)."""
        requests = [(i.request.request_id, i.request.reply_topic, i.request.n, i.message.headers) for i in items]
        return hook_for(requests, params.width, params.height, self.preview_sink, self.images, self.preview_executor)

    def _emitter(self) -> Emitter:
        """An emitter of this stage's events: every result and metric names the stage's pool."""
        return Emitter(self.context, self.context.pool)

    # -- what subclasses define ------------------------------------------------------------------------------
    def params(self, request: ImageRequest) -> RenderParams:
        return resolve_params(request, self.experiments, self.models, self.context.limits)

    def prepare(self, item: Pending) -> None:
        """Get what the model call needs beyond the request (raises StageFailure)."""

    def batch_limit(self, params: RenderParams) -> int:
        """Most requests of ``params`` one model call may take."""
        return self.models.registry.get(params.model).batch_limit(self.context.stages.max_batch)

    def run_model(self, params: RenderParams, chunk: list[Pending]) -> BatchOutput:
        raise NotImplementedError

    # -- one take of the stream: planned, then each chunk rendered and finished (see processors.takes) ----------
    def plan(self, messages: Sequence[Inbound]) -> PlannedTake:
        """Read and check a take's requests, and group them into chunks of equal parameters, one model call
        each; what ended early is in the plan's emissions."""
        started_s = time.time()
        emit = self._emitter()
        pending: list[Pending] = []
        experiments_by = time.monotonic() + ASSIGNED_REVISION_WAIT_S  # one wait for the take, not one per request
        for message in messages:
            request = None
            try:
                request = decode_request(message, self.context, emit, self.name.lower())
                item = None if request is None else self._admit(emit, message, request, started_s, experiments_by)
            except Exception as e:  # a bug or an unforeseen input: this request fails, the stream goes on
                outcome = unforeseen(emit, message, self.name.lower(), request, e)
                if request is not None:
                    self._end_failed(emit, request, message, started_s, outcome)
                continue
            if item is not None:
                pending.append(item)
        groups: dict[RenderParams, list[Pending]] = {}
        for item in in_service_order(pending):
            groups.setdefault(item.params, []).append(item)
        # Groups in the order of their most urgent request; each group in chunks of its model's batch limit.
        chunks: list[PlannedChunk] = []
        for params, group in groups.items():
            max_batch = self.batch_limit(params)
            for start in range(0, len(group), max_batch):
                chunks.append(PlannedChunk(params, group[start : start + max_batch], started_s))
        return PlannedTake(emit.take(), chunks)

    def _admit(
        self, emit: Emitter, message: Inbound, request: ImageRequest, started_s: float, experiments_by: float
    ) -> Pending | None:
        """The request of ``message`` ready to render; None after ending it (unmoderated, cancelled, expired,
        its experiments' definitions not read here by ``experiments_by``, invalid for its model, its inputs
        unreadable)."""
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
        if unread := self.unread_experiments(request.experiment_revisions, experiments_by):
            self._fail(emit, request, message, started_s, "EXPERIMENT_UNAVAILABLE", f"not rendered: {unread}")
            return None
        try:
            item = Pending(message, request, self.params(request))
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
        emit = self._emitter()
        items: list[Pending] = []
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
            stop = Interruption(
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
        emit = self._emitter()
        try:
            reviews = [self._review(item, images) for item, images in chunk.outputs()]
            self._store([review for review in reviews if review.outcome is None])
            self._report(emit, chunk, reviews)
        except Exception as e:
            emit = self._emitter()  # nothing half-reported: every request of the chunk fails alike
            self._fail_internally(emit, chunk.params, chunk.items, e, chunk.started_s)
        return [*chunk.ended, *emit.take()]

    def _cancel(
        self, emit: Emitter, request: ImageRequest, message: Inbound, started_s: float, model: str | None = None
    ) -> None:
        """A request cancelled before its model call: CANCELLED, no device time spent, none known to be saved."""
        model = model or model_of_unrendered(request, self.experiments)
        emit.result(request, Outcome.cancelled("cancelled before its render: nothing rendered"), {}, model=model)
        work = StageWork(self.name, "CANCELLED", queue_ms(message, started_s), 0.0, "none", 0.0)
        emit.metric(request, work, model)

    def _report_stopped(
        self,
        emit: Emitter,
        params: RenderParams,
        items: list[Pending],
        output: BatchOutput,
        stop: Interruption,
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
        self, item: Pending, started_s: float, model_ms: float, moderation_ms: float | None = None
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
        """A request FAILED before its model call: its result, and a metric with no device time, naming the model it
        would have run with."""
        model = model or model_of_unrendered(request, self.experiments)
        emit.result(request, outcome, {}, model=model)
        emit.metric(request, StageWork(self.name, "FAILED", queue_ms(message, started_s), 0.0, "none", 0.0), model)

    def _fail_internally(
        self, emit: Emitter, params: RenderParams, chunk: list[Pending], error: Exception, started_s: float
    ) -> None:
        """A bug or an unforeseen failure: dead-letter and fail these requests, keep the stream going."""
        log.exception("render failed", extra={"stage": self.name, "requests": len(chunk)}, exc_info=error)
        for item in chunk:
            emit.dead_letter(item.message, f"internal error: {error!r}", self.name.lower(), None)
            self._fail(emit, item.request, item.message, started_s, "INTERNAL_ERROR", repr(error), params.model)

    def _review(self, item: Pending, images: list[Image.Image]) -> _Reviewed:
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

    def run_model(self, params: RenderParams, chunk: list[Pending]) -> BatchOutput:
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

    def prepare(self, item: Pending) -> None:
        inputs = load_edit_inputs(item.request, self.store, self.context)
        item.source, item.references, item.mask = inputs.source, inputs.references, inputs.mask

    def run_model(self, params: RenderParams, chunk: list[Pending]) -> BatchOutput:
        return self.models.edit(
            params.model,
            images=[item.source for item in chunk if item.source is not None],
            masks=[item.mask for item in chunk if item.mask is not None] if params.inpaint else None,
            strength=params.strength,
            references=[item.references for item in chunk],
            **_common_arguments(params, chunk),
        )


def _common_arguments(params: RenderParams, chunk: list[Pending]) -> dict[str, object]:
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
