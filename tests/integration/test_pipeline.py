"""The stages end to end: real broker, real S3 endpoint, tiny diffusers models, real moderation models."""

import datetime as dt
import hashlib
import io
import os
import re
import time
import uuid

import numpy as np
import pytest
from confluent_kafka import Producer
from PIL import Image

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import DeadLetter, ImageResult, StageMetric
from pixelpipe.core.objects import open_object_store
from pixelpipe.core.topics import ensure_topics, partition_count, user_partition
from pixelpipe.producers import InvalidRequestError, Publisher, new_request
from pixelpipe.producers.load import publish_all
from pixelpipe.producers.publisher import producer_config
from pixelpipe.producers.results import collect
from pixelpipe.tools.model_builders import build_tiny_models
from pixelpipe.tools.processes import WorkerProcess

pytestmark = pytest.mark.integration
STAGES = ("moderation", "generate", "edit")


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def pipeline(topic_settings, tiny_registry):
    settings = topic_settings.updated(
        model_registry=str(tiny_registry),
        consumer_group=f"test-{uuid.uuid4().hex[:8]}",
        object_store_url=f"{topic_settings.objects.url.rstrip('/')}/{uuid.uuid4().hex[:8]}",
        topic_partitions=4,
        max_batch=4,
        take_events=4,
        max_wait_ms=100,
    )
    ensure_topics(settings.kafka, settings.topics)
    return settings


