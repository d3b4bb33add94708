"""A client's reply topic, read from its end: the results and previews the workers copy there, routed to the waiting
calls by request id.

The workers send a copy of each result to the request's reply topic after the result itself is on the results
topic (best effort: a copy the broker does not take within PIXELPIPE_REPLY_TIMEOUT_MS is dropped), and, before it,
the previews its Kafka header asked for. Each client has its own reply topic, so it reads only the replies to its own
requests; a reply nobody waits for (another process's, on a topic two of them share) is passed over.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from confluent_kafka import Consumer

from pixelpipe.core.codec import Codec, CodecError
from pixelpipe.core.events import ImageResult
from pixelpipe.core.settings import KafkaSettings
from pixelpipe.core.topics import PREVIEW_HEADER, assign_from_end, assigned_consumer

log = logging.getLogger(__name__)
RECENT_RESULTS = 4096  # results kept after they arrived, for a call retried while this client still runs


class Preview(NamedTuple):
    """A preview of an image in progress: the render stage's small JPEG of its latents after a denoising step."""

    index: int
    """Which preview of the request this is, from 0."""
    jpeg: bytes
    """The preview, a JPEG."""


class ReplyListener:
    """Reads the reply topic on a thread, settles each waiting call's future with its ImageResult and hands each
    preview to its request's callback, both on the event loop given to ``start``."""

    def __init__(self, kafka: KafkaSettings, topic: str, codec: Codec) -> None:
        self.topic = topic
        self._kafka = kafka
        self._codec = codec
        self._waiters: dict[str, list[asyncio.Future[ImageResult]]] = {}
        self._recent: OrderedDict[str, ImageResult] = OrderedDict()
        self._previews: dict[str, Callable[[Preview], None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Assign every partition of the reply topic at its current end (so nothing published after this returns
        is missed), then read on a thread."""
        self._loop = loop
        consumer = assigned_consumer(self._kafka)
        assign_from_end(consumer, self.topic)
        self._thread = threading.Thread(target=self._read, args=(consumer,), name="pixelpipe-replies", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def expect(self, request_id: str) -> asyncio.Future[ImageResult]:
        """A future for ``request_id``'s result; register it before publishing."""
        assert self._loop is not None, "start the listener first"
        future: asyncio.Future[ImageResult] = self._loop.create_future()
        with self._lock:
            recent = self._recent.get(request_id)
            if recent is not None:
                future.set_result(recent)
            else:
                self._waiters.setdefault(request_id, []).append(future)
        return future

    def forget(self, request_id: str, future: asyncio.Future[ImageResult]) -> None:
        with self._lock:
            waiters = self._waiters.get(request_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(request_id, None)

    def watch_previews(self, request_id: str, on_preview: Callable[[Preview], None]) -> None:
        """Call ``on_preview`` on the event loop with each preview of ``request_id``'s image until
        ``forget_previews``."""
        with self._lock:
            self._previews[request_id] = on_preview

    def forget_previews(self, request_id: str) -> None:
        with self._lock:
            self._previews.pop(request_id, None)

    def recent(self, request_id: str) -> ImageResult | None:
        """``request_id``'s result if it arrived lately (the last RECENT_RESULTS results)."""
        with self._lock:
            return self._recent.get(request_id)

    def _read(self, consumer: Consumer) -> None:
        try:
            while not self._stop.is_set():
                # poll returns as soon as one reply is there (a batch consume waits to fill or time out, and each
                # call would wait with it), then whatever else came is taken at once.
                first = consumer.poll(0.2)
                if first is None:
                    continue
                for message in [first, *consumer.consume(1000, timeout=0)]:
                    if message.error():
                        continue
                    preview = dict(message.headers() or ()).get(PREVIEW_HEADER)
                    if preview is not None:
                        self._preview(message.key(), preview, message.value())
                        continue
                    try:
                        result = self._codec.decode_as(ImageResult, message.value())
                    except CodecError as e:
                        log.warning("undecodable reply skipped", extra={"reason": str(e)})
                        continue
                    self._arrived(result)
        finally:
            consumer.close()

    def _preview(self, key: bytes | None, index: bytes, value: bytes | None) -> None:
        with self._lock:
            on_preview = self._previews.get((key or b"").decode(errors="replace"))
        if on_preview is not None and value and index.isdigit():
            assert self._loop is not None
            self._loop.call_soon_threadsafe(on_preview, Preview(int(index), value))

    def _arrived(self, result: ImageResult) -> None:
        with self._lock:
            self._recent[result.request_id] = result
            self._recent.move_to_end(result.request_id)
            while len(self._recent) > RECENT_RESULTS:
                self._recent.popitem(last=False)
            waiters = self._waiters.pop(result.request_id, [])
        assert self._loop is not None
        for future in waiters:
            self._loop.call_soon_threadsafe(_settle, future, result)


def _settle(future: asyncio.Future[ImageResult], result: ImageResult) -> None:
    if not future.done():
        future.set_result(result)
