"""The client for upstream services: publish a request and await its terminal ImageResult, blocking or in asyncio.

    from pixelpipe.core.settings import Settings
    from pixelpipe.producers import PixelpipeClient

    with PixelpipeClient(Settings.from_env()) as client:
        result = client.generate(prompt="a red fox", model="tiny-sd", user_id="u1")
        png = client.read_image(result.images[0])

Each client has a reply topic of its own, ``<PIXELPIPE_REPLY_TOPIC_PREFIX><name>``, made on start (one partition)
and read from its end on a thread (``replies.ReplyListener``); every request it publishes names that topic, so the
workers copy its result there, and its previews when the call asks for them. A wait that ends without a result (the
request's deadline passed, or the awaiting task was cancelled) cancels the request as ``Publisher.cancel`` does, so
no worker renders an image nobody awaits.

``AsyncPixelpipeClient`` is the implementation; ``PixelpipeClient`` runs its calls on an event loop of its own, on a
thread, for code without one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import math
import re
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Generic, TypeVar

from confluent_kafka import KafkaError

from pixelpipe.core.clock import utc_now
from pixelpipe.core.codec import Codec, codec_from_settings
from pixelpipe.core.events import ImageRequest, ImageResult, StoredImage
from pixelpipe.core.objects import ObjectStore, ObjectStoreError, open_object_store
from pixelpipe.core.settings import Settings
from pixelpipe.core.topics import MAX_PARTIAL_IMAGES, PARTIAL_IMAGES_HEADER, ensure_topics
from pixelpipe.core.validation import check_reply_topic
from pixelpipe.producers.publisher import DeliveryError, PendingDelivery, Publisher
from pixelpipe.producers.replies import Preview, ReplyListener
from pixelpipe.producers.requests import new_request

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 120.0  # a call's deadline unless the client or the call says otherwise
RESULT_GRACE_S = 5.0  # waited past the deadline, for the pipeline's own DEADLINE_EXCEEDED result to arrive
PUBLISH_TIMEOUT_S = 30.0  # longest a request waits for the broker to take it
CLOSE_FLUSH_S = 5.0  # longest ``close`` waits for the broker to take what is still queued (cancellations)

Answer = TypeVar("Answer")  # what a call gives: the ImageResult (blocking client) or an awaitable of it (asyncio)


class ResultTimeoutError(TimeoutError):
    """No terminal result by the request's deadline (and ``RESULT_GRACE_S`` more, for the pipeline's own
    ``DEADLINE_EXCEEDED`` result to arrive)."""

    def __init__(self, request_id: str, timeout_s: float, cancelled: bool) -> None:
        what = "it is cancelled" if cancelled else "it was left to run"
        super().__init__(f"no result for request {request_id} within its deadline of {timeout_s:g} s; {what}")
        self.request_id = request_id
        """The request that timed out."""
        self.cancelled = cancelled
        """Whether its cancellation was published."""


def default_client_name() -> str:
    """``client.<host name>``: stable across restarts. Processes that share a name share a reply topic, which is
    correct (replies are matched by request id) but has each read the others' replies."""
    return "client." + re.sub(r"[^a-zA-Z0-9._-]", "-", socket.gethostname())


