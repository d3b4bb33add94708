"""Kafka faked at the client's boundary, for unit tests of the client for upstream services and of the gateway
built on it: the publisher records what is published, and a worker stand-in answers on the reply topic's consumer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ImageRequest, ImageResult
from pixelpipe.core.topics import PREVIEW_HEADER
from pixelpipe.producers import PendingDelivery
from pixelpipe.producers import client as client_module
from pixelpipe.producers import replies as replies_module


class FakeMessage:
    def __init__(self, value: bytes, key: bytes | None = None, headers: list | None = None) -> None:
        self._value, self._key, self._headers = value, key, headers

    def error(self):
        return None

    def value(self):
        return self._value

    def key(self):
        return self._key

    def headers(self):
        return self._headers

    def topic(self):
        return "t"

    def partition(self):
        return 0

    def offset(self):
        return 0


class FakeConsumer:
    """The reply topic as the listener's consumer reads it: whatever the fake worker put there, in order."""

    def __init__(self) -> None:
        self.messages: queue.Queue[FakeMessage] = queue.Queue()

    def poll(self, timeout: float) -> FakeMessage | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def consume(self, count: int, timeout: float) -> list[FakeMessage]:
        taken = []
        while len(taken) < count and not self.messages.empty():
            taken.append(self.messages.get_nowait())
        return taken

    def close(self) -> None:
        pass


class FakeBroker:
    """Records what the client publishes; ``worker``, when set, answers each request with the messages it returns
    (on the reply topic, in order); ``refusal`` refuses every publish."""

    def __init__(self) -> None:
        self.consumer = FakeConsumer()
        self.codec = Codec()
        self.published: list[tuple[ImageRequest, dict[str, bytes] | None]] = []
        self.cancellations: list[tuple[str, str | None, str | None]] = []
        self.worker: Callable[[ImageRequest], list[FakeMessage]] | None = None
        self.refusal: KafkaError | None = None
        self.changed = threading.Condition()

    # the Publisher's side
    def publish(self, request: ImageRequest, topic=None, headers=None) -> PendingDelivery:
        pending = self._settled(self.refusal)
        if self.refusal is None:
            with self.changed:
                self.published.append((request, headers))
                self.changed.notify_all()
            for message in self.worker(request) if self.worker else []:
                self.consumer.messages.put(message)
        return pending

    def publish_cancellation(self, request_id, reason=None, requested_by=None) -> PendingDelivery:
        with self.changed:
            self.cancellations.append((request_id, reason, requested_by))
            self.changed.notify_all()
        return self._settled(None)

    def close(self, timeout_s: float = 30.0) -> int:
        return 0

    def _settled(self, error: KafkaError | None) -> PendingDelivery:
        pending = PendingDelivery(threading.Condition())
        pending(error, FakeMessage(b""))
        return pending

    # the worker's side
    def result(self, request_id: str, status: str = "SUCCEEDED") -> FakeMessage:
        answer = ImageResult(event_id=f"e-{request_id}", request_id=request_id, status=status, user_id="u", model="m")
        return FakeMessage(self.codec.encode(answer), request_id.encode())

    def preview(self, request_id: str, index: int, jpeg: bytes) -> FakeMessage:
        return FakeMessage(jpeg, request_id.encode(), [(PREVIEW_HEADER, str(index).encode())])

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(condition, timeout_s)


def faked_kafka(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    """Kafka faked for the client (``pixelpipe.producers.client``) and its listener: no topic is made, the publisher
    is the broker's, and the reply topic's consumer reads what its worker sends."""
    fake = FakeBroker()
    monkeypatch.setattr(client_module, "ensure_topics", lambda *args, **kwargs: [])
    monkeypatch.setattr(client_module, "Publisher", lambda settings, codec: fake)
    monkeypatch.setattr(replies_module, "assigned_consumer", lambda kafka: fake.consumer)
    monkeypatch.setattr(replies_module, "assign_from_end", lambda consumer, topic: None)
    return fake


def no_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call gives up at its deadline, not RESULT_GRACE_S after."""
    monkeypatch.setattr(client_module, "RESULT_GRACE_S", 0.0)
