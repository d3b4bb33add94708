"""The pipeline's Kafka topics (names and partition counts come from the settings) and who may use them."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence

from aiokafka.partitioner import murmur2
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from pixelpipe.core.settings import KafkaSettings, TopicSettings

# Previews of images in progress, for a caller streaming partial images (the gateway): a request's Kafka header
# asks for up to that many (moderation passes it on with the request), and each preview goes to the request's reply
# topic keyed by request id, its value a small JPEG of the latents' projection, with its index in the other header.
PARTIAL_IMAGES_HEADER = "pixelpipe-partial-images"
PREVIEW_HEADER = "pixelpipe-preview"
MAX_PARTIAL_IMAGES = 3
log = logging.getLogger(__name__)


def user_partition(user_id: str, partitions: int) -> int:
    """The requests topic's partition for ``user_id``'s requests, so that one moderation worker holds each user's
    limits: murmur2 of the user id, as Kafka's default partitioner places a record keyed by it
    (``Utils.toPositive(Utils.murmur2(key)) % partitions``). The key stays the request id."""
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def ensure_topics(
    kafka: KafkaSettings, topics: TopicSettings, names: list[str] | None = None, partitions: int | None = None
) -> list[str]:
    """Create the topics that do not exist yet (by default the pipeline's); returns the names created. Existing
    topics are left as they are."""
    admin = AdminClient(kafka.client_config())
    wanted = names or topics.pipeline()
    existing = admin.list_topics(timeout=10).topics
    missing = [name for name in wanted if name not in existing]
    if not missing:
        return []
    # The broker stamps each request with its own clock on arrival: the rate limiter's time, which a producer
    # cannot set. Cancellations are state every render worker reads whole: compacted to the latest per request id,
    # and deleted after the broker's retention like the requests they could still meet, so the state stays bounded.
    # The model pools and the experiments are configuration: compacted to the latest per key, and kept.
    config = {
        topics.requests: {"message.timestamp.type": "LogAppendTime"},
        topics.cancellations: {"cleanup.policy": "compact,delete"},
        topics.model_pools: {"cleanup.policy": "compact"},
        topics.experiments: {"cleanup.policy": "compact"},
        # A rollout's state is the sequence of its decisions, START's plan first: kept whole (they are few).
        topics.rollouts: {"retention.ms": "-1", "retention.bytes": "-1"},
    }
    # One partition: few and small, and faust-streaming's global tables recover reliably from one (with several,
    # instances can loop in recovery).
    counts = {topics.cancellations: 1, topics.model_pools: 1, topics.experiments: 1}
    futures = admin.create_topics(
        [
            NewTopic(name, counts.get(name, partitions or topics.partitions), 1, config=config.get(name, {}))
            for name in missing
        ],
        operation_timeout=30,
    )
    for future in futures.values():
        try:
            future.result()
        except KafkaException as e:
            if e.args[0].code() != e.args[0].TOPIC_ALREADY_EXISTS:
                raise
    return missing


def partition_count(kafka: KafkaSettings, topic: str) -> int:
    """How many partitions ``topic`` has (which ``ensure_topics`` made, or an operator changed)."""
    found = AdminClient(kafka.client_config()).list_topics(topic, timeout=10).topics.get(topic)
    if found is None or found.error is not None:
        raise KafkaException(found.error if found is not None else f"topic {topic} not found")
    return len(found.partitions)


def assign_from_start(consumer: Consumer, topic: str, wait_s: float = 10.0) -> None:
    """Assign every partition of ``topic`` to ``consumer`` from its first offset, without joining a group (a group
    join costs the broker's rebalance delay, seconds per reader). A topic not made yet is waited for ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        if partitions or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not partitions:
        raise TimeoutError(f"topic {topic} has no partitions after {wait_s:.0f} s")
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])


def assign_from_end(consumer: Consumer, topic: str) -> None:
    """Assign every partition of ``topic`` (which exists) to ``consumer`` at its current end, the high watermark
    read now, so nothing published after this returns is missed; no group is joined."""
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    assignment = []
    for partition in partitions:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        assignment.append(TopicPartition(topic, partition, high if high >= 0 else OFFSET_END))
    consumer.assign(assignment)


# What each role may do, and nothing more: publishers write requests and cancellations; moderation reads requests and
# the model pools and writes the render topics (each kind's and its long lane's, of every pool); renderers read those
# and the cancellations; only moderation and renderers write results, metrics and replies.
READS, WRITES = (AclOperation.READ, AclOperation.DESCRIBE), (AclOperation.WRITE, AclOperation.DESCRIBE)


