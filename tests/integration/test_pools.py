"""Model pools on the real servers: two pools with a render worker each (null models: a set time per image), one
moderation worker routing by the live pools table. Each model's requests render only in its pool (the GENERATE
metrics' worker ids say where), an experiment variant that moves users to the other model sends them to that
model's pool, a model no pool serves fails at once, and a pool added while requests flow takes its model's requests
within seconds, without a restart of anything else."""

import json
import threading
import time
import uuid

import pytest

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageResult, StageMetric
from pixelpipe.core.pools import apply_pools, parse_pools, read_pools
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.tools.processes import WorkerProcess

pytestmark = pytest.mark.integration
WAIT_S = 240.0
# Routing changes reach moderation through its global table: a bound for "within seconds", whatever the machine.
ROUTING_BOUND_S = 10.0


@pytest.fixture
def pooled(topic_settings, tmp_path):
    """Settings for this test's pipeline: three null models, an experiment moving users to the second, and the
    workers it starts (killed after it)."""
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({name: {"kind": "null", "seconds_per_image": 0.02} for name in ("a", "b", "c")}))
    experiments = tmp_path / "experiments.json"
    experiments.write_text(
        json.dumps(
            {
                "experiments": [
                    {
                        "key": "to-b",
                        "start": "2026-01-01",
                        "variants": [{"name": "control"}, {"name": "b", "overrides": {"model": "b"}}],
                    }
                ]
            }
        )
    )
    settings = topic_settings.updated(
        model_registry=str(registry),
        experiments_file=str(experiments),
        consumer_group=f"pools-{uuid.uuid4().hex[:8]}",
        object_store_url=f"file://{tmp_path / 'objects'}",
        image_detector="null",
        topic_partitions=2,
        max_wait_ms=50,
        log_level="INFO",
    )
    ensure_topics(settings.kafka, settings.topics)
    workers: list[WorkerProcess] = []

    def start(name, stages, pool="default"):
        worker = WorkerProcess(settings.updated(worker_id=name, pool=pool), stages, tmp_path / f"{name}.log")
        workers.append(worker)
        return worker

    def logs():
        return "\n".join(f"--- {w.log_path.name}\n{w.log_tail(15)}" for w in workers)

    start.logs = logs
    yield settings, start
    for worker in workers:
        worker.kill()


def apply(settings, document):
    return apply_pools(settings.kafka, settings.topics, codec_from_settings(settings.kafka), parse_pools(document))


def request(model, i, arm="control"):
    """A request in ``arm`` of the experiment (the SDK would otherwise draw each user's arm)."""
    return new_request(
        prompt=f"a lighthouse {i}",
        model=model,
        user_id=f"user-{i}",
        width=32,
        height=32,
        steps=2,
        seed=i,
        experiments={"to-b": arm},
    )


def rendered_by(settings, results):
    """Worker id of each succeeded request's GENERATE metric."""
    succeeded = [rid for rid, r in results.items() if r.status == "SUCCEEDED"]
    metrics = collect(settings.kafka, settings.topics.metrics, StageMetric, dict.fromkeys(succeeded, 3), timeout_s=60)
    return {m.request_id: m.worker_id for events in metrics.events.values() for m in events if m.stage == "GENERATE"}


def test_each_model_renders_in_its_pool_an_experiment_routes_to_the_variants_pool_and_an_unserved_model_fails(pooled):
    settings, start = pooled
    apply(settings, {"pools": [{"name": "pa", "models": ["a"]}, {"name": "pb", "models": ["b"]}]})
    assert sorted(read_pools(settings.kafka, settings.topics, codec_from_settings(settings.kafka))) == ["pa", "pb"]
    start("moderation", ["moderation"])
    start("pa-1", ["generate"], "pa")
    start("pb-1", ["generate"], "pb")
    own_a = [request("a", i) for i in range(6)]
    own_b = [request("b", i) for i in range(6, 12)]
    moved = [request("a", i, arm="b") for i in range(12, 18)]
    unserved = [request("c", i) for i in range(18, 20)]
    everything = own_a + own_b + moved + unserved
    with Publisher(settings) as publisher:
        for pending in [publisher.publish(r) for r in everything]:
            pending.result(timeout=60)
    results = collect(
        settings.kafka, settings.topics.results, ImageResult, [r.request_id for r in everything], timeout_s=WAIT_S
    ).latest()
    assert len(results) == len(everything), start.logs()
    for r in unserved:
        assert (results[r.request_id].status, results[r.request_id].error_code) == ("FAILED", "MODEL_NOT_SERVED")
        assert "model 'c' is served by no pool (pools: pa, pb)" in results[r.request_id].error_message
    workers = rendered_by(settings, results)
    assert {workers[r.request_id] for r in own_a} == {"pa-1"}
    assert {workers[r.request_id] for r in own_b + moved} == {"pb-1"}
    assert {results[r.request_id].model for r in moved} == {"b"}
    assert {results[r.request_id].pool for r in own_a} == {"pa"}
    assert {results[r.request_id].pool for r in own_b + moved} == {"pb"}


def test_a_pool_added_while_requests_flow_takes_its_models_requests_within_seconds(pooled):
    settings, start = pooled
    apply(settings, {"pools": [{"name": "pa", "models": ["a"]}]})
    start("moderation", ["moderation"])
    start("pa-1", ["generate"], "pa")
    published: dict[str, float] = {}
    stop = threading.Event()

    def stream():  # requests for model c, ten a second, before and after its pool exists
        with Publisher(settings) as publisher:
            i = 0
            while not stop.is_set():
                r = request("c", 1000 + i)
                publisher.publish(r).result(timeout=60)
                published[r.request_id] = time.time()
                i += 1
                time.sleep(0.1)

    warm = request("a", 999)
    with Publisher(settings) as publisher:
        publisher.publish(warm).result(timeout=60)
    flowing = collect(settings.kafka, settings.topics.results, ImageResult, [warm.request_id], timeout_s=WAIT_S)
    assert not flowing.missing, f"the pipeline did not flow\n{start.logs()}"
    streaming = threading.Thread(target=stream, daemon=True)
    streaming.start()
    time.sleep(3.0)  # c's requests meanwhile have no pool
    apply(settings, {"pools": [{"name": "pa", "models": ["a"]}, {"name": "pc", "models": ["c"]}]})
    applied_at = time.time()
    start("pc-1", ["generate"], "pc")
    time.sleep(ROUTING_BOUND_S + 3.0)
    stop.set()
    streaming.join(60)
    results = collect(settings.kafka, settings.topics.results, ImageResult, list(published), timeout_s=WAIT_S)
    assert not results.missing, f"{len(results.missing)} requests without a result\n{start.logs()}"
    latest = results.latest()
    unserved = [published[rid] for rid, r in latest.items() if r.error_code == "MODEL_NOT_SERVED"]
    served = [rid for rid, r in latest.items() if r.status == "SUCCEEDED"]
    assert unserved and served, "the stream did not span the pool's arrival"
    delay_s = max(unserved) - applied_at
    print(f"\npool added: the last request refused was published {delay_s:.2f} s after the apply")
    assert delay_s < ROUTING_BOUND_S
    # Refused until moderation read the new pool, served from then on: no request after one served was refused.
    assert max(unserved) < min(published[rid] for rid in served)
    assert {r.status for r in latest.values()} == {"FAILED", "SUCCEEDED"}
    assert set(rendered_by(settings, latest).values()) == {"pc-1"}