def png(width, height, seed, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def mask_png(width, height):
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


def publish(settings, requests):
    """Publish through the SDK; requests it refuses go encoded as they are, to test the processors' own checks."""
    codec = codec_from_settings(settings.kafka)
    with Publisher(settings) as publisher:
        pending = []
        for request in requests:
            try:
                pending.append(publisher.publish(request))
            except InvalidRequestError:  # what a producer without the SDK could still send
                key, value = request.request_id.encode(), codec.encode(request)
                pending.append(publisher.publish_encoded(key, value))
        for p in pending:
            p.result(timeout=30)


def test_sixty_mixed_requests_end_in_sixty_right_results(pipeline, tmp_path):
    store = open_object_store(pipeline.objects)
    source = store.put("inputs/source.png", png(64, 64, 1), "image/png").uri
    mask = store.put("inputs/mask.png", mask_png(64, 64), "image/png").uri
    small_mask = store.put("inputs/small-mask.png", mask_png(32, 32), "image/png").uri
    base = {"model": "tiny-sd", "width": 64, "height": 64, "steps": 2}
    expected: dict[str, tuple[str, str | None]] = {}  # request id -> (status, error code)
    stages: dict[str, set[str]] = {}
    requests = []

    def add(status, code, passed, **fields):
        request = new_request(**(base | {"user_id": f"user-{len(requests) % 7}"} | fields))
        requests.append(request)
        expected[request.request_id] = (status, code)
        stages[request.request_id] = passed

    ok_generate = {"MODERATION", "GENERATE", "OUTPUT_MODERATION"}
    ok_edit = {"MODERATION", "EDIT", "OUTPUT_MODERATION"}
    for i in range(25):
        add(
            "SUCCEEDED",
            None,
            ok_generate,
            prompt=f"a lighthouse {i}",
            seed=i,
            n=1 + i % 3,
            priority="INTERACTIVE" if i % 4 == 0 else "BATCH",
        )
    for _ in range(2):  # the same seed and parameters as request 5: identical bytes
        add("SUCCEEDED", None, ok_generate, prompt="a lighthouse 5", seed=5, n=3)
    add("SUCCEEDED", None, ok_generate, prompt="a square", model="tiny-sd-b", width=128, height=64, seed=3)
    for i in range(10):
        add(
            "SUCCEEDED",
            None,
            ok_edit,
            kind="EDIT",
            prompt=f"make it blue {i}",
            source_image_uri=source,
            strength=0.6,
            seed=100 + i,
            n=1 + i % 2,
        )
    for i in range(8):
        add(
            "SUCCEEDED",
            None,
            ok_edit,
            kind="EDIT",
            prompt=f"fill the middle {i}",
            source_image_uri=source,
            mask_uri=mask,
            strength=0.9,
            seed=200 + i,
        )
    for prompt in ("a gory massacre", "how to make fentanyl", "nazi rally poster", "suicide note"):
        add("REJECTED", "MODERATION_REJECTED", {"MODERATION"}, prompt=prompt)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    for i in range(4):
        add("FAILED", "DEADLINE_EXCEEDED", {"MODERATION"}, prompt=f"too late {i}", deadline=past.replace(microsecond=0))
    for uri in ("http://example.com/cat.png", "s3://other-bucket/cat.png", f"{source}/../../etc/passwd"):
        add("FAILED", "INVALID_SOURCE", {"MODERATION"}, kind="EDIT", prompt="edit this", source_image_uri=uri)
    add(
        "FAILED",
        "INVALID_SOURCE",
        {"MODERATION"},
        kind="EDIT",
        prompt="bad mask",
        source_image_uri=source,
        mask_uri=small_mask,
    )
    add("FAILED", "MODEL_ERROR", {"MODERATION", "GENERATE"}, prompt="no such model", model="sd-99")
    add("FAILED", "INVALID_REQUEST", set(), prompt="too many steps", steps=10_000)
    assert len(requests) == 60

    with WorkerProcess(pipeline, STAGES, tmp_path / "worker.log") as worker:
        publish(pipeline, requests)
        results = collect(
            pipeline.kafka, pipeline.topics.results, ImageResult, list(expected), timeout_s=300, settle_s=3
        )
        missing = sorted(r.prompt for r in requests if r.request_id in results.missing)
        assert not missing, f"no result for {missing}\n{worker.log_tail()}"
    assert {rid: len(events) for rid, events in results.events.items() if len(events) != 1} == {}
    latest = results.latest()
    assert {rid: (r.status, r.error_code) for rid, r in latest.items()} == expected

    by_id = {r.request_id: r for r in requests}
    for rid, result in latest.items():
        request = by_id[rid]
        if result.status != "SUCCEEDED":
            assert result.images == []
            continue
        assert len(result.images) == request.n
        for image in result.images:
            data = store.get(image.uri)
            assert hashlib.sha256(data).hexdigest() == image.sha256 and len(data) == image.bytes
            decoded = Image.open(io.BytesIO(data))
            assert decoded.format == "PNG" and decoded.size == (request.width, request.height)
            assert (image.width, image.height) == decoded.size
    same_seed = [latest[r.request_id] for r in requests if r.prompt == "a lighthouse 5"]
    assert len(same_seed) == 3
    assert len({tuple(i.sha256 for i in r.images) for r in same_seed}) == 1
    assert len({i.sha256 for i in same_seed[0].images}) == 3  # but the n images differ from each other
    rejected = [r for r in latest.values() if r.status == "REJECTED"]
    assert all(r.moderation_stage == "PROMPT" for r in rejected)
    assert {s.category for r in rejected for s in r.moderation_scores if s.score >= 0.5} >= {
        "violence",
        "illicit",
        "hate",
        "self-harm",
    }

    metrics = collect(
        pipeline.kafka,
        pipeline.topics.metrics,
        StageMetric,
        {rid: len(s) for rid, s in stages.items() if s},
        timeout_s=60,
        settle_s=2,
    )
    for rid, passed in stages.items():
        seen = {m.stage for m in metrics.events.get(rid, [])}
        assert seen == passed, (rid, by_id[rid].prompt, seen, passed)
    generate = [m for events in metrics.events.values() for m in events if m.stage == "GENERATE" and m.outcome == "OK"]
    assert max(m.batch_size for m in generate) > 1  # compatible requests were batched
    assert all(m.device_seconds >= 0 and m.cost_usd >= 0 and m.compute_ms > 0 for m in generate)


def publish_stamped(settings, requests, stamps_ms):
    """Publish as a producer that sets each record's timestamp itself, which the SDK leaves to librdkafka; it places
    each request on its user's partition as the SDK does (a request placed elsewhere is moved, and counted at the
    broker's time of the move: tests/integration/test_user_limits.py)."""
    codec = codec_from_settings(settings.kafka)
    producer = Producer(producer_config(settings.kafka))
    partitions = partition_count(settings.kafka, settings.topics.requests)
    errors = []
    for request, stamp_ms in zip(requests, stamps_ms, strict=True):
        value, key = codec.encode(request), request.request_id.encode()
        producer.produce(
            settings.topics.requests,
            value,
            key,
            user_partition(request.user_id, partitions),
            timestamp=stamp_ms,
            on_delivery=lambda e, _: errors.append(e),
        )
    assert producer.flush(30) == 0 and errors == [None] * len(requests)


def test_malformed_messages_go_to_the_dead_letter_topic_and_the_stream_flows_on(pipeline, tmp_path):
    good = new_request(prompt="a fox", model="tiny-sd", user_id="u1", width=64, height=64, steps=2)
    with WorkerProcess(pipeline, ["moderation", "generate"], tmp_path / "worker.log") as worker:
        with Publisher(pipeline) as publisher:
            publisher.publish_encoded(b"bad-0001", b"this is not avro").result(timeout=30)
            publisher.publish_encoded(b"bad-0002", b"\xc3\x01" + bytes(8) + b"x").result(timeout=30)
            publisher.publish(good).result(timeout=30)
        ids = ["bad-0001", "bad-0002", good.request_id]
        results = collect(pipeline.kafka, pipeline.topics.results, ImageResult, ids, timeout_s=240)
        assert not results.missing, worker.log_tail()
    latest = results.latest()
    assert latest[good.request_id].status == "SUCCEEDED"
    assert latest["bad-0001"].status == "FAILED" and latest["bad-0001"].error_code == "UNDECODABLE"
    assert latest["bad-0001"].kind is None
    letters = collect(pipeline.kafka, pipeline.topics.dead_letter, DeadLetter, ["bad-0001", "bad-0002"], timeout_s=30)
    assert not letters.missing
    first = letters.latest()["bad-0001"]
    assert first.original_value == b"this is not avro" and first.original_key == b"bad-0001"
    assert first.topic == pipeline.topics.requests and first.stage == "moderation"
    assert "not an Avro event: starts with 7468" in first.error_reason
    assert "matches no shipped schema" in letters.latest()["bad-0002"].error_reason


def test_poison_requests_on_every_input_topic_end_as_dead_letters_and_failures(pipeline, tmp_path):
    store = open_object_store(pipeline.objects)
    source = store.put("inputs/source.png", png(64, 64, 1), "image/png").uri
    codec = codec_from_settings(pipeline.kafka)
    base = {"model": "tiny-sd", "user_id": "u1", "width": 64, "height": 64, "steps": 2}
    topics = {
        "moderation": pipeline.topics.requests,
        "generate": pipeline.topics.generate,
        "edit": pipeline.topics.edit,
    }
    suffix = uuid.uuid4().hex[:8]
    poison = {}  # request id -> (stage, topic, bytes): valid Avro whose event_time (2**62 ms) is no datetime
    for stage, topic in topics.items():
        request = new_request(prompt=f"poison for {stage}", request_id=f"poison-{stage}-{suffix}", **base)
        poison[request.request_id] = (
            stage,
            topic,
            codec.encode_record("ImageRequest", request.to_avro() | {"event_time": 2**62}),
        )
    tombstone = f"tombstone-{suffix}"
    good = [
        new_request(prompt="a fox after the poison", **base),
        new_request(kind="EDIT", prompt="make it blue", source_image_uri=source, strength=0.6, **base),
    ]
    with WorkerProcess(pipeline, STAGES, tmp_path / "worker.log") as worker:
        with Publisher(pipeline) as publisher:
            for request_id, (_, topic, value) in poison.items():
                publisher.publish_encoded(request_id.encode(), value, topic).result(timeout=30)
            publisher.publish_encoded(tombstone.encode(), None).result(timeout=30)
        publish(pipeline, good)
        ids = [*poison, tombstone, *(r.request_id for r in good)]
        results = collect(pipeline.kafka, pipeline.topics.results, ImageResult, ids, timeout_s=240)
        assert not results.missing, worker.log_tail()
        letters = collect(pipeline.kafka, pipeline.topics.dead_letter, DeadLetter, [*poison, tombstone], timeout_s=30)
        assert not letters.missing, worker.log_tail()
    latest = results.latest()
    assert all(latest[r.request_id].status == "SUCCEEDED" for r in good)
    for request_id, (stage, topic, value) in poison.items():
        assert (latest[request_id].status, latest[request_id].error_code) == ("FAILED", "UNDECODABLE")
        letter = letters.latest()[request_id]
        assert (letter.stage, letter.topic, letter.original_value) == (stage, topic, value)
        assert "body does not decode (OverflowError" in letter.error_reason
    assert latest[tombstone].error_code == "UNDECODABLE"
    assert "expected bytes, got NoneType" in letters.latest()[tombstone].error_reason


def wait_for_partitions(worker, timeout_s=180.0):
    """Until ``worker`` logs a non-empty partition assignment: its start (models, moderation) takes a while, and a
    stream that ends before it joins proves nothing about sharing. Returns its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = worker.log_path.read_text(errors="replace")
        if re.search(r'"msg": "partitions assigned".*"partitions": \["', log):
            return log
        assert worker.process.poll() is None, worker.log_tail()
        time.sleep(1.0)
    raise AssertionError(f"the worker was assigned no partitions in {timeout_s:.0f}s\n{worker.log_tail()}")


def test_two_workers_share_partitions_and_give_one_result_per_request(pipeline, tmp_path):
    def batch(tag, count):
        return [
            new_request(prompt=f"{tag} {i}", model="tiny-sd", user_id=f"u{i}", width=64, height=64, steps=2, seed=i)
            for i in range(count)
        ]

    first, second = batch("first", 24), batch("second", 40)
    with WorkerProcess(pipeline, STAGES, tmp_path / "a.log") as a:
        publish(pipeline, first)
        early = collect(
            pipeline.kafka, pipeline.topics.results, ImageResult, [r.request_id for r in first][:4], timeout_s=240
        )
        assert not early.missing, a.log_tail()
        # b logs at INFO, so its partition assignment shows; it joins midway and the group rebalances.
        with WorkerProcess(pipeline.updated(log_level="INFO"), STAGES, tmp_path / "b.log") as b:
            log = wait_for_partitions(b)
            # Its stages were built (models loaded and warmed) before it joined: a rebalance never waits on them.
            assert log.index('"msg": "stages ready"') < log.index('"msg": "partitions assigned"'), b.log_tail()
            # A steady stream for ~25 s after b joined, so both workers take part of it.
            with Publisher(pipeline) as publisher:
                assert publish_all(publisher, second, rate=1.6, progress=False).acknowledged == len(second)
            ids = [r.request_id for r in first + second]
            results = collect(pipeline.kafka, pipeline.topics.results, ImageResult, ids, timeout_s=300, settle_s=5)
            assert not results.missing, a.log_tail() + "\n---\n" + b.log_tail()
    assert all(r.status == "SUCCEEDED" for r in results.latest().values())
    # Redelivery across the rebalance may repeat an event, never with another id: the sinks' dedup sees one.
    assert all(len({e.event_id for e in events}) == 1 for events in results.events.values())
    workers = collect(pipeline.kafka, pipeline.topics.metrics, StageMetric, dict.fromkeys(ids, 3), timeout_s=60)
    assert len({m.worker_id for events in workers.events.values() for m in events}) == 2


def test_a_user_flooding_the_topic_is_rate_limited_and_others_are_served(pipeline, tmp_path):
    settings = pipeline.updated(max_requests_per_user_per_minute=10)

    def request(user, i):
        return new_request(prompt=f"{user} {i}", model="tiny-sd", user_id=user, width=64, height=64, steps=2, seed=i)

    flood = [request("flooder", i) for i in range(40)]
    others = [request(f"user-{i}", i) for i in range(3)]
    # The flooder stamps its requests 6 s apart, its rate exactly, in the past: the broker's time counts instead.
    stamps_ms = [int((time.time() - 240) * 1000) + 6000 * i for i in range(len(flood))]
    with WorkerProcess(settings, ["moderation", "generate"], tmp_path / "worker.log") as worker:
        publish_stamped(settings, flood[:20], stamps_ms[:20])
        publish(settings, others)
        publish_stamped(settings, flood[20:], stamps_ms[20:])
        ids = [r.request_id for r in flood + others]
        results = collect(settings.kafka, settings.topics.results, ImageResult, ids, timeout_s=240)
        assert not results.missing, worker.log_tail()
    latest = results.latest()
    assert all(latest[r.request_id].status == "SUCCEEDED" for r in others)
    outcomes = [(latest[r.request_id].status, latest[r.request_id].error_code) for r in flood]
    assert outcomes.count(("SUCCEEDED", None)) == 10
    assert outcomes.count(("FAILED", "RATE_LIMITED")) == 30


def test_hostile_inputs_end_in_clear_failures_and_the_stream_flows_on(pipeline, tmp_path):
    pipeline = pipeline.updated(max_source_bytes=1024 * 1024)
    store = open_object_store(pipeline.objects)
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, format="PNG")  # 16 Mpx of zeros compress to a few KB
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, format="GIF")
    sources = {
        "bomb": store.put("inputs/bomb.png", bomb.getvalue(), "image/png").uri,
        "text": store.put("inputs/not-an-image.png", b"%PDF-1.4 definitely not a PNG", "image/png").uri,
        "gif": store.put("inputs/anim.gif", gif.getvalue(), "image/gif").uri,
        "missing": store.uri_for("inputs/never-written.png"),
        "huge": store.put("inputs/huge.png", os.urandom(3 * 1024 * 1024), "image/png").uri,
    }
    # Small, so each is refused for what it is, not first for its compute (512x512 on the tiny model's CPU fit is
    # over the default per-request budget).
    small = {"model": "tiny-sd", "user_id": "u", "width": 64, "height": 64, "steps": 2}
    edits = {
        name: new_request(kind="EDIT", prompt=name, source_image_uri=uri, **small) for name, uri in sources.items()
    }
    oversized = new_request(prompt="x" * 5000, **small)
    invisible = new_request(prompt="\u200b\u200d\ufeff", **small)
    laced = new_request(prompt="a g\u200bory massa\u200dcre", **small)
    good = new_request(prompt="a fox after all that", **small)
    valid = codec_from_settings(pipeline.kafka).encode(good)
    with WorkerProcess(pipeline, ["moderation", "generate"], tmp_path / "worker.log") as worker:
        with Publisher(pipeline) as publisher:
            publisher.publish_encoded(b"truncated-1", valid[: len(valid) // 2]).result(timeout=30)
        publish(pipeline, [*edits.values(), oversized, invisible, laced, good])
        ids = ["truncated-1", *(r.request_id for r in [*edits.values(), oversized, invisible, laced, good])]
        results = collect(pipeline.kafka, pipeline.topics.results, ImageResult, ids, timeout_s=240)
        assert not results.missing, worker.log_tail()
    latest = results.latest()
    failures = {
        name: (latest[r.request_id].error_code, latest[r.request_id].error_message) for name, r in edits.items()
    }
    assert failures["bomb"][0] == "INVALID_SOURCE" and "pixels" in failures["bomb"][1]
    assert failures["text"][0] == "INVALID_SOURCE"
    assert failures["gif"][0] == "INVALID_SOURCE" and "GIF" in failures["gif"][1]
    assert failures["missing"][0] == "INVALID_SOURCE"
    assert failures["huge"][0] == "INVALID_SOURCE" and "over the 1048576 accepted" in failures["huge"][1]
    assert latest[oversized.request_id].error_code == "INVALID_REQUEST"
    assert "prompt: must be at most 2000 characters" in latest[oversized.request_id].error_message
    assert latest["truncated-1"].error_code == "UNDECODABLE"
    assert "prompt: must not be empty" in latest[invisible.request_id].error_message
    assert (latest[laced.request_id].status, latest[laced.request_id].moderation_stage) == ("REJECTED", "PROMPT")
    assert latest[good.request_id].status == "SUCCEEDED"