def role_acls(
    role: str, principal: str, topics: TopicSettings, consumer_group: str, sink_group: str
) -> list[AclBinding]:
    """The ACLs of one role (publisher, moderation, renderer or sink) for ``principal`` (``User:name``)."""
    outputs = [topics.results, topics.metrics, topics.dead_letter]
    literal: dict[str, list[tuple[str, tuple[AclOperation, ...]]]] = {
        "publisher": [(topics.requests, WRITES), (topics.cancellations, WRITES)],
        # Moderation writes requests too: one found off its user's partition is moved there.
        "moderation": [(topics.requests, READS), *((t, WRITES) for t in [topics.requests, *topics.render(), *outputs])],
        "renderer": [*((t, READS) for t in [*topics.render(), topics.cancellations]), *((t, WRITES) for t in outputs)],
        "sink": [
            *((t, READS) for t in [topics.results, topics.metrics, topics.rollouts]),
            (topics.dead_letter, WRITES),
        ],
    }
    if role not in literal:
        raise ValueError(f"unknown role {role!r}; choose from {', '.join(literal)}")
    rules = [(ResourceType.TOPIC, name, ResourcePatternType.LITERAL, op) for name, ops in literal[role] for op in ops]
    # The model pools' render topics (pixelpipe.generate.<pool>, ...): moderation writes them, renderers read them;
    # both read the pools (moderation to route, a renderer for its pool's models).
    pooled = {"moderation": WRITES, "renderer": READS}.get(role, ())
    for prefix in (f"{topics.generate}.", f"{topics.edit}."):
        rules += [(ResourceType.TOPIC, prefix, ResourcePatternType.PREFIXED, op) for op in pooled]
    if pooled:  # and the experiments in force, which both apply
        rules += [
            (ResourceType.TOPIC, name, ResourcePatternType.LITERAL, op)
            for name in (topics.model_pools, topics.experiments)
            for op in READS
        ]
    if role == "sink":
        rules.append((ResourceType.GROUP, sink_group, ResourcePatternType.LITERAL, AclOperation.READ))
    elif (
        role != "publisher"
    ):  # the workers: reply topics, their consumer groups and Faust's topics (tables' changelogs)
        workers = f"{consumer_group}-"
        rules += [(ResourceType.TOPIC, topics.reply_prefix, ResourcePatternType.PREFIXED, op) for op in WRITES]
        rules.append((ResourceType.GROUP, workers, ResourcePatternType.PREFIXED, AclOperation.READ))
        rules.append((ResourceType.TOPIC, workers, ResourcePatternType.PREFIXED, AclOperation.ALL))
    return [
        AclBinding(kind, name, pattern, principal, "*", operation, AclPermissionType.ALLOW)
        for kind, name, pattern, operation in dict.fromkeys(rules)  # once each: the broker refuses a duplicate
    ]


def grant_roles(
    kafka: KafkaSettings,
    topics: TopicSettings,
    principals: Mapping[str, str],
    consumer_group: str,
    sink_group: str,
    timeout_s: float = 30.0,
) -> None:
    """Create the ACLs of each role for its principal (role -> ``User:name``); ``kafka`` must be allowed to."""
    bindings = [
        binding
        for role, principal in principals.items()
        for binding in role_acls(role, principal, topics, consumer_group, sink_group)
    ]
    admin = AdminClient(kafka.client_config())  # kept until the futures settle: they die with it
    for future in admin.create_acls(bindings, request_timeout=30).values():
        future.result()
    # The brokers apply ACLs a moment after the controller accepted them; a client refused meanwhile would not ask
    # again, so return only once they show them all.
    everything = AclBindingFilter(
        ResourceType.ANY, None, ResourcePatternType.ANY, None, None, AclOperation.ANY, AclPermissionType.ANY
    )
    deadline = time.monotonic() + timeout_s
    while not set(bindings) <= set(admin.describe_acls(everything, request_timeout=10).result()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the brokers did not show the new ACLs within {timeout_s:.0f} s")
        time.sleep(0.2)


# Longest a configuration record (a pool, an experiment, a rollout decision) is retried before it counts as refused:
# shorter than the flush's wait, so a record the broker did not take has failed by then, never to arrive later.
CONFIGURATION_DELIVERY_MS = 20_000


def publish_configuration(kafka: KafkaSettings, topic: str, records: Sequence[tuple[str, bytes | None]]) -> None:
    """Publish ``records`` (key, value; None deletes the key) to ``topic`` in their order, and return once the broker
    took every one; raises naming the topic and the broker's reason otherwise."""
    failures: list[KafkaError] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error)

    producer = Producer(
        kafka.client_config() | {"enable.idempotence": True, "message.timeout.ms": CONFIGURATION_DELIVERY_MS}
    )
    for key, value in records:
        producer.produce(topic, value, key.encode(), on_delivery=delivered)
    if producer.flush(CONFIGURATION_DELIVERY_MS / 1000 + 10) or failures:
        why = failures[0].str() if failures else f"not acknowledged within {CONFIGURATION_DELIVERY_MS / 1000:g} s"
        raise TimeoutError(f"the broker did not take the records for {topic}: {why}")


