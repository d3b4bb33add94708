"""The Faust worker (processors.app) on a real broker: committed offsets never pass an event whose effects are
missing, a full source pauses its partitions, neither a rebalance nor a stop renders a request twice, and /readyz
waits for the models and an assignment (every worker started here is checked).

Workers render with a null model (a set time per image, no weights), so a take lasts as long as a test needs
whatever the machine. Renders are counted on the metrics topic: each one emits a GENERATE StageMetric, whose id is
derived from the request's, so a request rendered twice shows there twice however ClickHouse deduplicates it."""

import asyncio
import itertools
import json
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
from confluent_kafka import Consumer, TopicPartition

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageResult, StageMetric
from pixelpipe.core.topics import assign_from_start, assigned_consumer, ensure_topics, partition_count
from pixelpipe.processors.app import Pipeline, group_id
from pixelpipe.processors.build import build_stages
from pixelpipe.processors.sender import EmissionSender
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.load import publish_all
from pixelpipe.producers.results import collect
from pixelpipe.tools.processes import WorkerProcess
from tests.conftest import free_port
from tests.integration.test_operations import wait_until

pytestmark = pytest.mark.integration
STAGES = ("moderation", "generate")
# Takes of 4 events, rendered as one batch; no image detector: the null model's plain images need none.
WORKER = {"image_detector": "null", "topic_partitions": 4, "max_batch": 4, "take_events": 4, "max_wait_ms": 50}
WAIT_S = 240.0
SPAWNED = []  # this test's workers, killed after it


@pytest.fixture(autouse=True)
def _reaped():
    yield
    while SPAWNED:
        SPAWNED.pop().kill()


@pytest.fixture
def pipeline(topic_settings, tmp_path):
    """Settings for this test's pipeline, whose null model takes ``seconds`` per image."""

    def with_render_s(seconds):
        registry = tmp_path / "registry.json"
        registry.write_text(json.dumps({"null": {"kind": "null", "seconds_per_image": seconds}}))
        settings = topic_settings.updated(
            model_registry=str(registry),
            consumer_group=f"streams-{uuid.uuid4().hex[:8]}",
            object_store_url=f"file://{tmp_path / 'objects'}",
            log_level="INFO",  # the assignment is logged
            **WORKER,
        )
        ensure_topics(settings.kafka, settings.topics)
        return settings

    return with_render_s


def request(i):
    return new_request(
        prompt=f"a lighthouse {i}", model="null", user_id=f"user-{i % 8}", width=32, height=32, steps=2, seed=i
    )


def readyz(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""  # not serving yet


def start(settings, name, tmp_path):
    """A worker, returned once /readyz says it is ready, which it must not say before its models are loaded and it
    was assigned partitions."""
    port = free_port()
    env = {"PIXELPIPE_METRICS_PORT": str(port), "PIXELPIPE_METRICS_HOST": "127.0.0.1"}
    worker = WorkerProcess(settings.updated(worker_id=name), STAGES, tmp_path / f"{name}.log", env)
    SPAWNED.append(worker)
    answers = []

    def ready():
        assert worker.process.poll() is None, worker.log_tail()
        answers.append(readyz(port))
        return answers[-1][0] == 200

    wait_until(ready, WAIT_S, f"{name} ready", interval_s=0.05)
    log = worker.log_path.read_text(errors="replace")
    assert "stages ready" in log and "partitions assigned" in log, worker.log_tail()
    assert any(status == 503 and "partitions" in body for status, body in answers), answers[:3]
    return worker


def committed(settings, topic):
    """The worker group's committed offset of each partition of ``topic``."""
    consumer = Consumer(settings.kafka.client_config() | {"group.id": group_id(settings, STAGES)})
    partitions = [TopicPartition(topic, p) for p in range(partition_count(settings.kafka, topic))]
    offsets = {tp.partition: max(tp.offset, 0) for tp in consumer.committed(partitions, timeout=10)}
    consumer.close()
    return offsets


def scan(settings, topic):
    """(partition, offset, key) of every message on ``topic`` now."""
    consumer = assigned_consumer(settings.kafka)
    assign_from_start(consumer, topic)
    ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in consumer.assignment()}
    found, deadline = [], time.monotonic() + 60
    while len(found) < sum(ends.values()) and time.monotonic() < deadline:
        found += [(m.partition(), m.offset(), m.key().decode()) for m in consumer.consume(500, 0.2) if not m.error()]
    consumer.close()
    return found


