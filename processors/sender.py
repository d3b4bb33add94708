"""Sending a take's emissions with librdkafka (confluent-kafka), and awaiting the broker's acknowledgement of all.

Faust's own ``topic.send`` costs tens of microseconds of Python per event on the event loop (a Topic, a
FutureMessage, aiokafka's record building and one produce request per await), and a request emits five events.
librdkafka batches, encodes and sends on its own threads, outside the GIL; here each event costs one ``produce``
call and one delivery report. The agents still consume with Faust, and still acknowledge a take's inputs only after
``send_all`` returned, that is after the broker acknowledged every event the take emits.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pixelpipe.core.settings import KafkaSettings
from pixelpipe.processors.stages import Emission

# Idempotent with acks from every in-sync replica: no loss, no duplicates or reordering on retries. Java's murmur2
# partitioner, as Faust's producer used, so keys keep their partitions. A short linger: the events of a take are
# produced together anyway, and each millisecond here is added to every request's latency.
PRODUCER_CONFIG: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "partitioner": "murmur2_random",
    "linger.ms": 1,
}


class TakeDelivery:
    """The outstanding deliveries of one take; settles its future (on the event loop) when the last is reported."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.loop = loop
        self.remaining = count
        self.error: KafkaError | None = None
        self.settled: asyncio.Future[None] = loop.create_future()

    def __call__(self, error: KafkaError | None, message: Message) -> None:  # on the delivery-report thread
        if error is not None and self.error is None:
            self.error = error
        self.remaining -= 1
        if self.remaining == 0:
            self.loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        if self.settled.done():  # the waiting agent was cancelled
            return
        if self.error is not None:
            self.settled.set_exception(KafkaException(self.error))
        else:
            self.settled.set_result(None)


class EmissionSender:
    """One librdkafka producer for a worker's agents; a thread serves its delivery reports."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self._producer = Producer(kafka.client_config() | PRODUCER_CONFIG)
        self._closed = threading.Event()
        self._reports = threading.Thread(target=self._serve_delivery_reports, name="delivery-reports", daemon=True)
        self._reports.start()

    async def send_all(self, emissions: Sequence[Emission]) -> None:
        """Send ``emissions`` and return once the broker acknowledged every one; raises KafkaException for the
        first that failed (after librdkafka's retries)."""
        if not emissions:
            return
        delivery = TakeDelivery(asyncio.get_running_loop(), len(emissions))
        for emission in emissions:
            while True:
                try:
                    self._producer.produce(emission.topic, emission.value, emission.key, on_delivery=delivery)
                    break
                except BufferError:  # librdkafka's queue is full: let deliveries drain without blocking the loop
                    await asyncio.sleep(0.005)
        await delivery.settled

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (inputs whose events are not delivered stay unacknowledged, to be redelivered),
        then stop serving delivery reports."""
        self._producer.flush(timeout_s)
        self._closed.set()
        self._reports.join()

    def _serve_delivery_reports(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)