class _Client(ABC, Generic[Answer]):
    """What both clients share: their settings, reply topic, publisher and listener, and ``generate`` and ``edit``,
    which build a request and hand it to ``submit``."""

    def __init__(
        self,
        settings: Settings,
        name: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        requested_by: str | None = None,
        abandon_reason: str = "the caller stopped waiting",
        store: ObjectStore | None = None,
    ) -> None:
        """``name`` names the reply topic (default ``default_client_name()``); keep it stable across restarts and
        distinct per instance. ``timeout_s`` is each call's deadline unless the call gives its own.
        ``requested_by`` (default ``client:<name>``) and ``abandon_reason`` go in the cancellations this client
        publishes for calls abandoned before their answer. ``store`` is the object store images are read from
        (default: the one ``settings`` names, opened on first use)."""
        _check_timeout(timeout_s)
        self.settings = settings
        self.name = name or default_client_name()
        self.reply_topic = f"{settings.topics.reply_prefix}{self.name}"
        """The topic this client's results and previews come back on."""
        check_reply_topic(self.reply_topic, settings.topics)
        self.timeout_s = timeout_s
        self.requested_by = requested_by or f"client:{self.name}"
        self.abandon_reason = abandon_reason
        self.codec: Codec = codec_from_settings(settings.kafka)
        self.listener = ReplyListener(settings.kafka, self.reply_topic, self.codec)
        self.publisher: Publisher | None = None
        """The publisher of requests and cancellations, once started."""
        self._store = store

    @property
    def store(self) -> ObjectStore:
        """The object store the results' images are in (sources for ``edit`` go there too)."""
        if self._store is None:
            self._store = open_object_store(self.settings.objects)
        return self._store

    def generate(
        self,
        *,
        prompt: str,
        model: str,
        user_id: str,
        n: int = 1,
        width: int = 512,
        height: int = 512,
        steps: int | None = None,
        negative_prompt: str | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        experiments: Mapping[str, str] | None = None,
        priority: str = "INTERACTIVE",
        request_id: str | None = None,
        timeout_s: float | None = None,
        partial_images: int = 0,
        on_preview: Callable[[Preview], None] | None = None,
    ) -> Answer:
        """Generate ``n`` images of ``prompt``: the request's terminal ImageResult (awaitable on the asyncio client),
        SUCCEEDED with its images or saying how it ended. The request is due ``timeout_s`` (default the client's)
        from now; past that, ResultTimeoutError. ``partial_images`` (0 to 3) previews of the image in progress go to
        ``on_preview`` as they come. Refusals: InvalidRequestError (a field breaks a rule), DeliveryError (the broker
        did not take the request)."""
        request = new_request(
            kind="GENERATE",
            prompt=prompt,
            model=model,
            user_id=user_id,
            n=n,
            width=width,
            height=height,
            steps=steps,
            negative_prompt=negative_prompt,
            guidance=guidance,
            seed=seed,
            experiments=experiments,
            priority=priority,
            request_id=request_id,
            deadline=self._deadline(timeout_s),
            reply_topic=self.reply_topic,
        )
        return self.submit(request, partial_images=partial_images, on_preview=on_preview)

    def edit(
        self,
        *,
        source_image_uri: str,
        prompt: str,
        model: str,
        user_id: str,
        mask_uri: str | None = None,
        reference_image_uris: Sequence[str] = (),
        strength: float | None = None,
        n: int = 1,
        width: int = 512,
        height: int = 512,
        steps: int | None = None,
        negative_prompt: str | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        experiments: Mapping[str, str] | None = None,
        priority: str = "INTERACTIVE",
        request_id: str | None = None,
        timeout_s: float | None = None,
        partial_images: int = 0,
        on_preview: Callable[[Preview], None] | None = None,
    ) -> Answer:
        """Edit the image at ``source_image_uri`` (in the object store: ``client.store.put(...).uri``) as ``prompt``
        says, where ``mask_uri``'s mask is white; otherwise as ``generate``."""
        request = new_request(
            kind="EDIT",
            source_image_uri=source_image_uri,
            prompt=prompt,
            model=model,
            user_id=user_id,
            mask_uri=mask_uri,
            reference_image_uris=reference_image_uris,
            strength=strength,
            n=n,
            width=width,
            height=height,
            steps=steps,
            negative_prompt=negative_prompt,
            guidance=guidance,
            seed=seed,
            experiments=experiments,
            priority=priority,
            request_id=request_id,
            deadline=self._deadline(timeout_s),
            reply_topic=self.reply_topic,
        )
        return self.submit(request, partial_images=partial_images, on_preview=on_preview)

    @abstractmethod
    def submit(
        self,
        request: ImageRequest,
        *,
        partial_images: int = 0,
        on_preview: Callable[[Preview], None] | None = None,
        cancel_when_abandoned: bool = True,
    ) -> Answer:
        """Publish ``request`` (built with ``new_request``) and wait for its terminal ImageResult."""

    def recent_result(self, request_id: str) -> ImageResult | None:
        """``request_id``'s result if it came back to this client lately (its last 4096 results)."""
        return self.listener.recent(request_id)

    def _deadline(self, timeout_s: float | None) -> dt.datetime:
        if timeout_s is not None:
            _check_timeout(timeout_s)
        return utc_now() + dt.timedelta(seconds=self.timeout_s if timeout_s is None else timeout_s)

    def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make the topics the client uses where missing, connect the publisher and read the reply topic from its
        end, settling its waits on ``loop``."""
        kafka, topics = self.settings.kafka, self.settings.topics
        ensure_topics(kafka, topics, [topics.requests, topics.results, topics.cancellations])
        ensure_topics(kafka, topics, [self.reply_topic], partitions=1)
        self.listener.start(loop)
        self.publisher = Publisher(self.settings, self.codec)

    def _disconnect(self) -> None:
        self.listener.stop()
        if self.publisher is not None:
            self.publisher.close(CLOSE_FLUSH_S)
            self.publisher = None  # calls after this are refused as before the start

    async def _publish_and_wait(
        self,
        request: ImageRequest,
        partial_images: int,
        on_preview: Callable[[Preview], None] | None,
        cancel_when_abandoned: bool,
    ) -> ImageResult:
        """Both clients' ``submit``, run on the loop the listener settles its waits on."""
        publisher = self._started()
        if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
            raise ValueError(f"partial_images must be 0 to {MAX_PARTIAL_IMAGES}, got {partial_images}")
        if request.reply_topic is None:
            request.reply_topic = self.reply_topic
        if request.reply_topic != self.reply_topic:
            raise ValueError(
                f"request {request.request_id} names the reply topic {request.reply_topic!r}, but this client reads "
                f"{self.reply_topic!r}: leave reply_topic unset"
            )
        if request.deadline is None:
            request.deadline = self._deadline(None)
        rid = request.request_id
        future = self.listener.expect(rid)
        if on_preview is not None:
            self.listener.watch_previews(rid, on_preview)
        headers = {PARTIAL_IMAGES_HEADER: str(partial_images).encode()} if partial_images else None
        try:
            await _acknowledged(publisher.publish(request, headers=headers))
            remaining_s = (request.deadline - utc_now()).total_seconds() + RESULT_GRACE_S
            try:
                # asyncio.timeout, not wait_for, which in Python 3.11 loses a cancellation that comes as the wait ends
                async with asyncio.timeout(max(0.1, remaining_s)):
                    return await future
            except TimeoutError:
                timeout_s = (request.deadline - request.created_at).total_seconds()
                raise ResultTimeoutError(rid, timeout_s, cancel_when_abandoned) from None
        except (asyncio.CancelledError, ResultTimeoutError) as e:
            if cancel_when_abandoned:
                timed_out = isinstance(e, ResultTimeoutError)
                self._cancel(publisher, rid, "no result by its deadline" if timed_out else self.abandon_reason)
            raise
        finally:
            self.listener.forget(rid, future)
            self.listener.forget_previews(rid)

    def _started(self) -> Publisher:
        if self.publisher is None:
            raise RuntimeError(f"start the {type(self).__name__} first (use it in a with block, or call start)")
        return self.publisher

    def _cancel(self, publisher: Publisher, request_id: str, reason: str) -> None:
        """Publish a Cancellation of ``request_id`` without waiting; best effort: one the broker refuses, or one
        after the client closed, is logged."""
        try:
            pending = publisher.publish_cancellation(request_id, reason, self.requested_by)
        except RuntimeError as e:  # the publisher is closed
            log.warning("cancellation not published", extra={"request_id": request_id, "error": str(e)})
            return
        pending.add_done_callback(_log_refused_cancellation)
        log.info("request cancelled", extra={"request_id": request_id, "reason": reason})

    def _read_image(self, image: StoredImage) -> bytes:
        data = self.store.get(image.uri, max_bytes=image.bytes)
        digest = hashlib.sha256(data).hexdigest()
        if digest != image.sha256:
            raise ObjectStoreError(f"{image.uri} is not the result's image: its sha256 is {digest}, not {image.sha256}")
        return data


