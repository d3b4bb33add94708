"""The producer SDK and CLI against the real broker."""

import datetime as dt
import json
import subprocess
import sys
import uuid

import pytest
from confluent_kafka import Consumer

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageRequest
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import DeliveryError, InvalidRequestError, Publisher, new_request
from pixelpipe.producers.load import SyntheticLoad, publish_all

pytestmark = pytest.mark.integration


def consume_all(settings, topic, expected, timeout_s=60):
    consumer = Consumer(
        settings.kafka.client_config()
        | {"group.id": f"test-{uuid.uuid4()}", "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )
    consumer.subscribe([topic])
    messages = []
    deadline = dt.datetime.now() + dt.timedelta(seconds=timeout_s)
    try:
        while len(messages) < expected and dt.datetime.now() < deadline:
            for message in consumer.consume(1000, timeout=1.0):
                assert message.error() is None, message.error()
                messages.append(message)
    finally:
        consumer.close()
    return messages


def test_thousand_requests_round_trip_through_the_broker(topic_settings):
    settings = topic_settings.updated(topic_partitions=4)
    topic = settings.topics.requests
    assert ensure_topics(settings.kafka, settings.topics, [topic]) == [topic]
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    sent = []
    for i, request in enumerate(SyntheticLoad(count=1000, source_uris=("s3://pixelpipe/in/0.png",), seed=7)):
        request.deadline = deadline.replace(microsecond=0) if i % 3 == 0 else None
        request.negative_prompt = f"blurry {i}" if i % 2 else None
        request.reply_topic = "pixelpipe.replies.svc" if i % 5 == 0 else None
        sent.append(request)
    with Publisher(settings) as publisher:
        report = publish_all(publisher, sent, progress=False)
    assert (report.sent, report.acknowledged, report.failed, report.invalid) == (1000, 1000, [], [])
    assert {d.partition for d in report.deliveries} == {0, 1, 2, 3}

    messages = consume_all(settings, topic, 1000)
    codec = codec_from_settings(settings.kafka)
    received = {}
    for message in messages:
        record = codec.decode_as(ImageRequest, message.value())
        assert message.key() == record.request_id.encode()
        received[record.request_id] = record
    assert len(messages) == 1000
    assert received == {r.request_id: r for r in sent}
    assert {r.kind for r in sent} == {"GENERATE", "EDIT"}


def test_bad_requests_are_refused_before_anything_is_sent(topic_settings):
    ensure_topics(topic_settings.kafka, topic_settings.topics, [topic_settings.topics.requests])
    with Publisher(topic_settings) as publisher:
        with pytest.raises(InvalidRequestError, match="n: must be between 1 and 10"):
            publisher.publish(new_request(prompt="x", model="m", user_id="u", n=12))
        with pytest.raises(InvalidRequestError, match=r"reply_topic: must start with 'pixelpipe\.replies\.'"):
            publisher.publish(
                new_request(prompt="x", model="m", user_id="u", reply_topic=topic_settings.topics.results)
            )
        good = publisher.publish(new_request(prompt="x", model="m", user_id="u")).result(timeout=30)
    messages = consume_all(topic_settings, topic_settings.topics.requests, 2, timeout_s=5)
    assert [(m.partition(), m.offset()) for m in messages] == [(good.partition, good.offset)]


def test_publish_cli_reports_refused_lines_and_counts_acknowledged(topic_settings, tmp_path):
    ensure_topics(topic_settings.kafka, topic_settings.topics, [topic_settings.topics.requests])
    lines = [
        {"prompt": "a red fox", "model": "tiny-sd", "user_id": "u1"},
        {"prompt": "", "model": "tiny-sd", "user_id": "u2"},
        {"prompt": "an edit", "model": "tiny-sd", "user_id": "u3", "kind": "EDIT"},
        {"prompt": "late", "model": "tiny-sd", "user_id": "u4", "deadline": "2001-01-01T00:00:00+00:00"},
        {"prompt": "typo", "modell": "tiny-sd", "user_id": "u5"},
        {"prompt": "ok too", "model": "tiny-sd", "user_id": "u6", "width": 128, "height": 64},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    env = {**topic_env(topic_settings), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pixelpipe", "publish", str(path), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "sent=2 acknowledged=2 failed=0 invalid=5" in done.stdout
    assert "prompt: must not be empty" in done.stderr
    assert "source_image_uri: is required for an EDIT request" in done.stderr
    assert "deadline: is in the past" in done.stderr
    assert "requests.jsonl:5: new_request() got an unexpected keyword argument 'modell'" in done.stderr
    assert "requests.jsonl:7:" in done.stderr
    assert len(consume_all(topic_settings, topic_settings.topics.requests, 2)) == 2


def test_publish_cli_synthetic_load(topic_settings):
    ensure_topics(topic_settings.kafka, topic_settings.topics, [topic_settings.topics.requests])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pixelpipe",
            "publish",
            "--synthetic",
            "300",
            "--rate",
            "1000",
            "--experiment",
            "steps=fast,slow",
            "--source-uri",
            "s3://pixelpipe/in/0.png",
        ],
        capture_output=True,
        text=True,
        env=topic_env(topic_settings),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "sent=300 acknowledged=300 failed=0 invalid=0" in done.stdout
    assert "acknowledged: 100%" in done.stderr  # the progress bar
    codec = codec_from_settings(topic_settings.kafka)
    records = [
        codec.decode_as(ImageRequest, m.value())
        for m in consume_all(topic_settings, topic_settings.topics.requests, 300)
    ]
    assert len(records) == 300
    assert {r.experiments["steps"] for r in records} == {"fast", "slow"}


def topic_env(settings):
    import os

    return os.environ | {
        "PIXELPIPE_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "PIXELPIPE_TOPIC_REQUESTS": settings.topics.requests,
    }


def test_delivery_failures_are_surfaced_to_the_caller(topic_settings):
    # The topic does not exist and the broker does not auto-create: the delivery report must carry the error.
    with Publisher(topic_settings, **{"message.timeout.ms": 3000}) as publisher:
        pending = publisher.publish(new_request(prompt="x", model="m", user_id="u"))
        with pytest.raises(DeliveryError, match="delivery failed"):
            pending.result(timeout=30)
    assert pending.done()