def renders(settings, request_ids, each=3):
    """The workers that rendered ``request_ids``, read once each has its result and its ``each`` metrics (MODERATION,
    GENERATE, OUTPUT_MODERATION); fails if one was rendered twice or has two results."""
    kafka, topics = settings.kafka, settings.topics
    results = collect(kafka, topics.results, ImageResult, request_ids, timeout_s=WAIT_S, settle_s=2)
    assert not results.missing, f"{len(results.missing)} of {len(request_ids)} requests have no result"
    assert {r.status for r in results.latest().values()} == {"SUCCEEDED"}
    metrics = collect(kafka, topics.metrics, StageMetric, dict.fromkeys(request_ids, each), settle_s=2)
    rendered = defaultdict(list)
    for metric in itertools.chain.from_iterable(metrics.events.values()):
        if metric.stage == "GENERATE":
            rendered[metric.request_id].append(metric.worker_id)
    twice = {rid: workers for rid, workers in rendered.items() if len(workers) > 1}
    assert twice == {}, f"{len(twice)} of {len(request_ids)} requests rendered more than once: {twice}"
    assert {rid for rid, events in results.events.items() if len(events) > 1} == set()  # one terminal result each
    return {worker for workers in rendered.values() for worker in workers}


def wait_for_commits(settings, count):
    """Until the worker group committed ``count`` generate events: its workers are rendering."""
    wait_until(lambda: sum(committed(settings, settings.topics.generate).values()) >= count, WAIT_S, "commits")


def test_a_killed_worker_committed_no_offset_past_an_event_whose_effects_are_missing(pipeline, tmp_path):
    settings = pipeline(0.5)  # a take of 4 renders for 2 s: commits (every second) fall mid-take
    topics = settings.topics
    worker = start(settings, "killed", tmp_path)
    with Publisher(settings) as publisher:
        assert publish_all(publisher, [request(i) for i in range(40)], progress=False).acknowledged == 40
    wait_for_commits(settings, 8)
    time.sleep(0.5)  # into the next take
    worker.kill()

    forwarded = {key for _, _, key in scan(settings, topics.generate)}
    finished = {key for _, _, key in scan(settings, topics.results)}
    assert forwarded - finished, "no render was in flight when the worker was killed"
    for topic, effects in ((topics.requests, forwarded | finished), (topics.generate, finished)):
        offsets = committed(settings, topic)
        past = [(p, o, key) for p, o, key in scan(settings, topic) if o < offsets[p] and key not in effects]
        assert past == [], f"{topic}: committed past events without effects (committed {offsets})"


def test_a_full_source_pauses_its_partitions_and_loses_or_repeats_nothing(pipeline):
    # In this process, to watch Faust's consumer: on_buffer_full takes a partition out of the fetch.
    settings = pipeline(0.005).updated(moderation_take_events=8)  # the stream buffer: max(64, 4 * 4, 8 * 2)
    topics, codec = settings.topics, codec_from_settings(settings.kafka)
    sender = EmissionSender(settings.kafka, settings.stages.reply_timeout_ms)
    stages = build_stages(settings, ["generate"])
    app = Pipeline(settings, stages, sender, partition_count(settings.kafka, topics.requests)).app
    buffer, stamp = app.conf.stream_buffer_maxsize, ModerationStamp(settings.moderation.stamp_key)
    backlog = [request(i) for i in range(10 * buffer)]
    with Publisher(settings) as publisher:
        for r in backlog:  # stamped, as moderation forwards them
            value = codec.encode(r)
            publisher.publish_encoded(
                r.request_id.encode(), value, topics.generate, stamp.headers(topics.generate, value)
            )
    paused, held = [], []  # partitions out of the fetch; events buffered or taken and not yet acknowledged

    async def run():
        await app.start()
        try:
            async with asyncio.timeout(WAIT_S):
                consumer, done = app.consumer, 0
                while done < len(backlog):
                    await asyncio.sleep(0.01)
                    paused.append(len(consumer._buffered_partitions))
                    queued = sum(a.stream.channel.queue.qsize() for agent in app.agents.values() for a in agent._actors)
                    held.append(queued + len(consumer._unacked_messages))
                    sources = [tp for tp in consumer.assignment() if tp.topic == topics.generate]
                    done = sum(consumer._committed_offset.get(tp) or 0 for tp in sources)
        finally:
            await app.stop()
            sender.close()

    asyncio.run(run())
    assert any(paused), "no partition was paused with a backlog of ten buffers"
    assert max(held) <= buffer + 2 * settings.stages.take_events, f"{max(held)} events held in memory"
    renders(settings, [r.request_id for r in backlog], each=2)  # no MODERATION metric: they came stamped


