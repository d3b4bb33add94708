"""Takes and their chunks rendered and finished overlapped, and acknowledged in order once finished
(processors.takes), with the null model and a slow finish."""

import asyncio
import dataclasses
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ImageResult
from pixelpipe.core.objects import open_object_store
from pixelpipe.core.settings import ObjectStoreSettings, RequestLimits, StageSettings, TopicSettings
from pixelpipe.processors import takes
from pixelpipe.processors.messages import Emission, Inbound, StageContext
from pixelpipe.processors.models import DiffusionModels
from pixelpipe.processors.moderation import Verdict
from pixelpipe.processors.render import GenerateStage
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
            Inbound(value, request.request_id.encode(), "t", 0, offset, time.time(), headers=stamp.headers("t", value))
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
        await (await render_take(stage, messages, send, model_thread, finishing_thread)).sent

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
            await acknowledgement.after(finished.sent, acknowledge(take))
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


def test_a_stopping_worker_renders_no_further_chunk_and_hands_the_rest_of_the_take_back(tmp_path):
    stage, moderator, requests, messages = _stage_and_messages(tmp_path, 3)
    context = stage.context
    sent = []

    async def send(emissions):
        sent.extend(emissions)

    async def run():
        # Stopping once the first chunk was rendered: that chunk is finished and sent, no other is rendered.
        rendered = []
        render_model = stage.run_model
        stage.run_model = lambda params, chunk: rendered.append(render_model(params, chunk)) or rendered[-1]
        stage.stopping = lambda: len(rendered) >= 1
        take = await render_take(stage, messages, send, model_thread, finishing_thread)
        await take.sent
        return take

    with ThreadPoolExecutor(1) as model_thread, ThreadPoolExecutor(1) as finishing_thread:
        take = asyncio.run(run())

    assert not take.abandoned
    assert take.handed_back == {(0, 1), (0, 2)}
    assert len(stage.model_calls) == 1
    assert len(moderator.spans) == 1
    results = [context.codec.decode_as(ImageResult, e.value) for e in sent if e.topic == context.topics.results]
    assert [r.request_id for r in results] == [requests[0].request_id]


def _slow_null_stage(tmp_path, seconds_per_image, steps):
    stage, moderator, requests, messages = _stage_and_messages(tmp_path, 2)
    registry = tmp_path / "slow.json"
    registry.write_text(json.dumps({"null": {"kind": "null", "seconds_per_image": seconds_per_image}}))
    stage.models = DiffusionModels.from_file(registry)
    for request in requests:
        request.steps = steps
    values = [stage.context.codec.encode(request) for request in requests]
    messages = [
        dataclasses.replace(m, value=v, headers=stage.context.stamp.headers("t", v))
        for m, v in zip(messages, values, strict=True)
    ]
    return stage, moderator, messages


def test_a_stop_ends_the_model_call_in_progress_at_its_next_step_and_hands_its_chunk_back(tmp_path):
    stage, moderator, messages = _slow_null_stage(tmp_path, seconds_per_image=30.0, steps=100)  # 0.3 s a step
    sent = []
    stop_at = []

    async def send(emissions):
        sent.extend(emissions)

    async def run():
        stage.stopping = lambda: bool(stop_at) and time.monotonic() >= stop_at[0]
        stop_at.append(time.monotonic() + 1.0)  # mid-call: the call alone would take 30 s
        return await render_take(stage, messages, send, model_thread, finishing_thread)

    with ThreadPoolExecutor(1) as model_thread, ThreadPoolExecutor(1) as finishing_thread:
        take = asyncio.run(run())
        returned_s = time.monotonic() - stop_at[0]

    assert not take.abandoned
    assert take.handed_back == {(0, 0), (0, 1)}
    assert returned_s < 1.0, f"the call went on {returned_s:.2f} s past the stop; a step is 0.3 s"
    assert len(stage.model_calls) == 1 and moderator.spans == []  # nothing finished, nothing reported
    assert [e for e in sent if e.topic == stage.context.topics.results] == []


def test_a_model_call_that_reaches_no_step_within_the_wait_is_abandoned(tmp_path, monkeypatch):
    monkeypatch.setattr(takes, "HAND_BACK_WAIT_S", 0.5)
    stage, _, messages = _slow_null_stage(tmp_path, seconds_per_image=3.0, steps=1)  # one 6 s step for the chunk

    async def send(emissions):
        pass

    async def run():
        stage.stopping = lambda: len(stage.model_calls) >= 1
        started = time.monotonic()
        take = await render_take(stage, messages, send, model_thread, finishing_thread)
        return take, time.monotonic() - started

    with ThreadPoolExecutor(1) as model_thread, ThreadPoolExecutor(1) as finishing_thread:
        take, took_s = asyncio.run(run())
        assert take.abandoned and take.handed_back == {(0, 0), (0, 1)}
        assert took_s < 3.0, f"render_take waited {took_s:.2f} s for a call it should have abandoned after 0.5 s"
