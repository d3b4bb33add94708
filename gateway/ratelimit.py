"""Each key's rate limit: a token bucket per key in each gateway instance, shared across instances through Kafka.

Every ``PIXELPIPE_GATEWAY_USAGE_SYNC_S`` seconds each instance publishes the calls it admitted per key since its
last report to ``PIXELPIPE_TOPIC_GATEWAY_USAGE``, and charges the other instances' reports to its own buckets
(tokens may go below zero, so a key that spent its budget elsewhere waits here too). What one instance has not
seen yet is at most the calls the others admitted within the sync delay ``d`` (the interval plus Kafka's
latency), each of them bounded by its own bucket, so over ``T`` seconds with ``k`` instances a key gets at most
about ``rate*T + burst + (k-1)*(burst + rate*d)`` calls (one instance alone: ``rate*T + burst``; k unshared
buckets: ``k*(rate*T + burst)``). When the sync fails (the broker down), each instance keeps limiting alone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

from pixelpipe.core.settings import KafkaSettings, TopicSettings
from pixelpipe.core.topics import assign_from_end, assigned_consumer, ensure_topics
from pixelpipe.gateway.keys import KeyStore

log = logging.getLogger(__name__)
WARNING_INTERVAL_S = 60.0  # a broker that is down fails every sync: one warning a minute says so
POLL_S = 0.2  # longest the thread waits for a report before it looks at the clock and the stop flag again
REPORT_TIMEOUT_MS = 10_000  # a report older than this would charge calls whose tokens have long refilled: dropped


class TokenBuckets:
    """``burst`` calls at once per key, refilled at ``per_minute`` a minute; ``take`` says how long to wait.

    The calls this instance admitted are counted until ``admitted`` hands them over (for the other instances);
    ``charge`` counts calls admitted elsewhere."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._admitted: Counter[str] = Counter()

    def take(self, key: str, per_minute: int, burst: int) -> float:
        """0 when a call may go now (and it is counted), else the seconds until one may."""
        rate = per_minute / 60.0
        with self._lock:
            tokens, now = self._refilled(key, rate, burst)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                self._admitted[key] += 1
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate

    def charge(self, key: str, calls: int, per_minute: int, burst: int) -> None:
        """Take ``calls`` tokens that other instances spent, down below zero if need be."""
        with self._lock:
            tokens, now = self._refilled(key, per_minute / 60.0, burst)
            self._buckets[key] = (tokens - calls, now)

    def admitted(self) -> dict[str, int]:
        """The calls admitted per key since the last time this was asked, and resets the count."""
        with self._lock:
            counts, self._admitted = dict(self._admitted), Counter()
            return counts

    def _refilled(self, key: str, rate: float, burst: int) -> tuple[float, float]:
        now = self._clock()
        tokens, at = self._buckets.get(key, (float(burst), now))
        return min(float(burst), tokens + (now - at) * rate), now


class UsageSync:
    """Shares the buckets' calls with the other gateway instances: a thread publishes this instance's admitted
    calls every ``interval_s`` and charges theirs, read from the topic's end, to ``buckets``. A report names keys
    by id only; each key's rate and burst come from this instance's ``keys`` (an id it does not know is skipped)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        instance_id: str,
        buckets: TokenBuckets,
        keys: KeyStore,
        interval_s: float,
    ) -> None:
        self.topic = topics.gateway_usage
        # Unique per process: two processes given one instance id must still charge each other.
        self.sender = f"{instance_id}-{uuid.uuid4().hex[:8]}"
        self._kafka = kafka
        self._topics = topics
        self._buckets = buckets
        self._keys = keys
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_at = float("-inf")

    def start(self) -> None:
        """Make the topic if need be and assign it at its end (a new instance charges no old history), then sync
        on a thread."""
        ensure_topics(self._kafka, self._topics, [self.topic], partitions=1)
        consumer = assigned_consumer(self._kafka)
        assign_from_end(consumer, self.topic)
        producer = Producer(self._kafka.client_config() | {"linger.ms": 0, "message.timeout.ms": REPORT_TIMEOUT_MS})
        self._thread = threading.Thread(target=self._run, args=(consumer, producer), name="gateway-usage", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread after a last report, so the calls admitted since the previous one still count."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def _run(self, consumer: Consumer, producer: Producer) -> None:
        next_report = time.monotonic() + self._interval_s
        try:
            while not self._stop.is_set():
                try:
                    first = consumer.poll(min(POLL_S, max(0.0, next_report - time.monotonic())))
                    if first is not None:
                        for message in [first, *consumer.consume(1000, timeout=0)]:
                            self._charge(message)
                    if time.monotonic() >= next_report:
                        next_report = time.monotonic() + self._interval_s
                        self._report(producer)
                    producer.poll(0)
                except Exception as e:  # the sync must never stop: the buckets limit alone meanwhile
                    self._warn("usage sync failed", e)
            self._report(producer)
            producer.flush(5)
        finally:
            consumer.close()

    def _report(self, producer: Producer) -> None:
        calls = self._buckets.admitted()
        if not calls:
            return
        value = json.dumps({"instance": self.sender, "calls": calls}).encode()
        try:
            producer.produce(self.topic, value, self.sender.encode(), on_delivery=self._delivered)
        except (BufferError, KafkaException) as e:  # a full queue: these calls go uncharged elsewhere
            self._warn("usage report not sent", e)

    def _delivered(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            self._warn("usage report not delivered", error)

    def _charge(self, message: Message) -> None:
        if message.error():
            self._warn("usage topic not read", message.error())
        else:
            self.charge_report(message.value() or b"")

    def charge_report(self, value: bytes) -> None:
        """Charge the calls of another instance's report to the buckets; this instance's own are already counted."""
        try:
            report = json.loads(value)
            sender, calls = report["instance"], report["calls"]
            if sender == self.sender:
                return
            keys = self._keys.keys()
            for key_id, count in calls.items():
                entry = keys.get(key_id)
                if entry is not None and isinstance(count, int) and count > 0:
                    self._buckets.charge(key_id, count, entry.requests_per_minute, entry.burst)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError covers an unreadable keys file
            self._warn("usage report skipped", e)

    def _warn(self, what: str, error: object) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARNING_INTERVAL_S:
            self._warned_at = now
            log.warning(what, extra={"topic": self.topic, "error": str(error)})
