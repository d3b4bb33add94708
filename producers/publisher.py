"""The producer SDK: validated ImageRequests to Kafka, with each delivery report surfaced to the caller."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from pixelpipe.config import Settings
from pixelpipe.producers.requests import validate_request
from pixelpipe.schemas.codec import Codec, Record


@dataclass(frozen=True)
class Delivery:
    """Where the broker stored an event."""

    topic: str
    partition: int
    offset: int


class DeliveryError(RuntimeError):
    """The broker did not acknowledge an event; ``retriable`` says whether publishing again may work."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(f"delivery failed: {error.str()} ({error.name()})")
        self.retriable = error.retriable()


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Idempotent, acks=all, compressed: no duplicates or reordering on retries, no loss on a broker failover."""
    return (
        settings.kafka_client_config()
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


class Publisher:
    """Publishes ImageRequests to ``settings.topic_requests`` keyed by request id.

    ``publish`` validates and encodes, then returns a Future that resolves to a Delivery once the broker has
    acknowledged the event, or raises DeliveryError. A background thread serves delivery reports, so callers
    may wait on futures without polling. ``close`` (or leaving the ``with`` block) flushes.
    """

    def __init__(self, settings: Settings, codec: Codec | None = None, **producer_overrides: Any) -> None:
        self.settings = settings
        self._codec = codec or Codec()
        self._producer = Producer(producer_config(settings, **producer_overrides))
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._serve_delivery_reports, name="pixelpipe-delivery", daemon=True)
        self._poller.start()

    def publish(self, request: Record, topic: str | None = None) -> Future[Delivery]:
        validate_request(request, self.settings)
        return self.publish_encoded(request["request_id"].encode(), self._codec.encode("ImageRequest", request), topic)

    def publish_encoded(self, key: bytes, value: bytes, topic: str | None = None) -> Future[Delivery]:
        """Send bytes already encoded by the codec; waits while the local queue is full."""
        if self._closed.is_set():
            raise RuntimeError("publisher is closed")
        future: Future[Delivery] = Future()

        def report(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                future.set_exception(DeliveryError(error))
            else:
                future.set_result(Delivery(message.topic(), message.partition(), message.offset()))

        while True:
            try:
                self._producer.produce(topic or self.settings.topic_requests, value, key, on_delivery=report)
                return future
            except BufferError:
                self._producer.poll(0.05)  # queue full: let deliveries drain, then retry

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for outstanding deliveries; returns how many are still unacknowledged."""
        return self._producer.flush(timeout_s)

    def close(self, timeout_s: float = 30.0) -> int:
        remaining = self.flush(timeout_s)
        self._closed.set()
        self._poller.join()
        return remaining

    def _serve_delivery_reports(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
