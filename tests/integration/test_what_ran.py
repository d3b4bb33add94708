"""Through a worker and the sink into ClickHouse: the wire format follows PIXELPIPE_SCHEMA_REGISTRY_URL, the final
parameters are validated after experiment overrides, and the results carry what actually ran."""

import contextlib
import datetime as dt
import json
import uuid

import pytest
from confluent_kafka import Consumer

from pixelpipe.core.clickhouse import ServerClient
from pixelpipe.core.events import ImageResult
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.sinks.clickhouse.migrate import migrate
from pixelpipe.tools.model_builders import build_tiny_models
from pixelpipe.tools.processes import PixelpipeProcess, WorkerProcess
from tests.schema_registry import schema_registry

pytestmark = pytest.mark.integration

EXPERIMENT = {
    "key": "steps-test",
    "start": "2026-01-01",
    "variants": [
        {"name": "control", "weight": 1},
        {"name": "fast", "weight": 1, "overrides": {"steps": 2, "scheduler": "euler"}},
        {"name": "huge", "weight": 1, "overrides": {"steps": 10_000}},
    ],
}


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("models"))


def raw_values(settings, topic, count, timeout_s=60.0):
    """The first ``count`` raw message values on ``topic``, as the broker holds them."""
    consumer = Consumer(
        settings.kafka.client_config()
        | {"group.id": f"raw-{uuid.uuid4()}", "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = dt.datetime.now() + dt.timedelta(seconds=timeout_s)
    try:
        while len(values) < count and dt.datetime.now() < deadline:
            values += [m.value() for m in consumer.consume(100, timeout=0.5) if not m.error()]
    finally:
        consumer.close()
    return values


@pytest.mark.parametrize("framing", ["schema-registry", "single-object"])
def test_a_worker_and_the_sink_follow_the_wire_format_and_record_what_ran(
    framing, topic_settings, tiny_registry, clickhouse_url, tmp_path
):
    experiments_file = tmp_path / "experiments.json"
    experiments_file.write_text(json.dumps({"experiments": [EXPERIMENT]}))
    with schema_registry() if framing == "schema-registry" else contextlib.nullcontext() as registry:
        settings = topic_settings.updated(
            schema_registry_url=registry.url if registry else "",
            model_registry=str(tiny_registry),
            experiments_file=str(experiments_file),
            clickhouse_url=clickhouse_url,
            consumer_group=f"test-{uuid.uuid4().hex[:8]}",
            sink_group_id=f"sink-{uuid.uuid4().hex[:8]}",
            topic_partitions=2,
            max_batch=4,
            max_wait_ms=200,
        )
        ensure_topics(settings.kafka, settings.topics)
        migrate(settings.clickhouse.url)
        variants = ("control", "fast", "huge")
        requests = [
            new_request(
                prompt=f"a lighthouse {i}",
                model="tiny-sd",
                user_id=f"user-{i}",
                width=64,
                height=64,
                seed=i,
                experiments={"steps-test": variants[i % 3]},
            )
            for i in range(9)
        ]
        with Publisher(settings, experiments={}) as publisher:
            for request in requests:
                publisher.publish(request).result(timeout=30)
        with WorkerProcess(settings, ["moderation", "generate"], tmp_path / "worker.log") as worker:
            results = collect(settings.kafka, settings.topics.results, ImageResult, [r.request_id for r in requests])
            assert not results.missing, worker.log_tail()
        sink = PixelpipeProcess(settings, ["clickhouse", "sink", "--max-idle", "3"], tmp_path / "sink.log")
        assert sink.process.wait(120) == 0, sink.log_tail()

        # The wire format of everything the worker and the SDK wrote.
        magic = b"\x00" if registry else b"\xc3\x01"
        for topic in (settings.topics.requests, settings.topics.results, settings.topics.metrics):
            values = raw_values(settings, topic, len(requests))
            assert len(values) >= len(requests)
            assert all(value.startswith(magic) for value in values), topic
        if registry:
            assert set(registry.subjects) >= {"pixelpipe.v1.ImageRequest", "pixelpipe.v1.ImageResult"}
            assert "pixelpipe.v1.StageMetric" in registry.subjects

    # What ran, read back from ClickHouse by variant.
    columns = "status, error_code, error_message, model, steps, guidance, scheduler, width, height, seed, batch_size"
    client = ServerClient(clickhouse_url)
    try:
        rows = client.execute(
            f"SELECT experiment_variants[1], {columns.replace('status', 'toString(status)', 1)}"
            " FROM results_dedup ORDER BY seed"
        )
    finally:
        client.close()
    by_variant: dict[str, list[dict]] = {}
    for variant, *values in rows:
        by_variant.setdefault(variant, []).append(dict(zip(columns.split(", "), values, strict=True)))
    assert sum(len(v) for v in by_variant.values()) == len(requests)
    for row in by_variant["huge"]:
        assert (row["status"], row["error_code"]) == ("FAILED", "INVALID_REQUEST")
        assert row["error_message"].startswith(
            "steps: must be between 1 and 150, got 10000 (set by experiment steps-test"
        )
        assert row["steps"] is None and row["batch_size"] is None
    for variant, steps, scheduler in (("control", 4, "ddim"), ("fast", 2, "euler")):
        for row in by_variant[variant]:
            assert (row["status"], row["error_code"], row["model"]) == ("SUCCEEDED", None, "tiny-sd")
            assert (row["steps"], row["scheduler"], row["width"], row["height"]) == (steps, scheduler, 64, 64)
            assert row["guidance"] == 5.0  # the tiny model's default
            assert 1 <= row["batch_size"] <= 4 and row["seed"] is not None
