"""No event stops a stage: whatever one message makes a stage raise ends that request FAILED with a dead letter, and
the rest of the take goes on; a stamp holds only on the topic moderation forwarded the request to."""

import time

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import DeadLetter, ImageResult
from pixelpipe.core.registry import ModelRegistry
from pixelpipe.core.settings import ModerationSettings, RequestLimits, StageSettings, TopicSettings
from pixelpipe.processors.messages import Inbound, StageContext
from pixelpipe.processors.models import DiffusionModels
from pixelpipe.processors.moderation import Verdict
from pixelpipe.processors.moderation_stage import ModerationStage
from pixelpipe.processors.render import GenerateStage
from pixelpipe.processors.stamp import STAMP_HEADER, ModerationStamp
from pixelpipe.producers import new_request

TOPICS = TopicSettings()
STAMP = ModerationStamp("key")
CONTEXT = StageContext(TOPICS, RequestLimits(), StageSettings(), Codec(), "worker", STAMP)


class AllowEveryPrompt:
    def check_many(self, prompts, negative_prompts=None):
        return [Verdict("PROMPT", True, {}, []) for _ in prompts]


def inbound(request, topic, offset, stamped_for=None):
    value = CONTEXT.codec.encode(request)
    headers = {} if stamped_for is None else STAMP.headers(stamped_for, value)
    return Inbound(value, request.request_id.encode(), topic, 0, offset, time.time(), headers=headers)


def ended(emissions):
    """(request id, status, error code) of each result, and the reasons of the dead letters."""
    codec = CONTEXT.codec
    results = [codec.decode_as(ImageResult, e.value) for e in emissions if e.topic == TOPICS.results]
    letters = [codec.decode_as(DeadLetter, e.value) for e in emissions if e.topic == TOPICS.dead_letter]
    return {r.request_id: (r.status, r.error_code) for r in results}, [d.error_reason for d in letters]


def test_a_render_stage_fails_what_it_cannot_render_one_request_at_a_time_and_plans_the_rest(tmp_path):
    registry = tmp_path / "registry.json"
    registry.write_text('{"null": {"kind": "null"}}')
    stage = GenerateStage(CONTEXT, DiffusionModels.from_file(registry), None, None, {})
    fine, crashing, replayed, misrouted = (
        new_request(prompt=f"p{i}", model="null", user_id="u", width=32, height=32) for i in range(4)
    )
    edit = new_request(prompt="e", model="null", user_id="u", kind="EDIT", source_image_uri="file:///s.png")
    resolve = stage.params

    def params(request):
        assert request.request_id != crashing.request_id, "a bug that only this request meets"
        return resolve(request)

    stage.params = params
    take = stage.plan(
        [
            inbound(fine, TOPICS.generate, 0, stamped_for=TOPICS.generate),
            inbound(crashing, TOPICS.generate, 1, stamped_for=TOPICS.generate),
            inbound(replayed, TOPICS.generate, 2, stamped_for=TOPICS.generate_long),  # copied across lanes
            inbound(misrouted, TOPICS.generate, 3, stamped_for=TOPICS.edit),  # copied across stages
            inbound(edit, TOPICS.generate, 4, stamped_for=TOPICS.generate),  # forwarded to the wrong stage
        ]
    )
    results, letters = ended(take.emissions)
    assert [item.request.request_id for chunk in take.chunks for item in chunk.items] == [fine.request_id]
    assert results == {
        crashing.request_id: ("FAILED", "INTERNAL_ERROR"),
        replayed.request_id: ("FAILED", "UNMODERATED"),
        misrouted.request_id: ("FAILED", "UNMODERATED"),
        edit.request_id: ("FAILED", "INVALID_REQUEST"),
    }
    assert [reason.split(":")[0] for reason in letters] == ["internal error", "unmoderated", "unmoderated", "misrouted"]
    assert "a bug that only this request meets" in letters[0]


def test_moderation_fails_what_it_cannot_moderate_one_request_at_a_time_and_stamps_the_rest_for_their_topic():
    class CrashingRegistry(ModelRegistry):
        def get(self, name):
            raise AssertionError(f"a bug that only model {name!r} meets")

    registry = CrashingRegistry({"odd": None})  # type: ignore[dict-item]  # never read: get raises first
    stage = ModerationStage(CONTEXT, ModerationSettings(), AllowEveryPrompt(), None, None, registry, {})
    crashing = new_request(prompt="p", model="odd", user_id="u", width=32, height=32)
    fine = new_request(prompt="q", model="tiny-sd", user_id="u", width=32, height=32)
    emissions = stage.handle_batch([inbound(crashing, TOPICS.requests, 0), inbound(fine, TOPICS.requests, 1)])
    results, letters = ended(emissions)
    assert results == {crashing.request_id: ("FAILED", "INTERNAL_ERROR")}
    assert len(letters) == 1 and "a bug that only model 'odd' meets" in letters[0]
    (forwarded,) = [e for e in emissions if e.topic == TOPICS.generate]
    assert forwarded.key == fine.request_id.encode()
    assert STAMP.verify(TOPICS.generate, forwarded.value, forwarded.headers)
    assert not STAMP.verify(TOPICS.edit, forwarded.value, forwarded.headers)
    assert STAMP_HEADER in forwarded.headers
