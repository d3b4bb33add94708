"""The worker's consumer (processors.streams) on a real broker: only acknowledged takes are committed, and a full
source pauses its partitions without losing or repeating a message."""

import asyncio
import uuid

from confluent_kafka import Producer

from pixelpipe.core.topics import ensure_topics
from pixelpipe.processors.streams import WorkerConsumer

WAIT_S = 60.0


def _publish(settings, count):
    topic = settings.topics.requests
    ensure_topics(settings.kafka, settings.topics, [topic], partitions=2)
    producer = Producer(settings.kafka.client_config())
    for i in range(count):
        producer.produce(topic, f"value-{i}".encode(), f"key-{i}".encode())
    assert producer.flush(30) == 0
    return topic


async def _take_until(consumer, topic, count, take_events, on_take=None):
    """Takes of ``topic`` until ``count`` messages were taken (or WAIT_S passed); the consumer is then stopped."""
    taken = []

    async def taking():
        async for take in consumer.takes(topic, take_events, 0.05):
            taken.append(take)
            if on_take is not None:
                on_take(take)
            if sum(len(t.messages) for t in taken) >= count:
                consumer.stop()

    polling = asyncio.ensure_future(consumer.run())
    try:
        await asyncio.wait_for(taking(), WAIT_S)
    finally:
        consumer.stop()
        await polling
    return taken


def _positions(takes):
    return [(m.partition, m.offset) for take in takes for m in take.messages]


def test_only_acknowledged_takes_are_committed_and_the_rest_comes_back_to_the_group(topic_settings):
    settings = topic_settings
    topic = _publish(settings, 40)
    group = f"streams-{uuid.uuid4().hex[:8]}"

    first = WorkerConsumer(settings.kafka, group, "first", {topic: 64})
    takes = asyncio.run(_take_until(first, topic, 40, take_events=8))
    assert len(set(_positions(takes))) == 40  # nothing twice
    # Acknowledged after the consumer closed: too late to commit, so nothing of the group moves.
    for take in takes[:2]:
        first.acknowledge(take)

    second = WorkerConsumer(settings.kafka, group, "second", {topic: 64})
    again = asyncio.run(_take_until(second, topic, 40, take_events=8))
    assert sorted(_positions(again)) == sorted(_positions(takes))

    # Now acknowledged while running: the next member of the group gets only what came after.
    third = WorkerConsumer(settings.kafka, group, "third", {topic: 64})
    kept = []

    def acknowledge_the_first_two(take):
        if len(kept) < 2:
            third.acknowledge(take)
        kept.append(take)

    asyncio.run(_take_until(third, topic, 40, take_events=8, on_take=acknowledge_the_first_two))
    committed = {}
    for take in kept[:2]:
        for (_, partition), (_, offset) in take.commits.items():
            committed[partition] = max(committed.get(partition, 0), offset)
    rest = sorted((p, o) for p, o in _positions(kept) if o >= committed.get(p, 0))
    assert 0 < len(rest) < 40

    fourth = WorkerConsumer(settings.kafka, group, "fourth", {topic: 64})
    remaining = asyncio.run(_take_until(fourth, topic, len(rest), take_events=8))
    assert sorted(_positions(remaining)) == rest


def test_a_full_source_pauses_its_partitions_and_resumes_without_losing_or_repeating_a_message(topic_settings):
    settings = topic_settings
    count = 3000
    topic = _publish(settings, count)
    consumer = WorkerConsumer(settings.kafka, f"streams-{uuid.uuid4().hex[:8]}", "slow", {topic: 16})
    paused = []

    async def slowly():
        async for take in consumer.takes(topic, 4, 0.01):
            yield take
            paused.append(consumer.paused(topic))
            await asyncio.sleep(0.001)  # a slow stage: the source fills up

    async def run():
        polling = asyncio.ensure_future(consumer.run())
        taken = []
        try:
            async with asyncio.timeout(WAIT_S):
                async for take in slowly():
                    taken.append(take)
                    consumer.acknowledge(take)
                    if sum(len(t.messages) for t in taken) >= count:
                        consumer.stop()
        finally:
            consumer.stop()
            await polling
        return taken

    taken = asyncio.run(run())
    positions = _positions(taken)
    assert len(positions) == count == len(set(positions))
    assert any(paused) and not all(paused)  # paused while full, resumed once drained


def test_a_partition_given_up_in_a_rebalance_is_committed_once_its_takes_in_flight_are_done(topic_settings):
    settings = topic_settings
    topic = _publish(settings, 40)
    group = f"streams-{uuid.uuid4().hex[:8]}"
    first = WorkerConsumer(settings.kafka, group, "first", {topic: 64})
    second = WorkerConsumer(settings.kafka, group, "second", {topic: 64})
    seen = {"first": [], "second": []}

    async def collect(consumer, name, held):
        async for take in consumer.takes(topic, 8, 0.05):
            seen[name] += [(m.partition, m.offset) for m in take.messages]
            if held is None:
                consumer.acknowledge(take)
            else:
                held.append(take)

    async def run():
        held = []
        polling = [asyncio.ensure_future(first.run())]
        taking = [asyncio.ensure_future(collect(first, "first", held))]
        async with asyncio.timeout(WAIT_S):
            while len(seen["first"]) < 40:
                await asyncio.sleep(0.05)
            # The second member joins while all 40 are in flight: the first gives up a partition only once its
            # takes are done (within REVOKE_WAIT_S), then commits them, so the second starts after them.
            polling.append(asyncio.ensure_future(second.run()))
            taking.append(asyncio.ensure_future(collect(second, "second", None)))
            await asyncio.sleep(5.0)  # the first learns of the rebalance at its next heartbeat (3 s)
            assert not second.assigned(), "a partition moved with its takes still in flight"
            for take in held:
                first.acknowledge(take)
            held.clear()
            while not second.assigned():
                await asyncio.sleep(0.05)
            _publish(settings, 20)
            while len(seen["first"]) + len(seen["second"]) < 60:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # anything repeated would come now
        for consumer in (first, second):
            consumer.stop()
        await asyncio.gather(*polling, *taking)

    asyncio.run(run())
    assert seen["second"], "the second member was given no partition"
    everything = seen["first"] + seen["second"]
    assert len(everything) == len(set(everything)) == 60
