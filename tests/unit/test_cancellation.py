"""Cancellation in the render stages, with a fake lookup in place of the worker's global table: a request cancelled
before its render spends no device time, a lone request cancelled while it renders stops the denoising at the next
step, and one cancelled in a shared batch has its images discarded; all end CANCELLED with metrics that say so."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter

import pytest
from confluent_kafka.admin import AclOperation
from prometheus_client import REGISTRY

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ImageResult, StageMetric
from pixelpipe.core.objects import FileObjectStore, open_object_store
from pixelpipe.core.settings import ObjectStoreSettings, RequestLimits, Settings, StageSettings, TopicSettings
from pixelpipe.core.topics import role_acls
from pixelpipe.core.validation import InvalidRequestError, check_reply_topic
from pixelpipe.gateway.app import create_app
from pixelpipe.gateway.keys import KeyStore
from pixelpipe.gateway.params import ModelInfo
from pixelpipe.gateway.pipeline import Pipeline, Submission
from pixelpipe.gateway.ratelimit import TokenBuckets
from pixelpipe.gateway.state import Gateway
from pixelpipe.processors.messages import Inbound, StageContext
from pixelpipe.processors.models import DiffusionModels
from pixelpipe.processors.moderation import Verdict
from pixelpipe.processors.outcomes import Outcome
from pixelpipe.processors.render import GenerateStage
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.producers import CancelOutcome, new_request
from pixelpipe.tools.model_builders import build_tiny_models
from tests.fake_kafka import faked_kafka

STEPS = 10
SUBMISSION = Submission(
    request_id="r", idempotent=False, fingerprint="f", kind="GENERATE", user_id="u", prompt="a fox", model="tiny-sd",
    n=1, width=64, height=64, steps=None,
)  # fmt: skip


def sample_value(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


class CancelledFrom:
    """The fake global table: a request counts as cancelled from its ``k``-th lookup on (1-based), and every lookup
    is counted. The stage asks once at planning, once before the model call, after each denoising step (while
    the whole chunk might stop) and once before output moderation."""

    def __init__(self, **from_lookup: int) -> None:
        self.from_lookup = from_lookup
        self.lookups: Counter[str] = Counter()

    def __call__(self, request_id: str) -> bool:
        self.lookups[request_id] += 1
        return self.lookups[request_id] >= self.from_lookup.get(request_id, 10**9)


class AllowingModerator:
    """Allows every image and keeps how many it was shown."""

    def __init__(self) -> None:
        self.shown = 0

    def check(self, images, stage):
        self.shown += len(images)
        return [Verdict(stage, True, {}, []) for _ in images]


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("models"))


def stage_for(registry, tmp_path):
    stamp = ModerationStamp("key")
    context = StageContext(TopicSettings(), RequestLimits(), StageSettings(), Codec(), "worker", stamp)
    store = open_object_store(ObjectStoreSettings(url=f"file://{tmp_path / 'objects'}"))
    return GenerateStage(context, DiffusionModels.from_file(registry), AllowingModerator(), store, {})


def null_registry(tmp_path):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"null": {"kind": "null", "seconds_per_image": 0.01}}))
    return path


def messages_of(stage, requests):
    stamp, codec = stage.context.stamp, stage.context.codec
    values = [codec.encode(request) for request in requests]
    return [
        Inbound(value, r.request_id.encode(), "t", 0, offset, time.time(), headers=stamp.headers("t", value))
        for offset, (r, value) in enumerate(zip(requests, values, strict=True))
    ]


def run(stage, requests):
    """Plan, render and finish one take; the results and the metrics (by request id and stage) it emitted."""
    take = stage.plan(messages_of(stage, requests))
    emissions = list(take.emissions)
    for chunk in take.chunks:
        emissions += stage.finish(stage.render(chunk))
    events = [stage.context.codec.decode(e.value) for e in emissions if not e.reply]
    results = {e.request_id: e for e in events if isinstance(e, ImageResult)}
    metrics = {(e.request_id, e.stage): e for e in events if isinstance(e, StageMetric)}
    return results, metrics


def stored_files(tmp_path):
    return list((tmp_path / "objects").rglob("*.png"))


def test_a_request_cancelled_in_the_queue_ends_cancelled_without_device_time(tmp_path):
    stage = stage_for(null_registry(tmp_path), tmp_path)
    calls = []
    stage.run_model = lambda params, chunk: calls.append(chunk)  # never reached
    request = new_request(prompt="a fox", model="null", user_id="u", width=16, height=16)
    stage.cancelled = CancelledFrom(**{request.request_id: 1})
    results, metrics = run(stage, [request])
    result, metric = results[request.request_id], metrics[(request.request_id, "GENERATE")]
    assert (result.status, result.error_code, result.images) == ("CANCELLED", None, [])
    assert result.error_message == "cancelled before its render: nothing rendered"
    assert (metric.outcome, metric.device_seconds, metric.cost_usd, metric.device) == ("CANCELLED", 0.0, 0.0, "none")
    assert metric.device_seconds_saved is None  # unknown: nothing measured what it would have taken
    assert calls == [] and stored_files(tmp_path) == []
    assert result.schema_version >= 3 and metric.schema_version >= 2  # the versions that added CANCELLED


def test_a_request_cancelled_after_planning_is_dropped_from_its_chunk_before_the_model_call(tmp_path):
    stage = stage_for(null_registry(tmp_path), tmp_path)
    late = new_request(prompt="late", model="null", user_id="u", width=16, height=16)
    kept = new_request(prompt="kept", model="null", user_id="u", width=16, height=16)
    stage.cancelled = CancelledFrom(**{late.request_id: 2})  # not at planning, at the check before the call
    take = stage.plan(messages_of(stage, [late, kept]))
    assert [len(chunk.items) for chunk in take.chunks] == [2]
    rendered = stage.render(take.chunks[0])
    assert [item.request.request_id for item in rendered.items] == [kept.request_id]
    assert rendered.output is not None and len(rendered.output.images) == 1  # the model saw one request
    events = [stage.context.codec.decode(e.value) for e in stage.finish(rendered) if not e.reply]
    statuses = {e.request_id: e.status for e in events if isinstance(e, ImageResult)}
    assert statuses == {late.request_id: "CANCELLED", kept.request_id: "SUCCEEDED"}
    (late_metric,) = [e for e in events if isinstance(e, StageMetric) and e.request_id == late.request_id]
    assert (late_metric.outcome, late_metric.device_seconds) == ("CANCELLED", 0.0)


def test_a_lone_request_cancelled_while_it_renders_stops_at_the_next_step(tiny_registry, tmp_path):
    stage = stage_for(tiny_registry, tmp_path)
    request = new_request(prompt="a fox", model="tiny-sd", user_id="u", width=64, height=64, steps=STEPS, n=2)
    # Lookups: planning, before the call, after step 1, after step 2 (cancelled: the denoising stops there).
    stage.cancelled = CancelledFrom(**{request.request_id: 4})
    unet_calls = []
    pipe = stage.models.load("tiny-sd").text2image
    hook = pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    try:
        results, metrics = run(stage, [request])
    finally:
        hook.remove()
    result, metric = results[request.request_id], metrics[(request.request_id, "GENERATE")]
    assert stage.models.load("tiny-sd").batched is False  # on CPU: one pipeline call per image, two here
    # Two steps of the first image's call, none of the second's: 2 of 2 x 10 steps planned.
    assert len(unet_calls) == 2
    assert result.status == "CANCELLED" and result.images == []
    assert result.error_message == "cancelled while rendering: stopped after 2 of 20 denoising steps"
    assert (result.steps, result.batch_size) == (STEPS, 1)  # what it was rendering
    assert metric.outcome == "CANCELLED" and metric.device != "none" and metric.device_seconds > 0
    assert metric.device_seconds_saved == pytest.approx(metric.device_seconds * 18 / 2)
    assert (request.request_id, "OUTPUT_MODERATION") not in metrics
    assert stage.images.shown == 0 and stored_files(tmp_path) == []


def test_a_request_cancelled_in_a_shared_batch_is_discarded_and_the_others_succeed(tmp_path):
    stage = stage_for(null_registry(tmp_path), tmp_path)
    gone, stays = (new_request(prompt=p, model="null", user_id="u", width=16, height=16) for p in ("gone", "stays"))
    # Cancelled after the model call began (the null model has no steps): found out before output moderation.
    stage.cancelled = CancelledFrom(**{gone.request_id: 3})
    results, metrics = run(stage, [gone, stays])
    statuses = {rid: r.status for rid, r in results.items()}
    assert statuses == {gone.request_id: "CANCELLED", stays.request_id: "SUCCEEDED"}
    assert results[gone.request_id].images == [] and len(results[stays.request_id].images) == 1
    assert results[gone.request_id].error_message == "cancelled while its batch rendered: its images were discarded"
    assert results[gone.request_id].batch_size == 2
    render = metrics[(gone.request_id, "GENERATE")]
    assert (render.outcome, render.batch_size, render.device_seconds_saved) == ("CANCELLED", 2, 0.0)
    assert render.device_seconds == pytest.approx(metrics[(stays.request_id, "GENERATE")].device_seconds)
    assert (gone.request_id, "OUTPUT_MODERATION") not in metrics  # never moderated
    assert stage.images.shown == 1 and len(stored_files(tmp_path)) == 1  # never stored


def test_by_default_nothing_is_cancelled(tmp_path):
    stage = stage_for(null_registry(tmp_path), tmp_path)
    request = new_request(prompt="a fox", model="null", user_id="u", width=16, height=16)
    results, _ = run(stage, [request])
    assert results[request.request_id].status == "SUCCEEDED"


def test_a_cancelled_outcome_is_its_own_stage_outcome():
    outcome = Outcome.cancelled("cancelled before its render: nothing rendered")
    assert (outcome.status, outcome.stage_outcome, outcome.error_code) == ("CANCELLED", "CANCELLED", None)


def test_publishers_write_cancellations_renderers_read_them_and_no_request_replies_there():
    topics = TopicSettings()

    def granted(role, operation):
        return {b.name for b in role_acls(role, f"User:{role}", topics, "g", "s") if b.operation == operation}

    assert topics.cancellations == "pixelpipe.cancellations" and topics.cancellations in topics.pipeline()
    assert topics.cancellations in granted("publisher", AclOperation.WRITE)
    assert topics.cancellations in granted("renderer", AclOperation.READ) - granted("renderer", AclOperation.WRITE)
    assert topics.cancellations not in granted("moderation", AclOperation.READ) | granted("sink", AclOperation.READ)
    for role in ("publisher", "moderation", "renderer", "sink"):  # the broker refuses a duplicate binding
        bindings = role_acls(role, f"User:{role}", topics, "g", "s")
        assert len(set(bindings)) == len(bindings), role
    with pytest.raises(InvalidRequestError):
        check_reply_topic(topics.cancellations, topics)


# -- the answer `pixelpipe cancel` and Publisher.cancel give ------------------------------------------------------
def result(status, **fields):
    return ImageResult(event_id="e", request_id="req-1", status=status, user_id="u", model="m", **fields)


def test_a_cancel_answers_cancelled_already_finished_or_no_result_yet():
    cancelled = CancelOutcome("req-1", result("CANCELLED", error_message="cancelled before its render"), 0.4)
    assert cancelled.cancelled and not cancelled.finished_before
    assert str(cancelled) == "req-1: CANCELLED (cancelled before its render)"
    done = CancelOutcome("req-1", result("SUCCEEDED"), 0.1)
    assert done.finished_before and not done.cancelled
    assert str(done) == "req-1: already finished: SUCCEEDED; the cancellation changed nothing"
    failed = CancelOutcome("req-1", result("FAILED", error_code="DEADLINE_EXCEEDED"), 0.1)
    assert str(failed) == "req-1: already finished: FAILED DEADLINE_EXCEEDED; the cancellation changed nothing"
    pending = CancelOutcome("req-1", None, 10.0)
    assert not pending.cancelled and not pending.finished_before
    assert str(pending).startswith("req-1: cancellation published; no result yet after 10 s.")


# -- the gateway: a caller that leaves abandons its request ---------------------------------------------------
class WaitingPipeline:
    """A pipeline whose results never come; records the submissions its callers abandoned."""

    reply_topic = "pixelpipe.replies.gateway.test"

    def __init__(self) -> None:
        self.abandoned: list[Submission] = []

    def check_capacity(self) -> None:
        pass

    def previews(self, request_id: str) -> asyncio.Queue:
        return asyncio.Queue()  # none come

    def forget_previews(self, request_id: str) -> None:
        pass

    async def submit(self, submission: Submission) -> ImageResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def abandon(self, submission: Submission) -> None:
        self.abandoned.append(submission)


def gateway_app(tmp_path, pipeline):
    keys = KeyStore(tmp_path / "keys.json")
    secret, _ = keys.create("acme", ["tiny-sd"])
    settings = Settings().updated(gateway_default_size="64x64")
    app = create_app(settings)  # the lifespan (Kafka) is not run: the state is set here
    app.state.gateway = Gateway(
        settings=settings,
        keys=keys,
        models={"tiny-sd": ModelInfo("tiny-sd", "stable-diffusion", 4)},
        store=FileObjectStore(tmp_path / "objects"),
        pipeline=pipeline,
        buckets=TokenBuckets(),
    )
    return app, secret


async def call_then_leave(app, secret: str, body: dict, leave_after_s: float = 0.3) -> list[dict]:
    """One POST /v1/images/generations whose caller disconnects ``leave_after_s`` after sending its body, as uvicorn
    reports it (ASGI spec 2.3); the messages the app sent."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/images/generations",
        "raw_path": b"/v1/images/generations",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {secret}".encode()), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(leave_after_s)
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


