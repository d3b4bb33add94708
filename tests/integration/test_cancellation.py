"""Cancellation on the local stack: the cancellations topic, the answers of `pixelpipe cancel`, the gateway
cancelling the request of a caller that leaves, and a worker that honours cancellations (a request cancelled before
its render spends no device time; a lone one cancelled while it renders stops part way)."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from pixelpipe.cli import main
from pixelpipe.core.codec import Codec
from pixelpipe.core.events import Cancellation, Event, ImageRequest, ImageResult, StageMetric
from pixelpipe.core.settings import KafkaSettings, Settings
from pixelpipe.core.topics import PARTIAL_IMAGES_HEADER, PREVIEW_HEADER, assign_from_start, ensure_topics
from pixelpipe.gateway.keys import KeyStore
from pixelpipe.gateway.pipeline import request_id_for
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.tools.model_builders import build_tiny_models
from pixelpipe.tools.processes import WorkerProcess
from tests.conftest import free_port, with_own_topics
from tests.integration.test_gateway import Gateway

pytestmark = pytest.mark.integration


@pytest.fixture
def topics(topic_settings: Settings) -> Settings:
    ensure_topics(topic_settings.kafka, topic_settings.topics)
    return topic_settings


def read_all(kafka: KafkaSettings, topic: str, event_type: type[Event], count: int, timeout_s: float) -> list[Event]:
    """Every ``event_type`` on ``topic`` from its start, once ``count`` are there or ``timeout_s`` has passed."""
    consumer = Consumer(kafka.client_config() | {"group.id": f"test-{uuid.uuid4()}", "enable.auto.commit": False})
    assign_from_start(consumer, topic)
    codec, found, deadline = Codec(), [], time.monotonic() + timeout_s
    try:
        while len(found) < count and time.monotonic() < deadline:
            for message in consumer.consume(100, timeout=0.5):
                if not message.error():
                    found.append(codec.decode_as(event_type, message.value()))
    finally:
        consumer.close()
    return found


def test_the_cancellations_topic_is_compacted(topics):
    resource = ConfigResource(ConfigResource.Type.TOPIC, topics.topics.cancellations)
    admin = AdminClient(topics.kafka.client_config())  # kept until the future settles: it dies with its client
    configs = admin.describe_configs([resource])[resource].result(timeout=30)
    assert configs["cleanup.policy"].value == "compact,delete"


def test_cancel_answers_cancelled_already_finished_or_no_result_yet(topics):
    producer = Producer(topics.kafka.client_config())
    for request_id, status in (("req-done", "SUCCEEDED"), ("req-gone", "CANCELLED")):
        result = ImageResult(event_id=f"e-{request_id}", request_id=request_id, status=status, user_id="u", model="m")
        producer.produce(topics.topics.results, Codec().encode(result), request_id.encode())
    assert producer.flush(30) == 0
    env, runner = topics.to_env(), CliRunner()

    unknown = runner.invoke(main, ["cancel", "req-unknown", "--wait", "1", "--reason", "changed my mind"], env=env)
    assert unknown.exit_code == 0, unknown.output
    assert unknown.stdout.startswith("req-unknown: cancellation published; no result yet after 1")
    done = runner.invoke(main, ["cancel", "req-done", "--wait", "0"], env=env)
    assert done.exit_code == 1, done.output
    assert done.stdout == "req-done: already finished: SUCCEEDED; the cancellation changed nothing\n"
    gone = runner.invoke(main, ["cancel", "req-gone"], env=env)
    assert gone.exit_code == 0, gone.output
    assert gone.stdout == "req-gone: CANCELLED\n"

    ids = ["req-unknown", "req-done", "req-gone"]
    cancellations = collect(topics.kafka, topics.topics.cancellations, Cancellation, ids, timeout_s=30).latest()
    assert sorted(cancellations) == sorted(ids)
    unknown_one = cancellations["req-unknown"]
    assert (unknown_one.reason, unknown_one.requested_by) == ("changed my mind", "cli")


# -- the gateway ------------------------------------------------------------------------------------------------
@pytest.fixture
def lone_gateway(topics, tmp_path):
    """A gateway with no worker behind it: no call gets its answer."""
    registry = tmp_path / "registry.json"
    registry.write_text('{"tiny-sd": {"kind": "null"}}')  # the gateway reads names and kinds only
    settings = topics.updated(
        model_registry=str(registry),
        object_store_url=f"file://{tmp_path / 'objects'}",
        gateway_port=free_port(),
        gateway_keys_file=str(tmp_path / "keys.json"),
        gateway_instance_id=f"test-{uuid.uuid4().hex[:8]}",
        gateway_default_size="64x64",
    )
    key, entry = KeyStore(settings.gateway.keys_file).create("acme", requests_per_minute=600, burst=100)
    gateway = Gateway(settings, tmp_path / "gateway.log").start()
    try:
        yield settings, gateway, key, entry.key_id
    finally:
        gateway.process.stop()


def test_the_gateway_cancels_the_request_of_a_caller_that_leaves_unless_it_carried_an_idempotency_key(lone_gateway):
    settings, gateway, key, key_id = lone_gateway
    url, auth = f"{gateway.url}/images/generations", {"Authorization": f"Bearer {key}"}
    # Each caller gives up after 2 s (its client-side timeout closes the connection).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={"prompt": "a fox"}, headers=auth, timeout=2)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={"prompt": "a kept fox"}, headers=auth | {"Idempotency-Key": "keep-1"}, timeout=2)
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream(
            "POST", url, json={"prompt": "a streamed fox", "stream": True, "partial_images": 1}, headers=auth, timeout=2
        ) as stream,
    ):
        stream.read()

    requests = read_all(settings.kafka, settings.topics.requests, ImageRequest, 3, timeout_s=30)
    by_prompt = {request.prompt: request.request_id for request in requests}
    assert sorted(by_prompt) == ["a fox", "a kept fox", "a streamed fox"]
    assert by_prompt["a kept fox"] == request_id_for(key_id, "keep-1")
    # Three would come if the idempotent call were cancelled too: waited for, so its absence means something.
    cancellations = read_all(settings.kafka, settings.topics.cancellations, Cancellation, 3, timeout_s=10)
    assert sorted(c.request_id for c in cancellations) == sorted([by_prompt["a fox"], by_prompt["a streamed fox"]])
    instance = settings.gateway.instance_id
    assert {(c.reason, c.requested_by) for c in cancellations} == {
        ("the caller left before its answer", f"gateway:{instance}")
    }


# -- a worker that honours cancellations --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker(servers, tmp_path_factory):
    """A worker running moderation and generation on tiny Stable Diffusion, on topics of this module's own."""
    tmp = tmp_path_factory.mktemp("cancellation")
    settings = with_own_topics(servers).updated(
        model_registry=str(build_tiny_models(tmp / "models")),
        consumer_group=f"cancel-{uuid.uuid4().hex[:8]}",
        object_store_url=f"file://{tmp / 'objects'}",
        topic_partitions=2,
        take_events=4,
        max_wait_ms=50,
    )
    ensure_topics(settings.kafka, settings.topics)
    with WorkerProcess(settings, ["moderation", "generate"], tmp / "worker.log") as process:
        yield settings, process