class TopicMirror:
    """The latest value of each key on a compacted topic, kept up to date by a thread of its own that tails the
    topic from its start (tombstones delete): ``data`` is the mirror. A worker's second global table in Faust's
    fetch loop stalled its agents now and then (two tables of configuration beside the stage's own), and a change
    read there also waits behind the requests already fetched; this reader does neither."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.data: dict[bytes, bytes] = {}
        self._consumer = assigned_consumer(kafka)
        self._topic = topic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tail, name=f"mirror-{topic}", daemon=True)

    def start(self) -> TopicMirror:
        self._thread.start()
        return self

    def _tail(self) -> None:
        assign_from_start(self._consumer, self._topic)
        while not self._stop.is_set():
            for message in self._consumer.consume(100, timeout=0.2):
                if message.error() or message.key() is None:
                    continue
                if message.value() is None:
                    self.data.pop(message.key(), None)
                else:
                    self.data[message.key()] = message.value()
        self._consumer.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def read_compacted(kafka: KafkaSettings, topic: str, wait_s: float = 10.0) -> dict[str, bytes]:
    """The latest value of each key on ``topic`` (a compacted topic of configuration), read to its end now; keys
    whose latest record is a tombstone are left out, and a topic not made yet holds none."""
    latest = {key.decode(): value for key, value in read_to_end(kafka, topic, wait_s) if key is not None}
    return {key: value for key, value in latest.items() if value is not None}


def read_to_end(kafka: KafkaSettings, topic: str, wait_s: float = 10.0) -> list[tuple[bytes | None, bytes | None]]:
    """Every record on ``topic`` from its start to its end now, as (key, value), each partition's in its order; a
    topic not made yet holds none."""
    consumer = assigned_consumer(kafka)
    try:
        found = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            return []
        deadline = time.monotonic() + wait_s
        ends = {}
        for partition in found.partitions:
            low, high = _watermarks(consumer, TopicPartition(topic, partition), deadline)
            if high > low:
                ends[partition] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        records: list[tuple[bytes | None, bytes | None]] = []
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {wait_s:.0f} s")
            for message in consumer.consume(500, timeout=0.2):
                if message.error():
                    continue
                records.append((message.key(), message.value()))
                if message.offset() >= ends.get(message.partition(), 0) - 1:
                    ends.pop(message.partition(), None)
        return records
    finally:
        consumer.close()


def _watermarks(consumer: Consumer, partition: TopicPartition, deadline: float) -> tuple[int, int]:
    """A partition's low and high offsets, asked again while its leader is elected (a topic just made)."""
    while True:
        try:
            return consumer.get_watermark_offsets(partition, timeout=10)
        except KafkaException:  # librdkafka does not mark NOT_LEADER_FOR_PARTITION retriable here
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


SCAN_LIMIT_S = 60.0  # longest a scan to the end of a topic reads


def assigned_consumer(kafka: KafkaSettings) -> Consumer:
    """A consumer for reads of one's own (replies, scans, usage reports): its partitions are assigned, so it joins no
    group and commits nothing; fetches return within 10 ms."""
    return Consumer(
        kafka.client_config()
        | {
            "group.id": f"pixelpipe-reader-{uuid.uuid4().hex}",  # assigned, never subscribed: nothing is committed
            "enable.auto.commit": False,
            "auto.offset.reset": "latest",
            "fetch.wait.max.ms": 10,
        }
    )


def find_event(
    kafka: KafkaSettings,
    topic: str,
    key: str,
    since_ms: int,
    until_monotonic: float | None,
    stop: threading.Event | None = None,
) -> bytes | None:
    """The value of the first message keyed ``key`` (a request id) on ``topic`` since ``since_ms``: read to the
    current end when ``until_monotonic`` is None, else tailed until then. Every partition is read (from the offset of
    that time), so it does not matter which partitioner the producer used; the cost is the traffic since
    ``since_ms``, and only keys are compared."""
    consumer = assigned_consumer(kafka)
    wanted_key = key.encode()
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        wanted = [TopicPartition(topic, p, since_ms) for p in partitions]
        start = consumer.offsets_for_times(wanted, timeout=10)
        ends = {}
        assignment = []
        for tp in start:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
            offset = tp.offset if tp.offset >= 0 else high  # no message since then: start at the end
            if until_monotonic is None and offset >= high:
                continue
            ends[tp.partition] = high
            assignment.append(TopicPartition(topic, tp.partition, offset))
        if not assignment:
            return None
        consumer.assign(assignment)
        scan_until = time.monotonic() + SCAN_LIMIT_S
        while True:
            if until_monotonic is None and time.monotonic() > scan_until:
                log.warning("scan stopped", extra={"topic": topic, "key": key})
                return None
            if stop is not None and stop.is_set():
                return None
            if until_monotonic is not None and time.monotonic() > until_monotonic:
                return None
            for message in consumer.consume(500, timeout=0.2):
                if message.error():
                    continue
                if message.key() == wanted_key:
                    return message.value()
                if until_monotonic is None and message.offset() >= ends[message.partition()] - 1:
                    ends.pop(message.partition(), None)
            if until_monotonic is None and not ends:
                return None
    finally:
        consumer.close()