@pytest.mark.parametrize("stream", [False, True], ids=["json", "event-stream"])
def test_a_caller_that_leaves_before_its_answer_abandons_its_request(tmp_path, stream):
    async def scenario() -> tuple[WaitingPipeline, list[dict]]:
        pipeline = WaitingPipeline()
        app, secret = gateway_app(tmp_path, pipeline)
        body = {"prompt": "a fox", "model": "tiny-sd"} | ({"stream": True, "partial_images": 1} if stream else {})
        return pipeline, await call_then_leave(app, secret, body)

    pipeline, sent = asyncio.run(scenario())
    assert [s.request_id for s in pipeline.abandoned] == [pipeline.abandoned[0].request_id]
    if not stream:
        assert sent[0]["status"] == 499  # counted in the gateway's metrics; the caller is gone
    assert sample_value("pixelpipe_gateway_calls_waiting") == 0


def test_abandoning_cancels_the_request_and_its_wait_unless_it_carried_an_idempotency_key(tmp_path, monkeypatch):
    broker = faked_kafka(monkeypatch)  # no worker: both wait until abandoned
    submissions = [dataclasses.replace(SUBMISSION, request_id=rid, idempotent=rid == "b") for rid in ("a", "b")]

    async def scenario() -> tuple[bool, bool]:
        pipeline = Pipeline(Settings(), FileObjectStore(tmp_path / "objects"), "gw-1")
        await pipeline.start()
        calls = [asyncio.ensure_future(pipeline.submit(submission)) for submission in submissions]
        while len(broker.published) < 2:
            await asyncio.sleep(0.01)
        plain_wait, keyed_wait = (pipeline._inflight[submission.request_id] for submission in submissions)
        for submission in submissions:
            pipeline.abandon(submission)
        await asyncio.gather(plain_wait, return_exceptions=True)
        outcome = plain_wait.cancelled(), keyed_wait.done()
        keyed_wait.cancel()  # the gateway stops
        await asyncio.gather(*calls, keyed_wait, return_exceptions=True)
        await pipeline.close()
        return outcome

    plain_cancelled, keyed_done = asyncio.run(scenario())
    assert broker.cancellations == [("a", "the caller left before its answer", "gateway:gw-1")]
    assert plain_cancelled and not keyed_done  # a retry with its key must still get its image
