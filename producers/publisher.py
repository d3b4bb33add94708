"""The producer SDK: validated ImageRequests to Kafka, with each delivery report surfaced to the caller."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pixelpipe.core.codec import Codec, codec_from_settings
from pixelpipe.core.events import Cancellation, ImageRequest, ImageResult
from pixelpipe.core.experiments import Experiment, load_experiments, stamp_assignments
from pixelpipe.core.settings import KafkaSettings, Settings
from pixelpipe.core.topics import find_event, user_partition
from pixelpipe.core.validation import check_reply_topic, validate_request
from pixelpipe.producers.results import CancelOutcome

PARTITIONS_TTL_S = 60.0  # a topic given more partitions is seen within this long
CANCEL_DELIVERY_TIMEOUT_S = 30.0  # longest a cancellation waits for the broker to take it


@dataclass(frozen=True)
class Delivery:
    """Where the broker stored an event."""

    topic: str
    """The topic the event was written to."""
    partition: int
    """Its partition."""
    offset: int
    """Its offset in that partition."""


class DeliveryError(RuntimeError):
    """The broker did not acknowledge an event; ``retriable`` says whether publishing again may work."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(f"delivery failed: {error.str()} ({error.name()})")
        self.retriable = error.retriable()


def producer_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """Idempotent, acks=all, compressed: no duplicates or reordering on retries, no loss on a broker failover."""
    return (
        kafka.client_config()
        | {
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "zstd",
            "linger.ms": 5,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 500_000,
        }
        | overrides
    )


class PendingDelivery:
    """The outcome of one publish, like a concurrent.futures.Future but cheap enough for 100k events/s.

    Publisher's delivery-report thread settles it; waiters share the publisher's one condition variable.
    """

    __slots__ = ("_callbacks", "_delivery", "_done", "_error", "_settled")

    def __init__(self, settled: threading.Condition) -> None:
        self._settled = settled
        self._done = False
        self._delivery: Delivery | None = None
        self._error: DeliveryError | None = None
        self._callbacks: list[Callable[[PendingDelivery], None]] = []

    def __call__(self, error: KafkaError | None, message: Message) -> None:  # librdkafka's delivery report
        if error is not None:
            self._error = DeliveryError(error)
        else:
            self._delivery = Delivery(message.topic(), message.partition(), message.offset())
        # Under the lock, so a callback added meanwhile on another thread is either run here or sees done.
        with self._settled:
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def done(self) -> bool:
        """True once the broker acknowledged the event or refused it."""
        return self._done

    def add_done_callback(self, callback: Callable[[PendingDelivery], None]) -> None:
        """Call ``callback(self)`` once settled (at once if it already is), on the delivery-report thread."""
        with self._settled:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self)

    def exception(self, timeout: float | None = None) -> DeliveryError | None:
        """The DeliveryError, or None once the event is delivered; waits up to ``timeout`` seconds (None: as long as
        it takes), then raises TimeoutError."""
        with self._settled:
            if not self._settled.wait_for(self.done, timeout):
                raise TimeoutError(f"no delivery report within {timeout}s")
        return self._error

    def result(self, timeout: float | None = None) -> Delivery:
        """Where the broker stored the event, once it acknowledged it; raises its DeliveryError, or TimeoutError
        after ``timeout`` seconds (None: as long as it takes)."""
        error = self.exception(timeout)
        if error is not None:
            raise error
        assert self._delivery is not None
        return self._delivery