def test_a_request_cancelled_before_its_render_ends_cancelled_without_device_time(worker):
    settings, process = worker
    queued = new_request(prompt="a queued fox", model="tiny-sd", user_id="u", width=64, height=64, steps=2)
    kept = new_request(prompt="a kept fox", model="tiny-sd", user_id="u", width=64, height=64, steps=2)
    with Publisher(settings) as publisher:
        publisher.publish_cancellation(queued.request_id, "changed my mind").result(timeout=30)
        time.sleep(2)  # the workers' global table has read it by now, whether they started or run already
        for request in (queued, kept):
            publisher.publish(request).result(timeout=30)
        ids = [queued.request_id, kept.request_id]
        results = collect(settings.kafka, settings.topics.results, ImageResult, ids, timeout_s=300)
        assert not results.missing, process.log_tail()
        statuses = {rid: r.status for rid, r in results.latest().items()}
        assert statuses == {queued.request_id: "CANCELLED", kept.request_id: "SUCCEEDED"}, process.log_tail()
        metrics = collect(settings.kafka, settings.topics.metrics, StageMetric, {queued.request_id: 2}, timeout_s=60)
        render = next(m for m in metrics.events[queued.request_id] if m.stage == "GENERATE")
        assert (render.outcome, render.device_seconds, render.device_seconds_saved) == ("CANCELLED", 0.0, None)
        # Cancelled again, it says so; the other had finished.
        assert publisher.cancel(queued.request_id, wait_s=5).cancelled
        assert publisher.cancel(kept.request_id, wait_s=5).finished_before


def test_a_lone_request_cancelled_while_it_renders_stops_part_way(worker):
    settings, process = worker
    replies = f"{settings.topics.reply_prefix}cancel-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.kafka, settings.topics, [replies], partitions=1)
    # 150 steps of a tiny model: seconds on a CPU. Its first preview (after step 37) says it renders.
    slow = new_request(
        prompt="a slow fox", model="tiny-sd", user_id="u2", width=64, height=64, steps=150, reply_topic=replies
    )
    with Publisher(settings) as publisher:
        publisher.publish(slow, headers={PARTIAL_IMAGES_HEADER: b"3"}).result(timeout=30)
        assert first_preview(settings.kafka, replies, timeout_s=300), process.log_tail()
        outcome = publisher.cancel(slow.request_id, reason="too slow", wait_s=120)
    assert outcome.cancelled, (str(outcome), process.log_tail())
    assert outcome.result is not None and outcome.result.error_message.startswith(
        "cancelled while rendering: stopped after"
    )
    metrics = collect(settings.kafka, settings.topics.metrics, StageMetric, {slow.request_id: 2}, timeout_s=60)
    render = next(m for m in metrics.events[slow.request_id] if m.stage == "GENERATE")
    assert render.outcome == "CANCELLED" and render.device_seconds > 0
    assert render.device_seconds_saved is not None and render.device_seconds_saved > 0


def first_preview(kafka: KafkaSettings, topic: str, timeout_s: float) -> bool:
    consumer = Consumer(kafka.client_config() | {"group.id": f"test-{uuid.uuid4()}", "enable.auto.commit": False})
    assign_from_start(consumer, topic)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for message in consumer.consume(10, timeout=0.2):
                if not message.error() and PREVIEW_HEADER in dict(message.headers() or ()):
                    return True
    finally:
        consumer.close()
    return False