def steady(published, stop_at):
    """Requests until ``stop_at`` (a one-item list, set by the test) has passed, each id added to ``published``."""
    for i in itertools.count():
        if stop_at and time.monotonic() > stop_at[0]:
            return
        published.append((r := request(i)).request_id)
        yield r


def test_a_partition_given_up_in_a_rebalance_moves_only_once_its_takes_in_flight_are_done(pipeline, tmp_path):
    settings = pipeline(0.2)  # 0.8 s a take: the first worker renders at most 5 a second, and 6 come
    start(settings, "first", tmp_path)
    published, stop_at = [], []
    with Publisher(settings) as publisher, ThreadPoolExecutor(1) as pool:
        sending = pool.submit(publish_all, publisher, steady(published, stop_at), rate=6, progress=False)
        wait_for_commits(settings, 4)
        start(settings, "second", tmp_path)  # joins while the first is mid-take, its backlog growing
        stop_at.append(time.monotonic() + 3)
        assert sending.result(WAIT_S).acknowledged == len(published)
    assert renders(settings, published) == {"first", "second"}


def test_sigterm_mid_stream_renders_no_request_twice_and_exits_0(pipeline, tmp_path):
    settings = pipeline(0.2)  # 0.8 s a take; 10 requests a second come: a backlog waits behind the take in hand
    first = start(settings, "first", tmp_path)
    batch = [request(i) for i in range(60)]
    with Publisher(settings) as publisher, ThreadPoolExecutor(1) as pool:
        sending = pool.submit(publish_all, publisher, batch, rate=10, progress=False)
        wait_for_commits(settings, 4)
        first.process.send_signal(signal.SIGTERM)
        start(settings, "second", tmp_path)
        assert first.process.wait(60) == 0, first.log_tail()
        assert sending.result(WAIT_S).acknowledged == len(batch)
    assert renders(settings, [r.request_id for r in batch]) == {"first", "second"}


def test_sigterm_mid_render_ends_the_call_at_its_next_step_and_the_next_owner_renders_it_once(pipeline, tmp_path):
    settings = pipeline(30.0)  # one image is 30 s of work in 60 steps of 0.5 s: a stop arrives mid-call
    first = start(settings, "first", tmp_path)
    long_one = new_request(prompt="a long render", model="null", user_id="user-0", width=32, height=32, steps=60)
    with Publisher(settings) as publisher:
        publisher.publish(long_one)
        publisher.flush()
    # Forwarded by moderation (to the long lane: 30 device seconds is over PIXELPIPE_LONG_REQUEST_COMPUTE, and
    # either lane renders it): the render is under way.
    lanes = (settings.topics.generate, settings.topics.generate_long)
    wait_until(lambda: any(scan(settings, lane) for lane in lanes), WAIT_S, "the request forwarded to the renderer")
    time.sleep(2.0)
    stopped_at = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(60) == 0, first.log_tail()
    took_s = time.monotonic() - stopped_at
    assert took_s <= 10.0, f"the worker took {took_s:.1f} s to stop mid-render\n{first.log_tail()}"
    assert "chunks handed back" in first.log_path.read_text(errors="replace"), first.log_tail()
    start(settings, "second", tmp_path)
    assert renders(settings, [long_one.request_id]) == {"second"}  # handed back whole: no result of the first's