class AsyncPixelpipeClient(_Client[Awaitable[ImageResult]]):
    """The client for asyncio services: ``async with AsyncPixelpipeClient(settings) as client``, then
    ``await client.generate(...)``. Use it on the event loop that started it; waiting calls hold no thread, so
    thousands may wait at once."""

    async def start(self) -> None:
        """Make the reply topic (and the pipeline's topics the client uses) where missing, connect the publisher and
        read the reply topic from its end."""
        await asyncio.to_thread(self._connect, asyncio.get_running_loop())

    async def close(self) -> None:
        """Stop reading replies, and flush the publisher (for up to 5 s). Leaving the ``async with`` block
        closes."""
        await asyncio.to_thread(self._disconnect)

    async def submit(
        self,
        request: ImageRequest,
        *,
        partial_images: int = 0,
        on_preview: Callable[[Preview], None] | None = None,
        cancel_when_abandoned: bool = True,
    ) -> ImageResult:
        """Publish ``request`` (built with ``new_request``; its reply topic is set to this client's, and its
        deadline to ``timeout_s`` from now if it has none) and await its terminal ImageResult. Unless
        ``cancel_when_abandoned`` is False, the request is cancelled when the wait ends without a result:
        ResultTimeoutError after its deadline, or the awaiting task cancelled. ``on_preview`` runs on the event
        loop."""
        return await self._publish_and_wait(request, partial_images, on_preview, cancel_when_abandoned)

    async def read_image(self, image: StoredImage) -> bytes:
        """The bytes of one of a result's images, read from the object store and checked against its sha256."""
        return await asyncio.to_thread(self._read_image, image)

    async def __aenter__(self) -> AsyncPixelpipeClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class PixelpipeClient(_Client[ImageResult]):
    """The client for code without an event loop: ``with PixelpipeClient(settings) as client``, then
    ``client.generate(...)`` blocks until the answer. Its calls run as the asyncio client's on an event loop of its
    own, on a thread, so threads may share one client; a call interrupted (KeyboardInterrupt) cancels its request."""

    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the client's event loop, make the reply topic (and the pipeline's topics the client uses) where
        missing, connect the publisher and read the reply topic from its end."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pixelpipe-client", daemon=True)
        self._thread.start()
        try:
            self._connect(self._loop)
        except BaseException:
            self.close()  # the loop's thread with it
            raise

    def close(self) -> None:
        """Cancel the calls still waiting (and their requests), stop reading replies, flush the publisher (for up to
        5 s) and stop the event loop. Leaving the ``with`` block closes."""
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result()
        self._disconnect()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = self._thread = None

    def submit(
        self,
        request: ImageRequest,
        *,
        partial_images: int = 0,
        on_preview: Callable[[Preview], None] | None = None,
        cancel_when_abandoned: bool = True,
    ) -> ImageResult:
        """Publish ``request`` (built with ``new_request``; its reply topic is set to this client's, and its
        deadline to ``timeout_s`` from now if it has none) and block until its terminal ImageResult. Unless
        ``cancel_when_abandoned`` is False, the request is cancelled when the wait ends without a result:
        ResultTimeoutError after its deadline, or the call interrupted. ``on_preview`` runs on the client's
        thread."""
        self._started()
        assert self._loop is not None  # started: the loop runs
        waiting = asyncio.run_coroutine_threadsafe(
            self._publish_and_wait(request, partial_images, on_preview, cancel_when_abandoned), self._loop
        )
        try:
            return waiting.result()
        except BaseException:
            waiting.cancel()  # interrupted: the wait is cancelled on the loop, and with it the request
            raise

    def read_image(self, image: StoredImage) -> bytes:
        """The bytes of one of a result's images, read from the object store and checked against its sha256."""
        return self._read_image(image)

    def __enter__(self) -> PixelpipeClient:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _check_timeout(timeout_s: float) -> None:
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")


