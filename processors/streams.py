"""The worker's consumer: one librdkafka consumer in the worker's group feeds each agent's stream, in takes.

A poll thread fetches (librdkafka fetches and decompresses on its own threads, outside the GIL) and hands each
message to its topic's ``Source``; an agent takes up to N of them, or what came in a time window
(``WorkerConsumer.takes``). Offsets are committed only for acknowledged takes (``acknowledge``): an agent
acknowledges a take once everything it emitted was acknowledged by the broker, take after take in order, so a
partition's committed offset never passes unfinished work, and a crash, a stop or a failed send loses nothing.

Partitions move with the cooperative-sticky assignor, so a worker joining or leaving moves only the partitions that
change owner. Before giving one up the worker stops taking from it, waits (up to ``REVOKE_WAIT_S``) for the takes in
flight that hold its messages, and commits them, so the next owner starts where this one finished. A take still
unfinished then is not committed here: the next owner renders it again, and its result and metric ids, derived from
the request id, are deduplicated downstream.

A source holding ``capacity`` messages pauses its partitions and resumes them once half are taken, so a slow stage
(a GPU render) holds its backlog in Kafka, not in memory, while the other stages go on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, Consumer, KafkaError, Message, TopicPartition

from pixelpipe.core.settings import KafkaSettings
from pixelpipe.processors.stages import Inbound

log = logging.getLogger(__name__)

Partition = tuple[str, int]  # topic, partition
POLL_WAIT_S = 0.1  # longest the poll thread waits for a first message; then it looks for a stop
POLL_BATCH = 1000  # most messages one poll hands over
COMMIT_INTERVAL_S = 1.0  # acknowledged offsets are committed this often (and when partitions go, and at a stop)
REVOKE_WAIT_S = 10.0  # longest a rebalance waits for the takes in flight of the partitions this worker gives up
# Longest a fetch waits at the broker for records: with fetch.min.bytes at 1 the broker answers as soon as one
# record is there, so this bounds only how often an idle consumer asks.
FETCH_MAX_WAIT_MS = 100


def consumer_config(kafka: KafkaSettings, group_id: str, client_id: str) -> dict[str, Any]:
    return kafka.client_config() | {
        "group.id": group_id,
        "client.id": client_id,
        "enable.auto.commit": False,  # offsets of acknowledged takes only
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        # Model calls never hold the poll thread, so a dead worker is noticed in 10 s rather than the default 45 s.
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 3_000,
        "fetch.wait.max.ms": FETCH_MAX_WAIT_MS,
    }


def inbound(message: Message) -> Inbound:
    kind, timestamp_ms = message.timestamp()
    timestamp_s = timestamp_ms / 1000
    return Inbound(
        message.value(),  # type: ignore[arg-type]  # a tombstone's None: dead-lettered as not bytes
        message.key(),
        message.topic() or "",
        message.partition() or 0,
        message.offset() or 0,
        timestamp_s,
        timestamp_s if kind == TIMESTAMP_LOG_APPEND_TIME else None,
        dict(message.headers() or ()),
    )


@dataclass
class Take:
    """Messages taken together from one source, and the partitions they came from: for each, the assignment they
    were taken under and the offset to commit once the take is acknowledged."""

    messages: list[Inbound]
    commits: dict[Partition, tuple[int, int]] = field(default_factory=dict)  # partition: (epoch, next offset)
    counts: collections.Counter[Partition] = field(default_factory=collections.Counter)


class Source:
    """One agent's topic: the messages fetched and not yet taken, each with its partition's epoch."""

    def __init__(self, topic: str, capacity: int) -> None:
        self.topic = topic
        self.capacity = capacity
        self.waiting: collections.deque[tuple[Inbound, int]] = collections.deque()
        self.arrived = asyncio.Event()
        self.paused = False
        self.assigned_since = False  # partitions were assigned since it paused


class WorkerConsumer:
    """Consumes ``sources`` (topic: capacity) in ``group_id`` for a worker's agents; ``run`` polls until ``stop``."""

    def __init__(
        self,
        kafka: KafkaSettings,
        group_id: str,
        client_id: str,
        sources: Mapping[str, int],
        on_assignment: Callable[[bool], None] = lambda _assigned: None,
    ) -> None:
        self.group_id = group_id
        self._consumer = Consumer(consumer_config(kafka, group_id, client_id) | {"on_commit": _log_failed_commit})
        self._sources = {topic: Source(topic, capacity) for topic, capacity in sources.items()}
        self._on_assignment = on_assignment
        self._lock = threading.Condition()
        self._epochs: dict[Partition, int] = {}  # the partitions assigned, each with its assignment's number
        self._next_epoch = 0
        self._revoking: set[Partition] = set()  # being given up: no more takes from them
        self._in_flight: collections.Counter[Partition] = collections.Counter()  # taken, not yet acknowledged
        self._committable: dict[Partition, int] = {}  # acknowledged offsets not yet committed
        self._closing = False
        self._poll_thread = ThreadPoolExecutor(1, thread_name_prefix="kafka-poll")
        self.stopping = False

    # -- the agents' side (event loop) --------------------------------------------------------------------------
    async def takes(self, topic: str, max_events: int, within_s: float) -> AsyncIterator[Take]:
        """Takes of ``topic``'s messages: up to ``max_events``, or what came within ``within_s`` of the first; ends
        when the worker stops."""
        source = self._sources[topic]
        while not self.stopping:
            if not source.waiting:
                source.arrived.clear()
                await source.arrived.wait()
                continue
            deadline = time.monotonic() + within_s
            while len(source.waiting) < max_events and not self.stopping:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    break
                source.arrived.clear()
                try:
                    await asyncio.wait_for(source.arrived.wait(), remaining_s)
                except TimeoutError:
                    break
            if self.stopping:
                break
            take = self._take(source, max_events)
            if take.messages:
                yield take

    def _take(self, source: Source, max_events: int) -> Take:
        take = Take([])
        with self._lock:
            while source.waiting and len(take.messages) < max_events:
                message, epoch = source.waiting.popleft()
                partition = (message.topic, message.partition)
                if self._epochs.get(partition) != epoch or partition in self._revoking:
                    continue  # given up: its next owner reads it again
                take.messages.append(message)
                take.commits[partition] = (epoch, message.offset + 1)
                take.counts[partition] += 1
            self._in_flight.update(take.counts)
            resume = source.paused and len(source.waiting) <= source.capacity // 2
        if resume:
            source.paused = False
            self._consumer.resume(self._assigned_of(source.topic))
        return take

    def acknowledge(self, take: Take) -> None:
        """The take's effects are done: its offsets may be committed (if its partitions are still this worker's)."""
        with self._lock:
            for partition, (epoch, offset) in take.commits.items():
                if self._epochs.get(partition) == epoch:
                    self._committable[partition] = offset
            self._in_flight.subtract(take.counts)
            self._lock.notify_all()

    def assigned(self) -> list[Partition]:
        """The partitions this worker holds now."""
        with self._lock:
            return sorted(self._epochs)

    def paused(self, topic: str) -> bool:
        """Whether ``topic``'s partitions are paused: its agent has ``capacity`` messages waiting."""
        return self._sources[topic].paused

    def stop(self) -> None:
        """Stop handing out takes; ``run`` returns once it has committed what was acknowledged and left the group."""
        self.stopping = True
        for source in self._sources.values():
            source.arrived.set()

    # -- polling --------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Subscribe and poll until ``stop``; then commit what was acknowledged and leave the group."""
        loop = asyncio.get_running_loop()
        self._consumer.subscribe(
            list(self._sources), on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
        )
        committed_s = time.monotonic()
        try:
            while not self.stopping:
                messages = await loop.run_in_executor(self._poll_thread, self._poll)
                for message, epoch in messages:
                    source = self._sources[message.topic]
                    source.waiting.append((message, epoch))
                    source.arrived.set()
                for source in self._sources.values():
                    if len(source.waiting) >= source.capacity and (not source.paused or source.assigned_since):
                        source.paused, source.assigned_since = True, False
                        self._consumer.pause(self._assigned_of(source.topic))
                if time.monotonic() - committed_s >= COMMIT_INTERVAL_S:
                    self._commit(asynchronous=True)
                    committed_s = time.monotonic()
        finally:
            await loop.run_in_executor(self._poll_thread, self._close)
            self._poll_thread.shutdown()

    def _poll(self) -> list[tuple[Inbound, int]]:
        """On the poll thread: the first message, waiting up to POLL_WAIT_S, and whatever else is there now."""
        first = self._consumer.poll(POLL_WAIT_S)
        if first is None:
            return []
        fetched = [first, *self._consumer.consume(POLL_BATCH - 1, 0)]
        # No lock: only this thread (here and in the rebalance callbacks) changes the epochs.
        return [
            (inbound(m), self._epochs.get((m.topic(), m.partition()), -1))  # type: ignore[arg-type]
            for m in fetched
            if not _failed(m)
        ]

    def _commit(self, asynchronous: bool, partitions: set[Partition] | None = None) -> None:
        with self._lock:
            chosen = [p for p in self._committable if partitions is None or p in partitions]
            offsets = [TopicPartition(*p, self._committable.pop(p)) for p in chosen]
        if offsets:
            try:
                self._consumer.commit(offsets=offsets, asynchronous=asynchronous)
            except Exception as e:  # a lost partition, a broker away: its takes are delivered again
                log.warning("commit failed", extra={"error": str(e), "partitions": len(offsets)})

    def _close(self) -> None:
        with self._lock:
            self._closing = True  # what is still in flight is never acknowledged now: no rebalance waits for it
        self._commit(asynchronous=False)
        self._consumer.close()

    # -- rebalances (on the poll thread, inside poll) --------------------------------------------------------------
    def _assigned(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for p in partitions:
                self._next_epoch += 1
                self._epochs[(p.topic, p.partition)] = self._next_epoch
                # Assigned unpaused: a full source pauses them too at the next round.
                self._sources[p.topic].assigned_since = True
        log.info("partitions assigned", extra={"group": self.group_id, "partitions": _names(partitions)})
        self._on_assignment(True)

    def _revoked(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        deadline = time.monotonic() + REVOKE_WAIT_S
        with self._lock:
            self._revoking |= revoked
            while not self._closing and any(self._in_flight[p] > 0 for p in revoked):
                if not self._lock.wait(deadline - time.monotonic()):
                    log.warning(
                        "partitions revoked with takes in flight; their next owner renders them again",
                        extra={"group": self.group_id, "waited_s": REVOKE_WAIT_S},
                    )
                    break
        self._commit(asynchronous=False, partitions=revoked)
        self._forget(revoked)
        log.info("partitions revoked", extra={"group": self.group_id, "partitions": _names(partitions)})

    def _lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Already another worker's: nothing may be committed for them.
        self._forget({(p.topic, p.partition) for p in partitions})
        log.warning("partitions lost", extra={"group": self.group_id, "partitions": _names(partitions)})

    def _forget(self, partitions: set[Partition]) -> None:
        with self._lock:
            for p in partitions:
                self._epochs.pop(p, None)
                self._committable.pop(p, None)
            self._revoking -= partitions
            assigned = bool(self._epochs)
        self._on_assignment(assigned)

    def _assigned_of(self, topic: str) -> list[TopicPartition]:
        with self._lock:
            return [TopicPartition(t, p) for t, p in self._epochs if t == topic]


def _failed(message: Message) -> bool:
    error = message.error()
    if error is None:
        return False
    if error.code() != KafkaError._PARTITION_EOF:
        log.warning("consumer error", extra={"error": str(error), "topic": message.topic()})
    return True


def _log_failed_commit(error: KafkaError | None, partitions: list[TopicPartition]) -> None:
    if error is not None and error.code() != KafkaError._NO_OFFSET:
        log.warning("commit failed", extra={"error": str(error), "partitions": _names(partitions)})


def _names(partitions: list[TopicPartition]) -> list[str]:
    return [f"{p.topic}[{p.partition}]" for p in partitions]
