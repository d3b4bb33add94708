"""Fault injection on the real stack, each with a steady stream of requests flowing through it.

Every test: a worker (moderation + generate, tiny models) and the ClickHouse sink run; a few warm-up requests prove
the pipeline flows; then a stream of small requests (64x64, 2 steps) is published at a steady rate and the fault is
injected while it runs. Afterwards ``Harness.verify`` checks N requests in, N terminal results out, no duplicate
event in the deduplicated ClickHouse views, and every image a result names present in object storage.

The S3 outage lasts 30 s, well inside the worker's storage retry budget (PIXELPIPE_STORAGE_RETRY_BUDGET_S, 120 s by
default): every request it hits waits with its rendered images and succeeds once the store answers again.

The poison test publishes, mid-stream, three events onto each topic (requests, generate, edit, results, metrics)
whose event_time (2**62 ms) is valid Avro but no datetime: each must end as a dead letter with its original bytes
(and a FAILED result, where its key names a request) while the stream's requests all succeed and the sink keeps
running.

The model pools tests run pools "a" and "b" (one tiny model each) with moderation as a worker of its own and one
render worker per pool. Each ends with where every request rendered, from its GENERATE metric: on a worker of the
pool serving its model when moderation forwarded it, and never elsewhere.
"""

from __future__ import annotations

import time

import pytest

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import DeadLetter, ImageResult, StageMetric
from pixelpipe.producers.results import collect
from pixelpipe.tools.processes import WorkerProcess
from tests.faults.conftest import STAGES
from tests.samples import sample_records

pytestmark = pytest.mark.faults

WARM_UP = 2
STREAM = 16
RATE_PER_S = 2.0


def start(harness, tag: str, stages: tuple[str, ...] = STAGES):
    """Sink and first worker up, flowing; then the steady stream begins. Returns the request ids and the worker."""
    harness.start_sink()
    worker = harness.start_worker(f"{tag}-a", stages)
    warm = harness.requests(WARM_UP, f"{tag}-warm")
    harness.publish_now(warm)
    harness.wait_results_in_clickhouse([r.request_id for r in warm], timeout_s=180)
    stream = harness.requests(STREAM, tag)
    harness.stream(stream, RATE_PER_S)
    return [r.request_id for r in warm + stream], worker


def wait_stream_midway(harness, ids, share: float = 0.4) -> None:
    deadline = time.monotonic() + 60
    while len(harness.published) < len(ids) * share and time.monotonic() < deadline:
        time.sleep(0.1)


def backlog(harness, tag: str, count: int = 12) -> list[str]:
    """A burst on top of the stream, returned once its first result is in: the worker is busy with the rest."""
    burst = harness.requests(count, f"{tag}-burst")
    harness.publish_now(burst)
    ids = [r.request_id for r in burst]
    deadline = time.monotonic() + 120
    while harness.landed(ids) == 0:
        assert time.monotonic() < deadline, harness.logs()
        time.sleep(0.2)
    return ids


def test_worker_killed_with_sigkill_mid_batch(harness):
    ids, worker = start(harness, "sigkill")
    wait_stream_midway(harness, ids)
    burst = backlog(harness, "sigkill")
    worker.kill()  # whatever it rendered but had not committed is redelivered to the next worker
    cleared = time.time()
    in_flight = len(burst) - harness.landed(burst)
    assert in_flight > 0, "the burst was done before the kill: nothing was in flight"
    harness.start_worker("sigkill-b")
    recovery = harness.recovery_after(cleared)
    row = harness.verify("worker SIGKILL mid-batch", ids + burst, recovery)
    assert row["outcomes"] == ["SUCCEEDED:"]


