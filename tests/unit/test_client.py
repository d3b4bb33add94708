"""The client for upstream services (producers/client.py) and its reply topic's routing (producers/replies.py),
with Kafka faked at its boundary: the publisher records what is published, and a worker stand-in answers on the
reply topic's consumer. The real servers' round trip is tests/integration/test_client.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import hashlib
import threading
import time

import pytest
from confluent_kafka import KafkaError

from pixelpipe.core.events import ImageRequest, ImageResult, StoredImage
from pixelpipe.core.objects import FileObjectStore, ObjectStoreError
from pixelpipe.core.settings import Settings
from pixelpipe.core.topics import PARTIAL_IMAGES_HEADER
from pixelpipe.core.validation import InvalidRequestError
from pixelpipe.producers import (
    AsyncPixelpipeClient,
    DeliveryError,
    PixelpipeClient,
    Preview,
    ResultTimeoutError,
    new_request,
)
from tests.fake_kafka import FakeMessage, faked_kafka, no_grace


def test_a_call_gets_its_own_result_and_previews_routed_by_request_id(monkeypatch):
    broker = faked_kafka(monkeypatch)

    def worker(request: ImageRequest) -> list[FakeMessage]:
        rid = request.request_id
        return [
            broker.result("someone-else"),  # a reply topic two processes share carries others' replies too
            FakeMessage(b"not avro", rid.encode()),  # skipped, never the end of the listener
            broker.preview(rid, 0, b"jpeg-0"),
            broker.preview("someone-else", 0, b"not ours"),
            broker.preview(rid, 1, b"jpeg-1"),
            broker.result(rid),
        ]

    broker.worker = worker
    seen: list[Preview] = []

    async def call() -> ImageResult:
        async with AsyncPixelpipeClient(Settings(), "svc", timeout_s=30) as client:
            assert client.reply_topic == "pixelpipe.replies.svc"
            return await client.generate(
                prompt="a fox", model="tiny-sd", user_id="u1", width=64, height=64, partial_images=2,
                on_preview=seen.append,
            )  # fmt: skip

    result = asyncio.run(call())
    ((request, headers),) = broker.published
    assert result.request_id == request.request_id and result.status == "SUCCEEDED"
    assert seen == [Preview(0, b"jpeg-0"), Preview(1, b"jpeg-1")]
    assert (request.reply_topic, request.priority, request.kind) == ("pixelpipe.replies.svc", "INTERACTIVE", "GENERATE")
    assert request.deadline is not None and request.deadline - request.created_at == dt.timedelta(seconds=30)
    assert headers == {PARTIAL_IMAGES_HEADER: b"2"}
    assert broker.cancellations == []  # answered: nothing to cancel


def test_no_result_by_the_deadline_raises_naming_the_request_and_cancels_it(monkeypatch):
    broker = faked_kafka(monkeypatch)
    no_grace(monkeypatch)

    async def call() -> None:
        async with AsyncPixelpipeClient(Settings(), "svc") as client:
            await client.edit(
                source_image_uri="file:///x.png", prompt="a hat", model="tiny-sd", user_id="u1", timeout_s=0.2
            )

    started_s = time.monotonic()
    with pytest.raises(ResultTimeoutError) as raised:
        asyncio.run(call())
    assert time.monotonic() - started_s >= 0.2  # not before the deadline
    ((request, _),) = broker.published
    assert isinstance(raised.value, TimeoutError) and raised.value.request_id == request.request_id
    assert (
        str(raised.value) == f"no result for request {request.request_id} within its deadline of 0.2 s; it is cancelled"
    )
    assert broker.cancellations == [(request.request_id, "no result by its deadline", "client:svc")]


def test_a_cancelled_wait_cancels_its_request_unless_told_not_to(monkeypatch):
    broker = faked_kafka(monkeypatch)

    async def scenario() -> list[asyncio.Task]:
        async with AsyncPixelpipeClient(Settings(), "svc", requested_by="svc:1", abandon_reason="user left") as client:
            requests = [new_request(prompt="a fox", model="tiny-sd", user_id="u") for _ in range(2)]
            waits = [
                asyncio.ensure_future(client.submit(requests[0])),
                asyncio.ensure_future(client.submit(requests[1], cancel_when_abandoned=False)),
            ]
            while len(broker.published) < 2:
                await asyncio.sleep(0.01)
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            return waits

    waits = asyncio.run(scenario())
    assert all(wait.cancelled() for wait in waits)
    first = broker.published[0][0]
    assert broker.cancellations == [(first.request_id, "user left", "svc:1")]


def test_the_blocking_client_answers_times_out_and_cancels_what_it_still_awaits_when_closed(monkeypatch):
    broker = faked_kafka(monkeypatch)
    no_grace(monkeypatch)
    broker.worker = lambda request: [broker.result(request.request_id)] if request.prompt == "answered" else []
    with PixelpipeClient(Settings(), "blocking") as client:
        answered = client.generate(prompt="answered", model="tiny-sd", user_id="u")
        assert answered.status == "SUCCEEDED" and answered.request_id == broker.published[0][0].request_id
        with pytest.raises(ResultTimeoutError):
            client.generate(prompt="silent", model="tiny-sd", user_id="u", timeout_s=0.2)
        outcomes: list[BaseException] = []

        def wait_in_a_thread() -> None:
            try:
                client.generate(prompt="silent too", model="tiny-sd", user_id="u")
            except BaseException as e:
                outcomes.append(e)

        waiter = threading.Thread(target=wait_in_a_thread)
        waiter.start()
        broker.wait_for(lambda: len(broker.published) == 3)
    waiter.join(10)
    timed_out, left = (request.request_id for request, _ in broker.published[1:])
    assert broker.cancellations == [
        (timed_out, "no result by its deadline", "client:blocking"),
        (left, "the caller stopped waiting", "client:blocking"),
    ]
    assert len(outcomes) == 1 and isinstance(outcomes[0], concurrent.futures.CancelledError)
    with pytest.raises(RuntimeError, match="start the PixelpipeClient first"):
        client.generate(prompt="after close", model="tiny-sd", user_id="u")


def test_refusals_name_what_is_wrong(monkeypatch):
    broker = faked_kafka(monkeypatch)
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds, got 0"):
        AsyncPixelpipeClient(Settings(), "svc", timeout_s=0)
    with pytest.raises(InvalidRequestError, match="reply_topic: must be a Kafka topic name"):
        AsyncPixelpipeClient(Settings(), "two words")

    async def refused() -> list[str]:
        client = AsyncPixelpipeClient(Settings(), "svc")
        errors = []
        with pytest.raises(RuntimeError, match="start the AsyncPixelpipeClient first"):
            await client.generate(prompt="a fox", model="tiny-sd", user_id="u")
        async with client:
            elsewhere = new_request(prompt="a fox", model="tiny-sd", user_id="u", reply_topic="pixelpipe.replies.x")
            for call in (
                lambda: client.submit(elsewhere),
                lambda: client.generate(prompt="a fox", model="tiny-sd", user_id="u", partial_images=4),
                lambda: client.generate(prompt="a fox", model="tiny-sd", user_id="u", timeout_s=float("nan")),
            ):
                with pytest.raises(ValueError) as e:
                    await call()
                errors.append(str(e.value))
            broker.refusal = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
            with pytest.raises(DeliveryError, match="TOPIC_AUTHORIZATION_FAILED"):
                await client.generate(prompt="a fox", model="tiny-sd", user_id="u")
        return errors

    errors = asyncio.run(refused())
    assert "names the reply topic 'pixelpipe.replies.x', but this client reads 'pixelpipe.replies.svc'" in errors[0]
    assert errors[1] == "partial_images must be 0 to 3, got 4"
    assert errors[2] == "timeout_s must be a positive number of seconds, got nan"
    assert broker.published == [] and broker.cancellations == []  # refused, nothing went out to be cancelled


def test_an_image_is_read_from_the_store_and_checked_against_its_digest(tmp_path):
    store = FileObjectStore(tmp_path)
    stored = store.put("2026/01/01/r/0.png", b"png bytes", "image/png")
    image = StoredImage(uri=stored.uri, sha256=stored.sha256, width=8, height=8, format="PNG", bytes=stored.bytes)
    client = PixelpipeClient(Settings(), "svc", store=store)  # reading images needs no start
    assert client.read_image(image) == b"png bytes"
    assert asyncio.run(AsyncPixelpipeClient(Settings(), "svc", store=store).read_image(image)) == b"png bytes"
    other = dataclasses.replace(image, sha256=hashlib.sha256(b"other").hexdigest())
    with pytest.raises(ObjectStoreError, match="is not the result's image: its sha256 is"):
        client.read_image(other)
