"""Takes and their chunks rendered and finished overlapped, and acknowledged in order once finished
(processors.takes), with the null model and a slow finish."""

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ImageResult
from pixelpipe.core.objects import open_object_store
from pixelpipe.core.settings import ObjectStoreSettings, RequestLimits, StageSettings, TopicSettings
from pixelpipe.processors.models import DiffusionModels
from pixelpipe.processors.moderation import Verdict
from pixelpipe.processors.stages import Emission, GenerateStage, Inbound, StageContext
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.processors.takes import InOrderAcknowledgement, render_take
from pixelpipe.producers import new_request

FINISH_S = 0.3  # a slow encoder, detector or store


class SlowModerator:
    """Allows everything after FINISH_S, and records when each finish began and ended."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    def check(self, images, stage):
        began = time.monotonic()
        time.sleep(FINISH_S)
        self.spans.append((began, time.monotonic()))
        return [Verdict(stage, True, {}, []) for _ in images]


class TimedStage(GenerateStage):
    model_calls: list[float]

    def run_model(self, params, chunk):
        self.model_calls.append(time.monotonic())
        return super().run_model(params, chunk)


def _stage_and_messages(tmp_path, count):
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"null": {"kind": "null", "max_batch": 1}}))
    stamp = ModerationStamp("key")
    context = StageContext(TopicSettings(), RequestLimits(), StageSettings(), Codec(), "worker", stamp)
    moderator = SlowModerator()
    store = open_object_store(ObjectStoreSettings(url=f"file://{tmp_path / 'objects'}"))
    stage = TimedStage(context, DiffusionModels.from_file(registry), moderator, store, {})
    stage.model_calls = []
    requests = [new_request(prompt=f"p{i}", model="null", user_id="u", width=16, height=16) for i in range(count)]
    messages = []
    for offset, request in enumerate(requests):
        value = context.codec.encode(request)
        messages.append(
            Inbound(value, request.request_id.encode(), "t", 0, offset, time.time(), headers=stamp.headers(value))
        )
    return stage, moderator, requests, messages


def test_the_next_chunks_model_call_does_not_wait_for_the_last_chunks_finish_and_one_chunk_waits_at_most(tmp_path):
    stage, moderator, requests, messages = _stage_and_messages(tmp_path, 3)
    context = stage.context
    sent: list[Emission] = []
    main_thread = threading.get_ident()

    async def send(emissions):
        assert threading.get_ident() == main_thread  # sent on the event loop, never from a worker thread
        sent.extend(emissions)

    async def take():
        await (await render_take(stage, messages, send, model_thread, finishing_thread))

    with ThreadPoolExecutor(1) as model_thread, ThreadPoolExecutor(1) as finishing_thread:
        asyncio.run(take())

    first_finish, second_finish, _ = moderator.spans
    assert len(stage.model_calls) == 3
    assert stage.model_calls[1] < first_finish[1]  # rendered while chunk 1 was being finished
    assert stage.model_calls[2] >= first_finish[1]  # no more than one rendered chunk waits to be finished
    assert second_finish[0] >= first_finish[1]  # finished in order, one at a time
    results = [context.codec.decode_as(ImageResult, e.value) for e in sent if e.topic == context.topics.results]
    assert sorted(r.request_id for r in results) == sorted(r.request_id for r in requests)
    assert {r.status for r in results} == {"SUCCEEDED"}


def test_the_next_take_renders_while_the_last_one_finishes_and_takes_are_acknowledged_in_order(tmp_path):
    stage, moderator, _, messages = _stage_and_messages(tmp_path, 4)
    acknowledged: list[tuple[int, float]] = []

    async def send(emissions):
        pass

    def acknowledge(take):
        async def note():
            acknowledged.append((take, time.monotonic()))

        return note

    async def run():
        acknowledgement = InOrderAcknowledgement("generate")
        for take, start in enumerate((0, 2)):
            finished = await render_take(stage, messages[start : start + 2], send, model_thread, finishing_thread)
            await acknowledgement.after(finished, acknowledge(take))
        await acknowledgement.close()

    with ThreadPoolExecutor(1) as model_thread, ThreadPoolExecutor(1) as finishing_thread:
        asyncio.run(run())

    finishes = moderator.spans
    assert len(finishes) == 4
    assert stage.model_calls[2] < finishes[1][1]  # take 2's first model call while take 1's last chunk finished
    assert [take for take, _ in acknowledged] == [0, 1]
    assert acknowledged[0][1] >= finishes[1][1]  # a take is acknowledged only once its last chunk is finished
    assert acknowledged[1][1] >= finishes[3][1]


def test_a_take_whose_effects_failed_is_never_acknowledged_and_stops_the_agent():
    acknowledged = []

    async def failing():
        raise RuntimeError("the broker refused")

    async def done():
        pass

    def acknowledge(take):
        async def note():
            acknowledged.append(take)

        return note

    async def run():
        acknowledgement = InOrderAcknowledgement("moderation")
        await acknowledgement.after(asyncio.ensure_future(failing()), acknowledge(0))
        with pytest.raises(RuntimeError, match="refused"):  # at the next take: the agent stops
            await acknowledgement.after(asyncio.ensure_future(done()), acknowledge(1))

    asyncio.run(run())
    assert acknowledged == []


def test_a_stopping_worker_renders_no_further_chunk_and_hands_the_take_back(tmp_path):
    stage, moderator, _, messages = _stage_and_messages(tmp_path, 3)
    sent = []

    async def send(emissions):
        sent.extend(emissions)

    async def run():
        # Stopping once the first chunk was rendered: that chunk is finished, no other is rendered.
        return await render_take(
            stage, messages, send, model_thread, finishing_thread, lambda: len(stage.model_calls) >= 1
        )

    with ThreadPoolExecutor(1) as model_thread, ThreadPoolExecutor(1) as finishing_thread:
        assert asyncio.run(run()) is None

    assert len(stage.model_calls) == 1
    assert len(moderator.spans) == 1