def test_worker_sigterm_with_requests_in_flight_finishes_or_hands_back(harness):
    ids, worker = start(harness, "sigterm")
    wait_stream_midway(harness, ids)
    burst = backlog(harness, "sigterm")
    code = worker.stop(timeout_s=60)  # SIGTERM; SIGKILL only after 60 s
    cleared = time.time()
    # Whatever it finished is in ClickHouse once its results are; the rest it handed back, uncommitted.
    print(f"\nSIGTERM: {harness.landed(burst)} of the burst's {len(burst)} done by the stopping worker")
    assert code == 0, f"worker exited with {code} after SIGTERM\n{worker.log_tail()}"
    harness.start_worker("sigterm-b")
    recovery = harness.recovery_after(cleared)
    row = harness.verify("worker SIGTERM in flight", ids + burst, recovery)
    assert row["outcomes"] == ["SUCCEEDED:"]


def test_worker_sigterm_mid_render_exits_within_seconds_and_hands_the_render_back(harness):
    # A render of many steps: the stop meets it mid-call, whatever the machine's speed.
    harness.settings = harness.settings.updated(max_request_compute=1e9)
    ids, worker = start(harness, "midrender")
    (long_render,) = harness.requests(1, "midrender-long")
    long_render.width = long_render.height = 128
    long_render.steps = 40
    harness.publish_now([long_render])
    wait_for_forward(harness, long_render.request_id)
    time.sleep(3.0)  # into its denoising steps
    stopped_at = time.monotonic()
    code = worker.stop(timeout_s=60)  # SIGTERM; SIGKILL only after 60 s
    took_s = time.monotonic() - stopped_at
    cleared = time.time()
    print(f"\nSIGTERM mid-render: the worker exited {took_s:.1f} s after it")
    assert code == 0, f"worker exited with {code} after SIGTERM\n{worker.log_tail()}"
    assert took_s <= 10.0, f"the worker took {took_s:.1f} s to stop mid-render\n{worker.log_tail()}"
    assert "chunks handed back" in worker.log_path.read_text(errors="replace"), worker.log_tail()
    assert harness.landed([long_render.request_id]) == 0, "the long render finished before the stop"
    harness.start_worker("midrender-b")
    recovery = harness.recovery_after(cleared, timeout_s=400)
    row = harness.verify("worker SIGTERM mid-render", [*ids, long_render.request_id], recovery)
    assert row["outcomes"] == ["SUCCEEDED:"]


def wait_for_forward(harness, request_id: str) -> None:
    """Until moderation has forwarded ``request_id`` to a render topic: its render is about to start."""
    kafka, topics = harness.settings.kafka, harness.settings.topics
    metrics = collect(kafka, topics.metrics, StageMetric, [request_id], timeout_s=120)
    assert not metrics.missing, f"{request_id} was not moderated\n{harness.logs()}"


def test_kafka_broker_stopped_and_restarted(harness):
    kafka = harness.stack.services[0]
    ids, _ = start(harness, "kafka")
    wait_stream_midway(harness, ids)
    kafka.stop()
    time.sleep(5)
    kafka.start()
    cleared = time.time()
    recovery = harness.recovery_after(cleared)
    row = harness.verify("Kafka broker stop/restart", ids, recovery)
    assert row["outcomes"] == ["SUCCEEDED:"]


def test_clickhouse_stopped_and_restarted_while_the_sink_inserts(harness):
    clickhouse = harness.stack.services[1]
    ids, _ = start(harness, "clickhouse")
    wait_stream_midway(harness, ids)
    clickhouse.stop()
    time.sleep(8)  # results keep coming into Kafka; the sink cannot insert them
    clickhouse.start()
    cleared = time.time()
    recovery = harness.recovery_after(cleared)
    row = harness.verify("ClickHouse stop/restart", ids, recovery)
    assert row["outcomes"] == ["SUCCEEDED:"]


S3_OUTAGE_S = 30


