"""Kafka ACLs on the local stack (PIXELPIPE_STACK_KAFKA_ACLS=1): each role's principal may use its own topics only."""

import dataclasses
import os
import uuid

import pytest

from pixelpipe.core.events import ImageResult
from pixelpipe.core.settings import Settings, section_from_env
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import DeliveryError, Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.tools.model_builders import build_tiny_models
from pixelpipe.tools.processes import WorkerProcess
from pixelpipe.tools.stack import StackSettings
from pixelpipe.tools.stack.services import Kafka
from tests.conftest import free_kafka_port, with_own_topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def acl_kafka(tmp_path_factory):
    """A broker of this module's own that authorises every request by ACLs."""
    stack_settings = dataclasses.replace(
        section_from_env(StackSettings, os.environ),
        dir=str(tmp_path_factory.mktemp("acls")),
        kafka_port=free_kafka_port(),
        kafka_acls=1,
    )
    broker = Kafka(stack_settings)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def admin(acl_kafka, tmp_path):
    """The super user's settings, with topics of this test's own, created, and each role granted its ACLs."""
    suffix = uuid.uuid4().hex[:8]
    settings = Settings.from_env(acl_kafka.sasl_env()).updated(
        consumer_group=f"acls-{suffix}",
        object_store_url=f"file://{tmp_path / 'objects'}",
        moderation_stamp_key=uuid.uuid4().hex,
    )
    settings = with_own_topics(settings, suffix).updated(topic_partitions=2)
    ensure_topics(settings.kafka, settings.topics)
    acl_kafka.grant_roles(settings.topics, settings.stages.consumer_group, settings.sink.group_id)
    return settings


def as_user(broker, settings, user):
    return Settings.from_env(settings.to_env() | broker.sasl_env(user))


def send(settings, topic):
    """Publish one request to ``topic``; None when the broker acknowledged it, else the delivery error."""
    with Publisher(settings, **{"message.timeout.ms": 10000}) as publisher:
        try:
            publisher.publish(new_request(prompt="a fox", model="tiny-sd", user_id="u"), topic).result(timeout=30)
        except DeliveryError as e:
            return str(e)
    return None


def test_each_role_writes_only_its_own_topics(acl_kafka, admin):
    topics = admin.topics
    publisher, renderer = as_user(acl_kafka, admin, "publisher"), as_user(acl_kafka, admin, "renderer")
    assert send(publisher, topics.requests) is None
    assert "TOPIC_AUTHORIZATION_FAILED" in send(publisher, topics.generate)
    assert "TOPIC_AUTHORIZATION_FAILED" in send(renderer, topics.requests)
    assert "TOPIC_AUTHORIZATION_FAILED" in send(renderer, topics.edit)
    assert "TOPIC_AUTHORIZATION_FAILED" in send(renderer, topics.generate_long)
    assert send(as_user(acl_kafka, admin, "moderation"), topics.generate) is None
    assert send(as_user(acl_kafka, admin, "moderation"), topics.edit_long) is None
    anonymous = admin.updated(  # the PLAINTEXT listener: no user, so no right at all
        kafka_bootstrap=acl_kafka.endpoint, kafka_security_protocol="PLAINTEXT", kafka_sasl_mechanism=""
    )
    assert "TOPIC_AUTHORIZATION_FAILED" in send(anonymous, topics.requests)


def test_the_pipeline_runs_with_each_stage_as_its_own_principal(acl_kafka, admin, tmp_path):
    registry = build_tiny_models(tmp_path / "models")
    # Over 0.01 device seconds a request takes the long lane: the renderer reads that topic too.
    settings = admin.updated(model_registry=str(registry), max_wait_ms=100, long_request_compute=0.01)
    good = new_request(prompt="a fox", model="tiny-sd", user_id="u", width=64, height=64, steps=2)
    long = new_request(prompt="a slow fox", model="tiny-sd", user_id="u", width=64, height=64, steps=3)
    rejected = new_request(prompt="a gory massacre", model="tiny-sd", user_id="u", width=64, height=64, steps=2)
    moderation = as_user(acl_kafka, settings, "moderation")
    renderer = as_user(acl_kafka, settings, "renderer")
    with (
        WorkerProcess(moderation, ["moderation"], tmp_path / "moderation.log") as moderating,
        WorkerProcess(renderer, ["generate"], tmp_path / "generate.log") as rendering,
    ):
        with Publisher(as_user(acl_kafka, settings, "publisher")) as publisher:
            for request in (good, rejected, long):
                publisher.publish(request).result(timeout=30)
        ids = [good.request_id, rejected.request_id, long.request_id]
        results = collect(settings.kafka, settings.topics.results, ImageResult, ids, timeout_s=300)
        assert not results.missing, moderating.log_tail() + "\n---\n" + rendering.log_tail()
    statuses = {rid: r.status for rid, r in results.latest().items()}
    assert statuses == {good.request_id: "SUCCEEDED", rejected.request_id: "REJECTED", long.request_id: "SUCCEEDED"}