async def _acknowledged(pending: PendingDelivery) -> None:
    """Returns once the broker took the event; DeliveryError when it refused it or did not answer within
    PUBLISH_TIMEOUT_S. The delivery report settles a future on this loop, so the wait holds no thread."""
    loop = asyncio.get_running_loop()
    acknowledged: asyncio.Future[None] = loop.create_future()
    pending.add_done_callback(lambda settled: loop.call_soon_threadsafe(_settle_delivery, acknowledged, settled))
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT_S):
            await acknowledged
    except TimeoutError:
        reason = f"not acknowledged within {PUBLISH_TIMEOUT_S:g} s"
        raise DeliveryError(KafkaError(KafkaError._MSG_TIMED_OUT, reason, retriable=True)) from None


def _settle_delivery(acknowledged: asyncio.Future[None], settled: PendingDelivery) -> None:
    if acknowledged.done():  # the call gave up waiting
        return
    error = settled.exception(0)
    if error is None:
        acknowledged.set_result(None)
    else:
        acknowledged.set_exception(error)


def _log_refused_cancellation(settled: PendingDelivery) -> None:
    error = settled.exception(0)
    if error is not None:
        log.warning("cancellation not published", extra={"error": str(error)})


async def _cancel_other_tasks() -> None:
    """Cancel every task on the running loop but this one's, and wait until they have ended."""
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