def test_object_storage_refusing_for_thirty_seconds(harness):
    s3 = harness.stack.services[2]
    ids, _ = start(harness, "s3")
    wait_stream_midway(harness, ids, share=0.2)
    s3.stop()
    time.sleep(S3_OUTAGE_S)
    s3.start()
    cleared = time.time()
    after = harness.requests(2, "s3-after")
    harness.publish_now(after)
    recovery = harness.recovery_after(cleared)
    row = harness.verify(f"S3 refusing {S3_OUTAGE_S} s", ids + [r.request_id for r in after], recovery)
    assert row["outcomes"] == ["SUCCEEDED:"]  # ridden out: no request failed for the outage


# What each topic carries, and who reads it: the stage (or the sink) that must dead-letter a poison event there.
POISON_TOPICS = {
    "requests": ("ImageRequest", "moderation"),
    "generate": ("ImageRequest", "generate"),
    "edit": ("ImageRequest", "edit"),
    "results": ("ImageResult", "clickhouse-sink"),
    "metrics": ("StageMetric", "clickhouse-sink"),
}


def test_poison_events_on_every_topic_are_dead_lettered_and_the_stream_flows_on(harness):
    # All five topics in one stream: each reader meets its poison while the others meet theirs.
    ids, _ = start(harness, "poison", (*STAGES, "edit"))
    wait_stream_midway(harness, ids)
    poison: dict[str, tuple[str, str, str, bytes]] = {}  # request id -> (schema, reader, topic, bytes)
    for topic, (schema, reader) in POISON_TOPICS.items():
        topic_name = getattr(harness.settings.topics, topic)
        for i in range(3):
            request_id = f"poison-{topic}-{i}"
            # Valid Avro whose event_time (2**62 ms) no decoder can turn into a datetime.
            value = Codec().encode_record(
                schema, sample_records()[schema] | {"request_id": request_id, "event_time": 2**62}
            )
            poison[request_id] = (schema, reader, topic_name, value)
            harness.publish_raw(topic_name, request_id, value)
    injected = time.time()
    recovery = harness.recovery_after(injected)
    row = harness.verify(f"3 poison events on each of {', '.join(POISON_TOPICS)}", ids, recovery)
    assert row["outcomes"] == ["SUCCEEDED:"]

    kafka, topics = harness.settings.kafka, harness.settings.topics
    letters = collect(kafka, topics.dead_letter, DeadLetter, list(poison), timeout_s=60)
    assert not letters.missing, harness.logs()
    for request_id, (_, reader, topic_name, value) in poison.items():
        letter = letters.latest()[request_id]
        assert (letter.stage, letter.topic, letter.original_value) == (reader, topic_name, value)
        assert "OverflowError" in letter.error_reason
    # A request's key names it: it also ends FAILED, in ClickHouse like any other.
    requests = [request_id for request_id, (schema, *_) in poison.items() if schema == "ImageRequest"]
    failed = collect(kafka, topics.results, ImageResult, requests, timeout_s=60)
    assert not failed.missing
    assert {(r.status, r.error_code) for r in failed.latest().values()} == {("FAILED", "UNDECODABLE")}
    harness.wait_results_in_clickhouse(requests, timeout_s=60)


# "Within seconds" (docs/operators/pools.md): requests published later than this after the apply go to the new pool.
MOVE_TAKES_EFFECT_S = 5.0
POOLS = {"a": ["tiny-sd"], "b": ["tiny-sd-b"]}
POOL_OF_MODEL = {model: pool for pool, models in POOLS.items() for model in models}


def start_pools(harness, tag: str) -> tuple[list[str], dict[str, WorkerProcess]]:
    """``POOLS`` applied; the sink, a moderation worker and one render worker per pool up, each pool flowing (a
    warm-up request of each model rendered). Returns the warm-up's request ids and the render workers by pool."""
    harness.apply_pools(POOLS)
    harness.start_sink()
    harness.start_worker(f"{tag}-moderation", ("moderation",))
    workers = {pool: harness.start_worker(f"{tag}-{pool}-1", ("generate",), pool=pool) for pool in POOLS}
    warm = harness.requests(len(POOL_OF_MODEL), f"{tag}-warm", models=list(POOL_OF_MODEL))
    harness.publish_now(warm)
    harness.wait_results_in_clickhouse([r.request_id for r in warm], timeout_s=240)
    return [r.request_id for r in warm], workers