class Publisher:
    """Publishes ImageRequests to the requests topic, keyed by request id, each on its user's partition
    (``pixelpipe.core.topics.user_partition``), where moderation keeps that user's limits.

    ``publish`` stamps the user's arm of every active experiment the request does not name yet, validates and
    encodes, then returns a PendingDelivery whose ``result()`` is the Delivery once the broker has acknowledged the
    event, or raises DeliveryError. A background thread serves delivery reports, so callers may wait without
    polling. ``close`` (or leaving the ``with`` block) flushes. Experiments come from ``experiments``, else from
    the experiments file when it exists.
    """

    def __init__(
        self,
        settings: Settings,
        codec: Codec | None = None,
        experiments: Mapping[str, Experiment] | None = None,
        **producer_overrides: Any,
    ) -> None:
        self.topics = settings.topics
        self.limits = settings.limits
        self.kafka = settings.kafka
        self._codec = codec or codec_from_settings(settings.kafka)
        if experiments is None:
            path = Path(settings.experiments.file)
            experiments = load_experiments(path) if path.exists() else {}
        self.experiments = experiments
        self._producer = Producer(producer_config(settings.kafka, **producer_overrides))
        self._partition_counts: dict[str, tuple[int, float]] = {}  # topic: (partitions, when looked up)
        self._closed = threading.Event()
        self._settled = threading.Condition()
        self._poller = threading.Thread(target=self._serve_delivery_reports, name="pixelpipe-delivery", daemon=True)
        self._poller.start()

    def publish(
        self, request: ImageRequest, topic: str | None = None, headers: Mapping[str, bytes] | None = None
    ) -> PendingDelivery:
        """``headers`` ride along as Kafka headers (e.g. ``pixelpipe.core.topics.PARTIAL_IMAGES_HEADER``)."""
        stamp_assignments(request, self.experiments, request.created_at)
        validate_request(request, self.limits)
        check_reply_topic(request.reply_topic, self.topics)
        topic = topic or self.topics.requests
        # Placed by user where moderation counts users' limits: the requests topic.
        partitions = self._partition_count(topic) if topic == self.topics.requests else 0
        partition = user_partition(request.user_id, partitions) if partitions else None
        return self.publish_encoded(request.request_id.encode(), self._codec.encode(request), topic, headers, partition)

    def publish_encoded(
        self,
        key: bytes,
        value: bytes,
        topic: str | None = None,
        headers: Mapping[str, bytes] | None = None,
        partition: int | None = None,
    ) -> PendingDelivery:
        """Send bytes already encoded by the codec, on ``partition`` (else where the key hashes to); waits while the
        local queue is full."""
        if self._closed.is_set():
            raise RuntimeError("publisher is closed")
        pending = PendingDelivery(self._settled)
        while True:
            try:
                self._producer.produce(
                    topic or self.topics.requests,
                    value,
                    key,
                    -1 if partition is None else partition,
                    headers=list(headers.items()) if headers else None,
                    on_delivery=pending,
                )
                return pending
            except BufferError:
                self._producer.poll(0.05)  # queue full: let deliveries drain, then retry
            except KafkaException as e:  # refused at once (a partition of a topic this client may not see)
                pending(e.args[0], None)
                return pending

    def _partition_count(self, topic: str) -> int:
        """``topic``'s partitions, looked up again every PARTITIONS_TTL_S; 0 while the topic cannot be seen (the
        partitioner then places the request, and moderation moves it to its user's partition)."""
        now_s = time.monotonic()
        known = self._partition_counts.get(topic)
        if known is not None and now_s - known[1] < PARTITIONS_TTL_S:
            return known[0]
        try:
            found = self._producer.list_topics(topic, timeout=5).topics.get(topic)
        except KafkaException:
            found = None
        count = len(found.partitions) if found is not None and found.error is None else 0
        self._partition_counts[topic] = (count, now_s)
        return count

    def cancel(
        self, request_id: str, reason: str | None = None, wait_s: float = 10.0, requested_by: str | None = None
    ) -> CancelOutcome:
        """Cancel ``request_id`` and say how it ended. Publishes a Cancellation and waits for the broker to take it
        (DeliveryError if it does not), then reads the results topic from its start for the request's result, for up
        to ``wait_s`` (0: only what is there now). Cancelling a finished or unknown request is harmless: the outcome
        says so."""
        self.publish_cancellation(request_id, reason, requested_by).result(timeout=CANCEL_DELIVERY_TIMEOUT_S)
        started_s = time.monotonic()
        found = find_event(self.kafka, self.topics.results, request_id, 0, started_s + wait_s if wait_s > 0 else None)
        result = None if found is None else self._codec.decode_as(ImageResult, found)
        return CancelOutcome(request_id, result, round(time.monotonic() - started_s, 1))

    def publish_cancellation(
        self, request_id: str, reason: str | None = None, requested_by: str | None = None
    ) -> PendingDelivery:
        """Publish a Cancellation of ``request_id`` to the cancellations topic, keyed by it, without waiting."""
        cancellation = Cancellation(request_id=request_id, reason=reason, requested_by=requested_by)
        return self.publish_encoded(request_id.encode(), self._codec.encode(cancellation), self.topics.cancellations)

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for outstanding deliveries; returns how many are still unacknowledged."""
        return self._producer.flush(timeout_s)

    def close(self, timeout_s: float = 30.0) -> int:
        """Flush for up to ``timeout_s``, then stop the delivery-report thread; returns how many events were still
        unacknowledged. Leaving the ``with`` block closes."""
        remaining = self.flush(timeout_s)
        self._closed.set()
        self._poller.join()
        return remaining

    def _serve_delivery_reports(self) -> None:
        while not self._closed.is_set():
            if self._producer.poll(0.1):
                with self._settled:
                    self._settled.notify_all()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
