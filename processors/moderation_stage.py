"""The moderation stage: prompt and input-image checks on a take of requests, the per-request and per-user limits,
and what passes forwarded to the render topic (or long lane) of its kind in the pool serving its final model. It
reads the model registry's entries for each request's compute, never the weights: a moderation worker imports no
torch."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

from pixelpipe.core.clock import utc_now
from pixelpipe.core.events import ImageRequest, Stage
from pixelpipe.core.experiments import Experiment, stamp_assignments
from pixelpipe.core.objects import ObjectStore
from pixelpipe.core.pools import DEFAULT_POOL, PoolRouting, pool_topics
from pixelpipe.core.registry import ModelRegistry
from pixelpipe.core.settings import ModerationSettings
from pixelpipe.core.validation import InvalidRequestError, check_compute
from pixelpipe.processors.edit_inputs import load_edit_inputs
from pixelpipe.processors.limits import UserLimits
from pixelpipe.processors.messages import (
    Emission,
    Emitter,
    Inbound,
    StageContext,
    StageFailure,
    arrival_s,
    deadline_passed,
    decode_request,
    queue_ms,
    unforeseen,
)
from pixelpipe.processors.moderation import ImageModerator, PromptModerator, Verdict
from pixelpipe.processors.outcomes import Outcome, StageWork
from pixelpipe.processors.params import final_model, request_compute

log = logging.getLogger(__name__)


class ModerationStage:
    """Prompt and input-image checks on a micro-batch; forwards what passes to the generate or edit topic of the
    pool serving the request's final model (its own, or its experiment variant's), or to that topic's long lane
    when its compute is over ``PIXELPIPE_LONG_REQUEST_COMPUTE``. A model no pool serves fails at once.

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
        pools: PoolRouting | None = None,
    ) -> None:
        """``limits`` holds the users of the requests topic's partitions this worker owns (a Faust table's data in
        the worker); ``placed``: requests are counted on their user's partition (``limits.home``), and a request
        found elsewhere is moved there first. ``pools`` routes each model to its pool (none configured: every
        model to the default pool)."""
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
        self.pools = pools or PoolRouting({}, context.codec)

    def topic_for(self, request: ImageRequest, compute: float | None, pool: str = DEFAULT_POOL) -> str:
        """Where a request that passed goes, in ``pool``'s render topics: its kind's long lane when its compute is
        over the threshold (and the lane is on), else its kind's topic."""
        topics = pool_topics(self.context.topics, pool)
        threshold = self.moderation.long_request_compute
        if threshold > 0 and compute is not None and compute > threshold:
            return topics.generate_long if request.kind == "GENERATE" else topics.edit_long
        return topics.generate if request.kind == "GENERATE" else topics.edit

    def handle_batch(self, messages: Sequence[Inbound]) -> list[Emission]:
        """Moderate a take of requests: one profanity-model call for all their prompts, then each on its own."""
        started_s = time.time()
        emit = Emitter(self.context)
        readable: list[tuple[Inbound, ImageRequest]] = []
        computes: list[float | None] = []
        pools: list[str | None] = []
        models: list[str | None] = []  # the final model, after the variants' overrides, that results and metrics name
        refusals: list[Outcome | None] = []
        for message in messages:
            request = None
            try:
                request = decode_request(message, self.context, emit, "moderation")
                if request is None or not self._at_home(message, request, emit):
                    continue
                if self._assign(request):  # forwarded as assigned
                    message = dataclasses.replace(message, value=self.context.codec.encode(request))
                # Expired, unserved, over-budget and rate-limited requests end before the prompt model: a flood
                # costs it nothing.
                model, set_by = final_model(request, self.experiments)
                pool = self.pools.pool_for(model)
                compute = request_compute(request, self.experiments, self.registry, self.context.limits)
                refusal = self._unserved(model, set_by) if pool is None else None
                refusal = refusal or self._refusal(request, arrival_s(message, started_s), compute)
            except Exception as e:  # a bug or an unforeseen input: this request fails, the stream goes on
                outcome = unforeseen(emit, message, "moderation", request, e)
                if request is None:
                    continue
                compute, pool, model, refusal = None, None, None, outcome
            readable.append((message, request))
            computes.append(compute)
            pools.append(pool)
            models.append(model)
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
        ended = zip(readable, refusals, computes, pools, models, strict=True)
        for (message, request), refusal, compute, pool, model in ended:
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
            # Its metric names the pool it is routed to; a request that ends here has none.
            emit.metric(request, work, model, pool=pool if outcome is None else None)
            if outcome is None:
                assert pool is not None  # a request no pool serves was refused above
                emit.forward(self.topic_for(request, compute, pool), message)
            else:
                emit.result(request, outcome, {"moderation": compute_ms}, model=model)
        return emit.take()

    def _assign(self, request: ImageRequest) -> bool:
        """Give the request the user's arm of every running experiment on the experiments topic that it does not
        name (buckets from the hash of key and user: with two variants, a user in the treatment at 5 % stays in it
        at 25 %), and record the revision of each such definition in force: the allocation it was assigned under.
        Experiments of a file are the SDK's to assign, as before. Returns whether the request changed."""
        live = {key: e for key, e in self.experiments.items() if e.revision}
        if not live:
            return False
        before = (dict(request.experiments), dict(request.experiment_revisions))
        stamp_assignments(request, live, request.created_at)
        for key in request.experiments.keys() & live.keys():
            request.experiment_revisions.setdefault(key, live[key].revision)
        return (request.experiments, request.experiment_revisions) != before

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

    def _unserved(self, model: str, set_by: str | None) -> Outcome:
        """The outcome of a request whose final model no pool serves: at once, not after a render timeout."""
        named = f"model {model!r}" + (f" (set by {set_by})" if set_by else "")
        pools = ", ".join(self.pools.pools())
        return Outcome.failed(
            "MODEL_NOT_SERVED",
            f"{named} is served by no pool (pools: {pools}); an operator adds it to one with pixelpipe pools apply",
        )

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
