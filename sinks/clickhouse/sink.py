"""The ClickHouse sink: ImageResults, StageMetrics and RolloutDecisions from Kafka into their tables, in batches.

A batch closes at `PIXELPIPE_SINK_MAX_BATCH_ROWS` rows or `PIXELPIPE_SINK_MAX_BATCH_WAIT_MS` after its first event,
whichever comes first. It is inserted (one insert per table), its dead letters are acknowledged by the broker, and
only then are the Kafka offsets committed: a crash at any point replays the uncommitted events, and the tables'
ReplacingMergeTree on event_id (read through the *_dedup views) makes the replay count once.

Undecodable events and rows ClickHouse refuses go to the dead-letter topic with the reason; the rest of the batch
is inserted and the sink carries on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import Counter, Histogram

from pixelpipe.core.clickhouse import InsertRefused
from pixelpipe.core.codec import Codec, CodecError, codec_from_settings
from pixelpipe.core.events import DeadLetter, Event, ImageResult, RolloutDecision, StageMetric
from pixelpipe.core.settings import KafkaSettings, SinkSettings, TopicSettings
from pixelpipe.core.telemetry import DEAD_LETTERS, RETRIES, Health
from pixelpipe.core.topics import ensure_topics
from pixelpipe.sinks.clickhouse.rows import (
    METRIC_COLUMNS,
    RESULT_COLUMNS,
    ROLLOUT_COLUMNS,
    Row,
    metric_row,
    result_row,
    rollout_row,
)

log = logging.getLogger(__name__)

STAGE = "clickhouse-sink"
LOG_INTERVAL_S = 10.0

EVENTS_IN = Counter("pixelpipe_sink_events_in_total", "Messages the sink consumed, by topic.", ["topic"])
ROWS = Counter("pixelpipe_sink_rows_total", "Rows inserted into ClickHouse, by table.", ["table"])
BATCH_ROWS = Histogram(
    "pixelpipe_sink_batch_rows",
    "Messages in each committed batch.",
    buckets=(1, 10, 100, 1_000, 5_000, 10_000, 50_000, 100_000),
)
INSERT_SECONDS = Histogram(
    "pixelpipe_sink_insert_seconds",
    "Time of one insert into ClickHouse (retries included), by table.",
    ["table"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)
COMMITS = Counter("pixelpipe_sink_commits_total", "Offset commits after an insert.")


class Warehouse(Protocol):
    """What the sink needs of a backend: ServerClient (clickhouse-driver) or ChdbClient (chDB), from core.clickhouse."""

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        """Inserts all rows or raises InsertRefused having inserted none."""
        ...


class SinkError(RuntimeError):
    """The sink cannot go on without losing events (e.g. a dead letter the broker did not acknowledge)."""


@dataclass(frozen=True)
class _Route:
    event_type: type[Event]
    table: str
    columns: tuple[str, ...]
    to_row: Callable[[Any], Row]
    keyed_by_request: bool = True  # the topic's keys are request ids (the rollouts topic's are experiment keys)


@dataclass
class _Pending:
    """Rows of one table waiting for the next insert, each with the message it came from."""

    rows: list[Row] = field(default_factory=list)
    sources: list[Message] = field(default_factory=list)


@dataclass
class SinkStats:
    rows: int = 0
    batches: int = 0
    dead_letters: int = 0
    rows_by_table: dict[str, int] = field(default_factory=dict)


def consumer_config(kafka: KafkaSettings, sink: SinkSettings) -> dict[str, Any]:
    return kafka.client_config() | {
        "group.id": sink.group_id,
        "enable.auto.commit": False,  # offsets are committed by hand, after the insert
        "auto.offset.reset": "earliest",  # a new sink group loads the topics from their start
        "session.timeout.ms": 6000,  # a killed sink's partitions move on after 6 s, not the default 45 s
        "fetch.max.bytes": 64 * 1024 * 1024,
        "queued.max.messages.kbytes": 256 * 1024,
    }


class ClickHouseSink:
    """Consumes the results, metrics and rollouts topics into `results`, `stage_metrics` and `rollout_decisions`.

    `run()` returns when `stop` is set (the CLI sets it on SIGTERM and SIGINT) or after `max_idle_s` without events
    (benchmarks and tests; None runs on), having inserted and committed everything consumed.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        sink: SinkSettings,
        warehouse: Warehouse,
        *,
        max_idle_s: float | None = None,
        consumer_overrides: dict[str, Any] | None = None,
        health: Health | None = None,
    ) -> None:
        self.topics = topics
        self.health = health or Health(float("inf"))
        self.sink = sink
        self.max_idle_s = max_idle_s
        self.stats = SinkStats()
        self._warehouse = warehouse
        self._codec: Codec = codec_from_settings(kafka)
        self._routes = {
            topics.results: _Route(ImageResult, "results", RESULT_COLUMNS, result_row),
            topics.metrics: _Route(StageMetric, "stage_metrics", METRIC_COLUMNS, metric_row),
            topics.rollouts: _Route(
                RolloutDecision, "rollout_decisions", ROLLOUT_COLUMNS, rollout_row, keyed_by_request=False
            ),
        }
        self._kafka = kafka
        self._pending = {route.table: _Pending() for route in self._routes.values()}
        self._dead_letters: list[tuple[Message, str, str | None]] = []
        self._uncommitted = 0  # messages consumed since the last commit, inserted or dead-lettered
        self._batch_started: float | None = None
        self._last_event: float | None = None  # None until partitions are assigned: joining takes seconds
        self._consumer = Consumer(consumer_config(kafka, sink) | (consumer_overrides or {}))
        self._producer = Producer(kafka.client_config() | {"enable.idempotence": True, "acks": "all"})

    def run(self, stop: threading.Event | None = None) -> SinkStats:
        stop = stop or threading.Event()
        # The rollouts topic is written only once a rollout starts: made here, so the subscription finds it before.
        ensure_topics(self._kafka, self.topics, [self.topics.rollouts])
        self._consumer.subscribe(list(self._routes), on_assign=self._assigned, on_revoke=self._revoked)
        last_log = time.monotonic()
        logged_rows = 0
        log.info("sink started", extra={"topics": list(self._routes), "group_id": self.sink.group_id})
        try:
            while not stop.is_set():
                self.health.beat()
                messages = self._consumer.consume(10_000, timeout=0.2)
                now = time.monotonic()
                for message in messages:
                    self._take(message)
                for topic in {m.topic() for m in messages}:
                    EVENTS_IN.labels(topic).inc(sum(1 for m in messages if m.topic() == topic))
                if messages:
                    self._last_event = now
                    self._batch_started = self._batch_started or now
                if self._batch_started is not None and (
                    self._pending_rows() >= self.sink.max_batch_rows
                    or now - self._batch_started >= self.sink.max_batch_wait_ms / 1000
                ):
                    self._flush()
                if now - last_log >= LOG_INTERVAL_S:
                    rate = (self.stats.rows - logged_rows) / (now - last_log)
                    log.info("sink progress", extra={"rows_per_s": round(rate), **vars(self.stats)})
                    last_log, logged_rows = now, self.stats.rows
                idle = self.max_idle_s
                if idle is not None and self._last_event is not None and now - self._last_event >= idle:
                    break
            self._flush()
        finally:
            # After an error nothing more is committed (close() revokes, and revoking flushes): those events are
            # read again by the next sink.
            self._uncommitted = 0
            self._consumer.close()
            self._producer.flush(10)
        log.info("sink stopped", extra=vars(self.stats))
        return self.stats

    def _assigned(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._last_event = self._last_event or time.monotonic()
        self.health.mark("partitions")
        log.info("partitions assigned", extra={"partitions": len(partitions)})

    def _revoked(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # A revoked partition's events must be inserted and committed before another sink takes it over.
        self._flush()
        log.info("partitions revoked", extra={"partitions": len(partitions)})

    # -- one message -----------------------------------------------------------------------------------------
    def _take(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.fatal():
                raise KafkaException(error)
            log.warning("consumer error", extra={"error": error.str(), "code": error.name()})
            return
        self._uncommitted += 1
        route = self._routes[message.topic()]
        try:
            event = self._codec.decode_as(route.event_type, message.value() or b"")
            row = route.to_row(event)
        except (CodecError, KeyError, TypeError, ValueError) as e:
            # The key is the request id by contract; trusted only when the event itself could not be read.
            key = message.key()
            request_id = key.decode("utf-8", "replace") if key and route.keyed_by_request else None
            self._dead_letter(message, f"{route.event_type.schema_name} does not decode: {e}", request_id)
            return
        pending = self._pending[route.table]
        pending.rows.append(row)
        pending.sources.append(message)

    def _pending_rows(self) -> int:
        return sum(len(pending.rows) for pending in self._pending.values())

    # -- one batch -------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Insert what is pending, send its dead letters, then commit: the order that loses nothing."""
        if not self._uncommitted:
            return
        started = time.monotonic()
        for table, pending in self._pending.items():
            if pending.rows:
                route = next(r for r in self._routes.values() if r.table == table)
                inserted = self._insert(route, pending.rows, pending.sources)
                ROWS.labels(table).inc(inserted)
                self.stats.rows += inserted
                self.stats.rows_by_table[table] = self.stats.rows_by_table.get(table, 0) + inserted
        self._send_dead_letters()
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as e:
            # The events are in ClickHouse either way. Nothing to commit (a revoked assignment, say) is harmless; so
            # is a commit the broker could not take (restarting, coordinator moving): the next batch's commit covers
            # these offsets, or they are read again and the *_dedup views count them once.
            if e.args[0].fatal():
                raise
            if e.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("commit failed, carrying on", extra={"error": e.args[0].str(), "code": e.args[0].name()})
        log.debug(
            "batch committed",
            extra={"messages": self._uncommitted, "seconds": round(time.monotonic() - started, 3)},
        )
        self.stats.batches += 1
        COMMITS.inc()
        BATCH_ROWS.observe(self._uncommitted)
        self._pending = {table: _Pending() for table in self._pending}
        self._uncommitted = 0
        self._batch_started = None

    def _insert(self, route: _Route, rows: list[Row], sources: list[Message]) -> int:
        """Insert rows; when ClickHouse refuses the batch, bisect it down to the refused rows. Returns rows inserted."""
        try:
            self._insert_retrying(route, rows)
            return len(rows)
        except InsertRefused as e:
            if len(rows) == 1:
                fields = dict(zip(route.columns, rows[0], strict=True))
                event_id, request_id = fields["event_id"], fields.get("request_id")
                log.warning(
                    "row refused by ClickHouse",
                    extra={"event_id": event_id, "table": route.table, "reason": str(e), **_where(sources[0])},
                )
                reason = f"ClickHouse refused event {event_id} for {route.table}: {e}"
                self._dead_letter(sources[0], reason, request_id, "refused")
                return 0
        half = len(rows) // 2
        return self._insert(route, rows[:half], sources[:half]) + self._insert(route, rows[half:], sources[half:])

    def _insert_retrying(self, route: _Route, rows: list[Row]) -> None:
        """One insert; a failure that says nothing about the rows (ClickHouse restarting, the connection reset) is
        retried with backoff for up to `insert_retry_s`, since nothing is committed until it succeeds."""
        deadline = time.monotonic() + self.sink.insert_retry_s
        delay_s = 0.5
        while True:
            self.health.beat()  # waiting for ClickHouse is not a blocked loop
            try:
                with INSERT_SECONDS.labels(route.table).time():
                    self._warehouse.insert(route.table, route.columns, rows)
                return
            except InsertRefused:
                raise
            except Exception as e:
                if time.monotonic() + delay_s > deadline:
                    raise
                log.warning(
                    "insert failed, retrying",
                    extra={"table": route.table, "rows": len(rows), "error": repr(e), "retry_in_s": delay_s},
                )
                RETRIES.labels("clickhouse insert").inc()
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)

    # -- dead letters ----------------------------------------------------------------------------------------
    def _dead_letter(self, message: Message, reason: str, request_id: str | None, label: str = "undecodable") -> None:
        self._dead_letters.append((message, reason, request_id))
        DEAD_LETTERS.labels(STAGE, label).inc()

    def _send_dead_letters(self) -> None:
        if not self._dead_letters:
            return
        failures: list[KafkaError] = []

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                failures.append(error)

        for message, reason, request_id in self._dead_letters:
            key = message.key()
            log.warning("dead letter", extra={"reason": reason, **_where(message)})
            letter = DeadLetter.of(
                value=message.value() or b"",
                key=key,
                topic=message.topic(),
                partition=message.partition(),
                offset=message.offset(),
                reason=reason,
                stage=STAGE,
                request_id=request_id,
            )
            self._producer.produce(self.topics.dead_letter, self._codec.encode(letter), key, on_delivery=delivered)
        # The offsets of these events are committed next, so the dead letters must be stored first.
        if self._producer.flush(30) or failures:
            raise SinkError(
                f"the dead-letter topic {self.topics.dead_letter} did not take "
                f"{len(failures) or len(self._dead_letters)} events ({failures[0].str() if failures else 'timeout'}); "
                "not committing offsets, the events will be read again"
            )
        self.stats.dead_letters += len(self._dead_letters)
        self._dead_letters = []


def _where(message: Message) -> dict[str, Any]:
    return {"topic": message.topic(), "partition": message.partition(), "offset": message.offset()}