def test_pool_worker_killed_with_sigkill_mid_take(harness):
    warm, workers = start_pools(harness, "poolkill")
    stream = harness.requests(STREAM, "poolkill", models=list(POOL_OF_MODEL))
    harness.stream(stream, RATE_PER_S)
    ids = warm + [r.request_id for r in stream]
    wait_stream_midway(harness, ids)
    burst = backlog(harness, "poolkill")  # tiny-sd: pool a's
    workers["a"].kill()  # what it took but had not committed is redelivered to pool a's next worker
    cleared = time.time()
    in_flight = len(burst) - harness.landed(burst)
    assert in_flight > 0, "the burst was done before the kill: nothing was in flight"
    harness.start_worker("poolkill-a-2", ("generate",), pool="a")
    recovery = harness.recovery_after(cleared)
    row = harness.verify("pool worker SIGKILL mid-take", ids + burst, recovery)
    assert row["outcomes"] == ["SUCCEEDED:"]
    renderings = harness.renderings(ids + burst)
    served_by = {"tiny-sd": {"poolkill-a-1", "poolkill-a-2"}, "tiny-sd-b": {"poolkill-b-1"}}
    astray = {rid: r for rid, r in renderings.items() if r.worker_id not in served_by[r.model]}
    assert not astray, f"rendered outside their model's pool: {astray}"
    assert {r.pool for r in renderings.values()} == set(POOLS)


def test_model_moved_between_pools_mid_stream(harness):
    warm, _ = start_pools(harness, "poolmove")
    # Long enough that a good share of it is published after the move has had time to take effect.
    stream = harness.requests(2 * STREAM, "poolmove")  # tiny-sd: pool a's until the move
    harness.stream(stream, RATE_PER_S)
    ids = warm + [r.request_id for r in stream]
    wait_stream_midway(harness, ids, share=0.25)
    applying = time.time()
    harness.apply_pools({"b": ["tiny-sd-b", "tiny-sd"]})  # pool a removed: its worker drains what it was given
    applied = time.time()
    recovery = harness.recovery_after(applied)
    harness.join_stream()
    renderings = harness.renderings(ids, timeout_s=120)
    routed = {
        pool: [r.moderated_at for r in renderings.values() if (r.model, r.pool) == ("tiny-sd", pool)] for pool in POOLS
    }
    assert routed["b"], f"no request was routed to pool b after the move\n{harness.logs()}"
    # The change took effect between the last request moderation sent to a and the first it sent to b.
    routing_delay = min(routed["b"]) - applied
    print(
        f"\nthe apply took {applied - applying:.1f} s; after it returned, the last request went to pool a at"
        f" {max(routed['a']) - applied:.1f} s, the first to pool b at {routing_delay:.1f} s"
    )
    fault = f"model moved between pools mid-stream (to b {routing_delay:.1f} s after the apply)"
    row = harness.verify(fault, ids, recovery)
    assert row["outcomes"] == ["SUCCEEDED:"]
    stream_ids = [r.request_id for r in stream]
    by_moderation = sorted(stream_ids, key=lambda rid: renderings[rid].moderated_at)
    pools_in_order = [renderings[rid].pool for rid in by_moderation]
    # One switch, from a to b, and never back: the model is served by one pool or the other throughout.
    assert pools_in_order == sorted(pools_in_order), pools_in_order
    before = [rid for rid in stream_ids if harness.published[rid] < applying]
    after = [rid for rid in stream_ids if harness.published[rid] > applied + MOVE_TAKES_EFFECT_S]
    assert before and after, "the move was not mid-stream"
    assert {renderings[rid].worker_id for rid in before} == {"poolmove-a-1"}
    assert {renderings[rid].worker_id for rid in after} == {"poolmove-b-1"}
