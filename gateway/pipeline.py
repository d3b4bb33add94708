"""The gateway's side of the pipeline: publish a call's ImageRequest and wait for its result with the producer SDK's
client (``AsyncPixelpipeClient``: the gateway's reply topic is the client's, named ``gateway.<instance id>``), and
make a retry with the same idempotency key return the same result rather than render again.

Idempotency. A call with an ``Idempotency-Key`` header gets a request id derived from (key id, idempotency key);
before publishing, the gateway creates a receipt (``gateway/receipts/<request id>.json``: when, and a fingerprint of
the parameters) in the object store, which every instance shares, only if none exists: the store's atomic
conditional create (a conditional PUT on S3, a hard link on a filesystem) is the lock, so of calls racing on several
instances exactly one publishes. A store that ignores the condition (s3proxy) is reported at start; there the lock
holds within one instance only. A call whose receipt exists publishes nothing new: it looks for the result on the
results topic from the receipt's time on (keyed by request id, so a scan by key; ClickHouse holds the same rows);
failing that, for the request on the requests topic (a gateway that stopped between the receipt and the publish
never sent it: then it is published now, once); and otherwise waits for the result on the results topic until the
deadline. Within one instance, concurrent calls with the same key share one wait. The window is the topics'
retention: after it, a retry finds its receipt but neither event and renders again.

A caller that leaves before its answer abandons its request (``Pipeline.abandon``): the wait stops, and with it the
client publishes a Cancellation, so the render workers spend no device time on an image nobody waits for; not for a
call with an idempotency key, whose retry must still get its image (nor does its timeout cancel it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from pixelpipe.core.events import ImageRequest, ImageResult
from pixelpipe.core.objects import ObjectNotFoundError, ObjectStore
from pixelpipe.core.settings import KafkaSettings, Settings
from pixelpipe.core.topics import find_event
from pixelpipe.gateway.errors import ApiError
from pixelpipe.producers import (
    AsyncPixelpipeClient,
    DeliveryError,
    InvalidRequestError,
    Preview,
    ResultTimeoutError,
    new_request,
)
from pixelpipe.producers.client import PUBLISH_TIMEOUT_S, RESULT_GRACE_S

log = logging.getLogger(__name__)
LAG_CACHE_S = 1.0
RECEIPT_SLACK_MS = 10_000  # scans start this long before a receipt's time (clocks of broker and gateway differ)


def request_id_for(key_id: str, idempotency_key: str | None) -> str:
    """``<key id>-<32 hex>``: derived from the idempotency key when there is one, else random. The key id leads, so
    ClickHouse rows of a key are ``startsWith(request_id, 'k...')``."""
    if idempotency_key is None:
        return f"{key_id}-{uuid.uuid4().hex}"
    digest = hashlib.sha256(f"{key_id}\n{idempotency_key}".encode()).hexdigest()[:32]
    return f"{key_id}-{digest}"


@dataclass(frozen=True)
class Submission:
    """What to publish for one call."""

    request_id: str
    idempotent: bool
    fingerprint: str
    kind: str
    user_id: str
    prompt: str
    model: str
    n: int
    width: int
    height: int
    steps: int | None
    source_image_uri: str | None = None
    reference_image_uris: tuple[str, ...] = ()
    mask_uri: str | None = None
    partial_images: int = 0  # previews of the image in progress to stream to the caller


def image_request(submission: Submission, reply_topic: str, timeout_s: float) -> ImageRequest:
    """The ImageRequest published for ``submission``: interactive, due ``timeout_s`` from now, its result copied
    to ``reply_topic``."""
    return new_request(
        request_id=submission.request_id,
        kind=submission.kind,
        prompt=submission.prompt,
        model=submission.model,
        user_id=submission.user_id,
        n=submission.n,
        width=submission.width,
        height=submission.height,
        steps=submission.steps,
        source_image_uri=submission.source_image_uri,
        reference_image_uris=submission.reference_image_uris,
        mask_uri=submission.mask_uri,
        priority="INTERACTIVE",
        deadline=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=timeout_s),
        reply_topic=reply_topic,
    )


class LagMonitor:
    """Requests waiting for moderation: the high watermarks of the requests topic minus the offsets committed by the
    moderation consumer groups (``<PIXELPIPE_CONSUMER_GROUP>-moderation...``), the least among those groups;
    measured at most once a second, on a thread of its own, so no call waits for the AdminClient."""

    def __init__(self, kafka: KafkaSettings, topic: str, group_prefix: str) -> None:
        self._kafka = kafka
        self._topic = topic
        self._prefix = group_prefix
        self._admin: AdminClient | None = None
        self._consumer: Any = None
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._measuring = False
        self._lag: int | None = None

    def lag(self) -> int | None:
        """The latest measure (None before the first, or when it failed); one older than a second starts the next
        measure, which later calls see."""
        with self._lock:
            if not self._measuring and time.monotonic() - self._at > LAG_CACHE_S:
                self._measuring = True
                threading.Thread(target=self._refresh, name="gateway-lag", daemon=True).start()
            return self._lag

    def _refresh(self) -> None:
        try:
            lag = self.measure()
        except Exception as e:  # a lag we cannot measure sheds nothing
            log.warning("consumer lag not measured", extra={"error": str(e)})
            lag = None
        with self._lock:
            self._lag, self._at, self._measuring = lag, time.monotonic(), False

    def measure(self) -> int | None:
        """The lag now, measured on the calling thread; None when no moderation group exists."""
        from confluent_kafka import Consumer

        if self._admin is None:
            self._admin = AdminClient(self._kafka.client_config())
            self._consumer = Consumer(
                self._kafka.client_config() | {"group.id": f"pixelpipe-gateway-lag-{uuid.uuid4()}"}
            )
        groups = [
            g.group_id
            for g in self._admin.list_consumer_groups(request_timeout=5).result(timeout=5).valid
            if g.group_id.startswith(self._prefix)
        ]
        if not groups:
            return None
        partitions = self._consumer.list_topics(self._topic, timeout=5).topics[self._topic].partitions
        highs = {
            p: self._consumer.get_watermark_offsets(TopicPartition(self._topic, p), timeout=5)[1] for p in partitions
        }
        lags = []
        for group in groups:
            request = ConsumerGroupTopicPartitions(group, [TopicPartition(self._topic, p) for p in partitions])
            future = self._admin.list_consumer_group_offsets([request], request_timeout=5)[group]
            committed = {tp.partition: tp.offset for tp in future.result(timeout=5).topic_partitions}
            lags.append(sum(max(0, high - max(committed.get(p, 0), 0)) for p, high in highs.items()))
        return min(lags)


class GroupCommit:
    """Receipts created together: the receipts of calls that arrive while a create is in progress go in the next
    one, one ``create_many``, so a file:// store syncs its filesystem once for all of them rather than once per
    call (a sync flushes every file written since, the workers' images too, and took most of an idempotent call's
    time under load). Each call still waits until its receipt is durable. A store whose ``create_many`` creates one
    by one (S3) gains nothing from a batch and would serialise the writes, so each receipt is created alone there."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.batches = type(store).create_many is not ObjectStore.create_many
        self._queued: list[tuple[str, bytes, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def create(self, key: str, data: bytes) -> bool:
        """True when this call created the receipt, False when one existed."""
        if not self.batches:
            return await asyncio.to_thread(self.store.create, key, data, "application/json")
        created: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queued.append((key, data, created))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._drain())
        return await created

    async def _drain(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                outcomes = await asyncio.to_thread(
                    self.store.create_many, [(k, d, "application/json") for k, d, _ in batch]
                )
            except Exception as e:
                for _, _, created in batch:
                    if not created.done():
                        created.set_exception(e)
            else:
                for (_, _, created), outcome in zip(batch, outcomes, strict=True):
                    if not created.done():
                        created.set_result(outcome)


class Pipeline:
    """Publishing and waiting for one gateway instance; ``start`` before use, ``close`` after."""

    def __init__(self, settings: Settings, store: ObjectStore, instance_id: str) -> None:
        self.settings = settings
        self.store = store
        self.instance_id = instance_id
        self.timeout_s = settings.gateway.timeout_s
        self.client = AsyncPixelpipeClient(
            settings,
            f"gateway.{instance_id}",
            timeout_s=self.timeout_s,
            requested_by=f"gateway:{instance_id}",
            abandon_reason="the caller left before its answer",
            store=store,
        )
        self.reply_topic = self.client.reply_topic
        self.lag_monitor = LagMonitor(
            settings.kafka, settings.topics.requests, f"{settings.stages.consumer_group}-moderation"
        )
        self.receipts = GroupCommit(store)
        self._inflight: dict[str, asyncio.Future[ImageResult]] = {}
        self._previews: dict[str, asyncio.Queue[Preview]] = {}

    async def start(self) -> None:
        await self.client.start()
        if not await asyncio.to_thread(self.store.creates_exclusively):
            log.warning(
                "the object store ignores conditional writes: a retry racing its original call on another gateway "
                "instance may publish twice",
                extra={"store": self.store.root_uri},
            )

    async def close(self) -> None:
        await self.client.close()

    def check_capacity(self) -> None:
        """503 with Retry-After while more requests wait for moderation than PIXELPIPE_GATEWAY_MAX_LAG."""
        bound = self.settings.gateway.max_lag
        if bound <= 0:
            return
        lag = self.lag_monitor.lag()
        if lag is not None and lag > bound:
            raise ApiError(
                503,
                f"The pipeline is overloaded: {lag} requests wait for moderation (bound {bound}). Retry later.",
                type="server_error",
                code="overloaded",
                retry_after_s=5,
            )

    async def submit(self, submission: Submission) -> ImageResult:
        """The terminal result of ``submission``: published once per request id, waited for until the deadline."""
        rid = submission.request_id
        shared = self._inflight.get(rid)
        if shared is None:
            shared = asyncio.ensure_future(self._run(submission))
            self._inflight[rid] = shared
            shared.add_done_callback(lambda _: self._inflight.pop(rid, None))
        return await asyncio.shield(shared)

    def abandon(self, submission: Submission) -> None:
        """Its caller left before the answer: stop waiting, which cancels the request (the client publishes the
        Cancellation), unless the call carried an idempotency key."""
        if submission.idempotent:
            return
        waiting = self._inflight.get(submission.request_id)
        if waiting is not None:
            waiting.cancel()
            log.info("caller left: request cancelled", extra={"request_id": submission.request_id})

    def previews(self, request_id: str) -> asyncio.Queue[Preview]:
        """A queue of the previews of ``request_id``'s image in progress, for a call that streams them; ask before
        ``submit``, ``forget_previews`` after."""
        queue: asyncio.Queue[Preview] = asyncio.Queue()
        self._previews[request_id] = queue
        return queue

    def forget_previews(self, request_id: str) -> None:
        self._previews.pop(request_id, None)

    async def _run(self, submission: Submission) -> ImageResult:
        rid = submission.request_id
        if submission.idempotent:
            # Read first, so a sequential retry is caught even where the store ignores conditional creates.
            receipt = await asyncio.to_thread(self._read_receipt, rid)
            if receipt is None and not await self.receipts.create(self._receipt_key(rid), self._receipt(submission)):
                receipt = await asyncio.to_thread(self._read_receipt, rid)  # a racing call on another instance won
            if receipt is not None:
                if receipt.get("fingerprint") != submission.fingerprint:
                    raise ApiError(
                        400,
                        "This Idempotency-Key was used with other parameters; use a new key for a new request.",
                        param=None,
                        code="idempotency_key_reused",
                    )
                return await self._recover(submission, int(receipt["created_ms"]))
        return await self._publish_and_wait(submission)

    async def _publish_and_wait(self, submission: Submission) -> ImageResult:
        """Publish the submission with the client and wait for its result, its previews to the call's queue."""
        rid = submission.request_id
        previews = self._previews.get(rid)
        try:
            return await self.client.submit(
                image_request(submission, self.reply_topic, self.timeout_s),
                partial_images=submission.partial_images,
                on_preview=None if previews is None else previews.put_nowait,
                cancel_when_abandoned=not submission.idempotent,
            )
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param=e.field) from None
        except DeliveryError as e:
            log.warning("request not accepted by the broker", extra={"request_id": rid, "error": str(e)})
            raise ApiError(
                503, "The pipeline did not accept the request; retry later.", type="server_error", retry_after_s=5
            ) from None
        except ResultTimeoutError:
            raise deadline_error(self.timeout_s) from None

    # -- idempotency ---------------------------------------------------------------------------------------
    def _receipt_key(self, request_id: str) -> str:
        return f"gateway/receipts/{request_id}.json"

    def _read_receipt(self, request_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.get(self.store.uri_for(self._receipt_key(request_id)), max_bytes=65536))
        except ObjectNotFoundError:
            return None

    def _receipt(self, submission: Submission) -> bytes:
        body = {"request_id": submission.request_id, "fingerprint": submission.fingerprint, "created_ms": _now_ms()}
        return json.dumps(body).encode()

    async def _recover(self, submission: Submission, created_ms: int) -> ImageResult:
        """A retried call: its result if it exists, else its request if it was published, else publish it now."""
        rid = submission.request_id
        recent = self.client.recent_result(rid)
        if recent is not None:
            return recent
        kafka, topics = self.settings.kafka, self.settings.topics
        since = created_ms - RECEIPT_SLACK_MS
        found = await asyncio.to_thread(find_event, kafka, topics.results, rid, since, None)
        if found is not None:
            return self.client.codec.decode_as(ImageResult, found)
        # The receipt's maker may be publishing right now (a call racing on another instance): its request is
        # awaited until that publish would have timed out. Only a request missing past then is published here.
        publishing_s = created_ms / 1000 + PUBLISH_TIMEOUT_S - time.time()
        published = await self._tail(
            topics.requests, rid, since, time.monotonic() + publishing_s if publishing_s > 0 else None
        )
        if published is None:
            log.info("receipt without request: publishing", extra={"request_id": rid})
            return await self._publish_and_wait(submission)
        request = self.client.codec.decode_as(ImageRequest, published)
        deadline = request.deadline or dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.timeout_s)
        until = time.monotonic() + max(0.1, (deadline - dt.datetime.now(dt.UTC)).total_seconds() + RESULT_GRACE_S)
        found = await self._tail(topics.results, rid, since, until)
        if found is None:
            raise deadline_error(self.timeout_s)
        return self.client.codec.decode_as(ImageResult, found)

    async def _tail(self, topic: str, request_id: str, since_ms: int, until_monotonic: float | None) -> bytes | None:
        """``find_event`` in a thread (to the topic's end when ``until_monotonic`` is None), told to stop should the
        call be cancelled."""
        stop = threading.Event()
        try:
            return await asyncio.to_thread(
                find_event, self.settings.kafka, topic, request_id, since_ms, until_monotonic, stop
            )
        finally:
            stop.set()


def deadline_error(timeout_s: float) -> ApiError:
    return ApiError(
        504,
        f"The image was not ready within the gateway's deadline of {timeout_s:g} s (PIXELPIPE_GATEWAY_TIMEOUT_S).",
        type="server_error",
        code="timeout",
    )


def _now_ms() -> int:
    return int(time.time() * 1000)
