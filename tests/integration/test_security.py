"""Credentials reach every Kafka client (SDK, workers, readers) and never the logs or dead letters."""

import dataclasses
import json
import os
import secrets
import subprocess
import sys
import uuid

import pytest

from pixelpipe.core.events import DeadLetter, ImageResult
from pixelpipe.core.settings import Settings, section_from_env
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import DeliveryError, Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.tools.processes import WorkerProcess
from pixelpipe.tools.stack import StackSettings
from pixelpipe.tools.stack.services import LOCAL_KAFKA_PASSWORD, LOCAL_KAFKA_USER, Kafka
from tests.conftest import free_kafka_port, with_own_topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory):
    """A broker of this module's own whose second listener demands SASL/PLAIN."""
    stack_settings = dataclasses.replace(
        section_from_env(StackSettings, os.environ),
        dir=str(tmp_path_factory.mktemp("sasl")),
        kafka_port=free_kafka_port(),
    )
    broker = Kafka(stack_settings)
    broker.start()
    yield broker
    broker.stop()


def sasl_settings(broker, password=LOCAL_KAFKA_PASSWORD):
    suffix = uuid.uuid4().hex[:8]
    settings = Settings().updated(
        kafka_bootstrap=broker.sasl_endpoint,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username=LOCAL_KAFKA_USER,
        kafka_sasl_password=password,
        consumer_group=f"sasl-{suffix}",
        moderation_stamp_key=secrets.token_hex(32),
    )
    return with_own_topics(settings, suffix).updated(topic_partitions=2)


def test_a_wrong_password_is_refused(sasl_kafka):
    settings = sasl_settings(sasl_kafka, password="not-the-password")
    with Publisher(settings, **{"message.timeout.ms": 5000}) as publisher:
        pending = publisher.publish(new_request(prompt="x", model="m", user_id="u"))
        with pytest.raises(DeliveryError):
            pending.result(timeout=30)


def test_sdk_worker_and_reader_authenticate_and_keep_the_secret_out_of_logs(sasl_kafka, tmp_path):
    settings = sasl_settings(sasl_kafka)
    ensure_topics(settings.kafka, settings.topics)
    rejected = new_request(prompt="a gory massacre", model="tiny-sd", user_id="u1")
    with WorkerProcess(settings, ["moderation"], tmp_path / "worker.log") as worker:
        with Publisher(settings) as publisher:
            publisher.publish(rejected).result(timeout=30)
            publisher.publish_encoded(b"bad-1", b"garbage").result(timeout=30)
        results = collect(
            settings.kafka, settings.topics.results, ImageResult, [rejected.request_id, "bad-1"], timeout_s=180
        )
        assert not results.missing, worker.log_tail()
        letters = collect(settings.kafka, settings.topics.dead_letter, DeadLetter, ["bad-1"], timeout_s=30)
    assert results.latest()[rejected.request_id].status == "REJECTED"
    assert not letters.missing
    assert LOCAL_KAFKA_PASSWORD.encode() not in repr(letters.latest()["bad-1"]).encode()
    assert LOCAL_KAFKA_PASSWORD not in worker.log_path.read_text()
    shown = subprocess.run(
        [sys.executable, "-m", "pixelpipe", "config"],
        env=os.environ | settings.to_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["kafka"]["sasl_password"] == "***" and LOCAL_KAFKA_PASSWORD not in shown.stdout
