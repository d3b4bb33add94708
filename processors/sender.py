"""Sending a take's emissions with librdkafka (confluent-kafka), and awaiting the broker's acknowledgement of all.

librdkafka batches, encodes and sends on its own threads, outside the GIL; each event costs one ``produce`` call
and one delivery report (Faust's ``topic.send``, used before, cost tens of microseconds of Python per event on the
event loop, and a request emits five events). The agents acknowledge a take's inputs only after ``send_all``
returned, that is after the broker acknowledged every event the take emits.

Copies of results for requests' reply topics go through a second producer whose messages expire after the reply
timeout, and nothing waits for them: a reply topic that does not exist or refuses loses only its copy, never holds
the stage's own events, and the result itself is on the results topic.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pixelpipe.core.settings import KafkaSettings
from pixelpipe.processors.messages import Emission

log = logging.getLogger(__name__)

# Idempotent with acks from every in-sync replica: no loss, no duplicates or reordering on retries. Java's murmur2
# partitioner, as Faust's producer used before, so keys keep their partitions. A short linger: the events of a take are
# produced together anyway, and each millisecond here is added to every request's latency.
PRODUCER_CONFIG: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "partitioner": "murmur2_random",
    "linger.ms": 1,
}
REPLY_PRODUCER_CONFIG: dict[str, Any] = {"acks": "all", "partitioner": "murmur2_random", "linger.ms": 1}


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
    """librdkafka producers for a worker's agents (one for the pipeline's events, one for reply copies); a thread
    serves their delivery reports."""

    def __init__(self, kafka: KafkaSettings, reply_timeout_ms: int) -> None:
        self._producer = Producer(kafka.client_config() | PRODUCER_CONFIG)
        self._replies = Producer(
            kafka.client_config() | REPLY_PRODUCER_CONFIG | {"message.timeout.ms": max(1, reply_timeout_ms)}
        )
        self._reply_timeout_s = reply_timeout_ms / 1000
        self._closed = threading.Event()
        self._reports = threading.Thread(target=self._serve_delivery_reports, name="delivery-reports", daemon=True)
        self._reports.start()

    async def send_all(self, emissions: Sequence[Emission]) -> None:
        """Send ``emissions`` and return once the broker acknowledged every one but the reply copies, which are
        sent after the rest and not awaited; raises KafkaException for the first that failed (after librdkafka's
        retries)."""
        events = [e for e in emissions if not e.reply]
        if events:
            delivery = TakeDelivery(asyncio.get_running_loop(), len(events))
            for emission in events:
                await self._produce(self._producer, emission, delivery)
            await delivery.settled
        for reply in (e for e in emissions if e.reply):
            try:
                await self._produce(self._replies, reply, _log_dropped_reply)
            except KafkaException as e:  # refused at once, as an illegal topic name is
                _log_dropped_reply(e.args[0], None, reply)

    def send_preview(self, topic: str, key: bytes, value: bytes, headers: Mapping[str, bytes]) -> None:
        """A preview of an image in progress to a reply topic, from the model thread: best effort like the reply
        copies (same producer, so a request's previews come before its result's copy), never awaited."""
        try:
            self._replies.produce(topic, value, key, headers=list(headers.items()), on_delivery=_log_dropped_reply)
        except (BufferError, KafkaException) as e:
            log.warning("preview dropped", extra={"topic": topic, "error": str(e)})

    @staticmethod
    async def _produce(producer: Producer, emission: Emission, on_delivery: Any) -> None:
        headers = list(emission.headers.items()) or None
        while True:
            try:
                producer.produce(
                    emission.topic,
                    emission.value,
                    emission.key,
                    -1 if emission.partition is None else emission.partition,
                    headers=headers,
                    on_delivery=on_delivery,
                )
                return
            except BufferError:  # librdkafka's queue is full: let deliveries drain without blocking the loop
                await asyncio.sleep(0.005)

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (inputs whose events are not delivered stay unacknowledged, to be redelivered),
        then stop serving delivery reports."""
        self._producer.flush(timeout_s)
        self._replies.flush(min(timeout_s, self._reply_timeout_s))
        self._closed.set()
        self._reports.join()

    def _serve_delivery_reports(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)
            self._replies.poll(0)  # reply reports only log, so they may wait for the next round


def _log_dropped_reply(error: KafkaError | None, message: Message | None, reply: Emission | None = None) -> None:
    if error is None:
        return
    topic = reply.topic if reply else message.topic() if message else None
    key = reply.key if reply else message.key() if message else None
    log.warning("reply dropped", extra={"topic": topic, "request_id": (key or b"").decode(), "error": str(error)})
