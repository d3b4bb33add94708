"""The stages' pure parts: final parameters, service order, seeds, batching keys, retries."""

import dataclasses
import datetime as dt
import json
import time

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ImageResult
from pixelpipe.core.experiments import parse_experiments
from pixelpipe.core.objects import ObjectStoreError
from pixelpipe.core.registry import ModelEntry, ModelError, ModelRegistry
from pixelpipe.core.settings import ModerationSettings, RequestLimits, StageSettings, TopicSettings
from pixelpipe.core.validation import InvalidRequestError
from pixelpipe.processors.chunks import Pending, in_service_order
from pixelpipe.processors.messages import Inbound, StageContext, arrival_s, is_transient, with_retries
from pixelpipe.processors.models import DiffusionModels
from pixelpipe.processors.moderation import Verdict
from pixelpipe.processors.moderation_stage import ModerationStage
from pixelpipe.processors.params import request_compute, request_seed, resolve_params
from pixelpipe.processors.render import GenerateStage
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.producers import new_request

EXPERIMENTS = parse_experiments(
    {
        "experiments": [
            {
                "key": "a-steps",
                "start": "2026-01-01",
                "variants": [
                    {"name": "control", "weight": 1},
                    {"name": "fast", "weight": 1, "overrides": {"steps": 2}},
                ],
            },
            {
                "key": "b-model",
                "start": "2026-01-01",
                "variants": [
                    {"name": "control", "weight": 1},
                    {"name": "big", "weight": 1, "overrides": {"model": "tiny-sd-b", "steps": 9, "scheduler": "lcm"}},
                ],
            },
            {
                "key": "c-huge",
                "start": "2026-01-01",
                "variants": [
                    {"name": "control", "weight": 1},
                    {"name": "huge", "weight": 1, "overrides": {"steps": 10_000}},
                    {"name": "odd", "weight": 1, "overrides": {"scheduler": "karras-magic"}},
                ],
            },
        ]
    }
)
LIMITS = RequestLimits()


class RegistryOnlyModels:
    """The two things resolve_params asks of DiffusionModels, without loading weights."""

    registry = ModelRegistry(
        {
            "tiny-sd": ModelEntry("tiny-sd", "/models/a", default_steps=4, default_guidance=5.0),
            "tiny-sd-b": ModelEntry("tiny-sd-b", "/models/b", default_steps=6, default_guidance=3.0),
        }
    )

    def default_scheduler(self, name):
        self.registry.get(name)
        return "pndm"


def request(**fields):
    return new_request(**({"prompt": "p", "model": "tiny-sd", "user_id": "u"} | fields))


def params(**fields):
    return resolve_params(request(**fields), EXPERIMENTS, RegistryOnlyModels(), LIMITS)


def test_overrides_of_assigned_variants_apply_in_key_order_then_model_defaults():
    assert params(experiments={"a-steps": "fast"}).steps == 2
    both = params(experiments={"a-steps": "fast", "b-model": "big"})
    assert (both.model, both.steps, both.scheduler) == ("tiny-sd-b", 9, "lcm")  # b-model after a-steps
    assert both.guidance == 3.0  # tiny-sd-b's default
    untouched = params(experiments={"a-steps": "control", "unknown": "x"}, steps=7)
    assert (untouched.model, untouched.steps, untouched.guidance, untouched.scheduler) == ("tiny-sd", 7, 5.0, "pndm")
    assert params().steps == 4  # the model's default


def test_final_parameters_are_validated_after_overrides_naming_the_parameter_and_the_variant():
    with pytest.raises(
        InvalidRequestError,
        match=r"^steps: must be between 1 and 150, got 10000 \(set by experiment c-huge, variant huge\)",
    ):
        params(experiments={"c-huge": "huge"})
    with pytest.raises(InvalidRequestError, match=r"^scheduler: must be one of .*, got 'karras-magic'") as caught:
        params(experiments={"c-huge": "odd"})
    assert caught.value.field == "scheduler"
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        params(model="nope")


def pending(**fields):
    at = fields.pop("at", 0.0)
    item = request(**fields)
    return Pending(Inbound(b"", None, "t", 0, 0, at), item, resolve_params(item, {}, RegistryOnlyModels(), LIMITS))


def test_interactive_first_then_earliest_deadline_then_oldest():
    soon = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    later = soon + dt.timedelta(hours=1)
    items = {
        "batch-old": pending(prompt="batch-old", at=1.0),
        "batch-deadline": pending(prompt="batch-deadline", at=5.0, deadline=soon),
        "interactive-late": pending(prompt="interactive-late", priority="INTERACTIVE", at=9.0),
        "interactive-deadline": pending(prompt="interactive-deadline", priority="INTERACTIVE", at=9.5, deadline=later),
    }
    order = [p.request.prompt for p in in_service_order(list(items.values()))]
    assert order == ["interactive-deadline", "interactive-late", "batch-deadline", "batch-old"]


def test_users_take_turns_so_a_flood_in_a_take_does_not_hold_anyone_else_behind_it():
    flood = [pending(prompt=f"flood-{k}", user_id="flooder", at=float(k)) for k in range(6)]
    others = [pending(prompt="other", user_id="u2", at=10.0), pending(prompt="urgent", user_id="u3", at=11.0)]
    urgent = pending(prompt="urgent-flood", user_id="flooder", priority="INTERACTIVE", at=12.0)
    order = [p.request.prompt for p in in_service_order([*flood, *others, urgent])]
    # Priority first; then each user's first request, then each one's second, and so on.
    assert order == ["urgent-flood", "flood-0", "other", "urgent", *(f"flood-{k}" for k in range(1, 6))]


def test_seed_is_the_request_seed_or_stable_per_request_id():
    assert request_seed(request(seed=42)) == 42
    unseeded = request(request_id="req-7")
    assert (
        request_seed(unseeded)
        == request_seed(dataclasses.replace(unseeded))
        != request_seed(request(request_id="req-8"))
    )


def test_only_compatible_requests_share_a_batch():
    # Requests are grouped into model calls by their final parameters.
    assert params() == params(prompt="other", seed=3, user_id="v")
    assert params() != params(width=64)
    assert params() != params(n=2)
    assert params() != params(experiments={"a-steps": "fast"})


def test_transient_errors_are_retried_with_backoff_within_the_budget_and_bad_input_is_not():
    settings = StageSettings(storage_retry_budget_s=5.0, retry_backoff_ms=1)
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return "ok"

    assert with_retries(flaky, settings, "test") == "ok" and len(calls) == 3

    def down():
        calls.append(time.monotonic())
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    calls.clear()
    with pytest.raises(EndpointConnectionError):  # the budget runs out
        with_retries(down, StageSettings(storage_retry_budget_s=0.05, retry_backoff_ms=10), "t")
    assert 2 <= len(calls) <= 4 and calls[-1] - calls[0] <= 0.05
    calls.clear()
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.1)  # the deadline (less its margin) comes first
    with pytest.raises(EndpointConnectionError):
        with_retries(down, StageSettings(storage_retry_budget_s=60.0, retry_backoff_ms=20), "t", soon)
    assert calls[-1] - calls[0] < 0.2
    calls.clear()

    def outside_the_store():
        calls.append(time.monotonic())
        raise ObjectStoreError("outside the store")

    with pytest.raises(ObjectStoreError):  # bad input: never retried
        with_retries(outside_the_store, settings, "t")
    assert len(calls) == 1
    assert not is_transient(ObjectStoreError("outside the store"))
    assert is_transient(
        ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Put")
    )
    assert not is_transient(
        ClientError({"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "Get")
    )


def test_the_limiters_clock_is_the_brokers_append_time_or_the_workers_never_the_producers():
    produced_long_ago = Inbound(b"", None, "t", 0, 0, timestamp_s=1.0)
    assert arrival_s(produced_long_ago, read_s=2000.0) == 2000.0
    appended = Inbound(b"", None, "t", 0, 0, timestamp_s=1500.0, appended_s=1500.0)
    assert arrival_s(appended, read_s=2000.0) == 1500.0


def test_each_model_s_max_batch_bounds_its_calls_within_the_stage_s(tmp_path):
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"small": {"kind": "null", "max_batch": 2}, "wide": {"kind": "null"}}))
    stamp = ModerationStamp("key")
    context = StageContext(TopicSettings(), LIMITS, StageSettings(max_batch=3), Codec(), "worker", stamp)
    stage = GenerateStage(context, DiffusionModels.from_file(registry), None, None, {})  # render needs no store
    requests = [
        new_request(prompt=f"p{i}", model=model, user_id="u", width=64, height=64, seed=i)
        for model in ("small", "wide")
        for i in range(5)
    ]
    messages = [
        Inbound(value, r.request_id.encode(), "t", 0, offset, time.time(), headers=stamp.headers("t", value))
        for offset, (r, value) in enumerate((r, context.codec.encode(r)) for r in requests)
    ]
    take = stage.plan(messages)
    assert [(chunk.params.model, len(chunk.items)) for chunk in take.chunks] == [
        ("small", 2),
        ("small", 2),
        ("small", 1),
        ("wide", 3),
        ("wide", 2),
    ]


# -- compute budgets and the long lane ----------------------------------------------------------------------
def charge(width, height, steps, images, model="tiny-sd"):
    """A request's compute as the registry's entry charges it: device seconds, by its family's default fit."""
    return RegistryOnlyModels.registry.get(model).compute(width, height, steps, images)


def test_a_request_over_the_per_request_compute_budget_is_invalid_naming_the_budget():
    assert charge(1024, 1024, 50, 4) < LIMITS.max_request_compute  # four 1024x1024 images at 50 steps fit
    assert params(width=1024, height=1024, n=4, steps=50).steps == 50
    with pytest.raises(InvalidRequestError) as caught:
        params(width=2048, height=2048, n=10, steps=150)
    assert str(caught.value) == (
        f"compute: {charge(2048, 2048, 150, 10):.2f} device seconds is over the per-request budget of 60 "
        "(PIXELPIPE_MAX_REQUEST_COMPUTE)"
    )
    # Counted after the overrides and the model's defaults, and naming the variant that made it so.
    huge_default = RegistryOnlyModels()
    big_entry = ModelEntry("big", "/m", kind="flux", default_steps=100)
    huge_default.registry = ModelRegistry({"big": big_entry})
    with pytest.raises(InvalidRequestError, match=rf"^compute: {big_entry.compute(2048, 2048, 100, 1):.2f} device"):
        resolve_params(request(model="big", width=2048, height=2048), {}, huge_default, LIMITS)
    steps_experiment = parse_experiments(
        {
            "experiments": [
                {
                    "key": "more",
                    "start": "2026-01-01",
                    "variants": [
                        {"name": "control", "weight": 1},
                        {"name": "x", "weight": 1, "overrides": {"steps": 150}},
                    ],
                }
            ]
        }
    )
    big = request(width=2048, height=2048, n=2, experiments={"more": "x"})
    with pytest.raises(
        InvalidRequestError, match=r"over the per-request budget .*\(set by experiment more, variant x\)$"
    ):
        resolve_params(big, steps_experiment, RegistryOnlyModels(), LIMITS)
    assert request_compute(big, steps_experiment, RegistryOnlyModels.registry, LIMITS) == charge(2048, 2048, 150, 2)
    # The renderer fails these, naming the rule: an unknown model, steps out of range.
    assert request_compute(request(model="nope"), {}, RegistryOnlyModels.registry, LIMITS) is None
    assert request_compute(request(steps=10_000), {}, RegistryOnlyModels.registry, LIMITS) is None


class AllowEveryPrompt:
    def check_many(self, prompts, negative_prompts=None):
        return [Verdict("PROMPT", True, {}, []) for _ in prompts]


def moderate(requests, **moderation):
    """Moderation of ``requests`` in one take, with the registry's entries: where each went (its topic), and the
    results of those that ended there."""
    stamp = ModerationStamp("key")
    topics = TopicSettings()
    context = StageContext(topics, LIMITS, StageSettings(), Codec(), "worker", stamp)
    stage = ModerationStage(
        context,
        ModerationSettings(**moderation),
        AllowEveryPrompt(),
        None,
        None,
        RegistryOnlyModels.registry,
        EXPERIMENTS,
    )
    messages = [
        Inbound(context.codec.encode(r), r.request_id.encode(), topics.requests, 0, i, 1000.0, appended_s=1000.0 + i)
        for i, r in enumerate(requests)
    ]
    emissions = stage.handle_batch(messages)
    went = {e.key.decode(): e.topic for e in emissions if e.topic in topics.render()}
    results = {
        e.key.decode(): context.codec.decode_as(ImageResult, e.value) for e in emissions if e.topic == topics.results
    }
    return went, results


def test_moderation_sends_long_requests_to_the_long_lane_and_fails_those_over_the_budget():
    topics = TopicSettings()
    short = request(width=512, height=512, steps=20)
    long = request(width=2048, height=2048, n=2, steps=30)
    fast_variant = request(width=2048, height=2048, n=2, steps=30, experiments={"a-steps": "fast"})  # 2 steps
    lane = ModerationSettings().long_request_compute
    assert charge(512, 512, 20, 1) < lane < charge(2048, 2048, 30, 2) < LIMITS.max_request_compute
    assert charge(2048, 2048, 2, 2) < lane
    unknown = request(model="nope", width=2048, height=2048, n=10, steps=150)  # the renderer fails it
    huge = request(width=2048, height=2048, n=10, steps=150)
    went, results = moderate([short, long, fast_variant, unknown, huge])
    assert went == {
        short.request_id: topics.generate,
        long.request_id: topics.generate_long,
        fast_variant.request_id: topics.generate,
        unknown.request_id: topics.generate,
    }
    assert (results[huge.request_id].status, results[huge.request_id].error_code) == ("FAILED", "INVALID_REQUEST")
    assert results[huge.request_id].error_message == (
        f"compute: {charge(2048, 2048, 150, 10):.2f} device seconds is over the per-request budget of 60 "
        "(PIXELPIPE_MAX_REQUEST_COMPUTE)"
    )
    went, _ = moderate([long], long_request_compute=0)  # 0 turns the lane off
    assert went == {long.request_id: topics.generate}
    stage = ModerationStage(
        StageContext(topics, LIMITS, StageSettings(), Codec(), "w", ModerationStamp("k")),
        ModerationSettings(),
        None,
        None,
        None,
    )
    edit = request(kind="EDIT", source_image_uri="file:///s.png")
    assert [stage.topic_for(edit, compute) for compute in (None, lane, lane + 0.5)] == [
        topics.edit,
        topics.edit,
        topics.edit_long,
    ]


def test_a_user_over_the_compute_budget_is_rate_limited_and_others_are_not():
    users = [request(width=2048, height=2048, steps=30, user_id=user) for user in ("heavy",) * 4 + ("light",)]
    each = charge(2048, 2048, 30, 1)
    budget = round(3.2 * each, 1)  # three fit in a minute, and a fourth 3 s later does not
    went, results = moderate(users, max_user_compute_per_minute=budget)
    assert len(went) == 4 and users[4].request_id in went
    refused = results[users[3].request_id]
    assert (refused.status, refused.error_code) == ("FAILED", "RATE_LIMITED")
    assert refused.error_message == (
        f"user heavy is over the compute budget of {budget:g} device seconds per minute "
        f"(PIXELPIPE_MAX_USER_COMPUTE_PER_MINUTE); this request needs {each:.2f}"
    )


def test_the_long_lanes_are_topics_of_the_pipeline_read_by_renderers_and_written_by_moderation():
    from confluent_kafka.admin import AclOperation

    from pixelpipe.core.topics import role_acls
    from pixelpipe.processors.app import stage_topics

    topics = TopicSettings()
    assert {topics.generate_long, topics.edit_long} <= set(topics.pipeline())
    assert stage_topics(topics, ["generate"])[:2] == [topics.generate, topics.generate_long]
    assert set(topics.render()) <= set(stage_topics(topics, ["moderation"]))

    def granted(role, operation):
        return {b.name for b in role_acls(role, f"User:{role}", topics, "g", "s") if b.operation == operation}

    assert set(topics.render()) <= granted("renderer", AclOperation.READ) - granted("renderer", AclOperation.WRITE)
    assert set(topics.render()) <= granted("moderation", AclOperation.WRITE)


class RejectRedImages:
    """An input-image moderator that rejects pure red images and records what it was shown."""

    def __init__(self):
        self.seen = []

    def check(self, images, stage):
        self.seen += [image.getpixel((0, 0)) for image in images]
        return [Verdict(stage, image.getpixel((0, 0)) != (255, 0, 0), {}, []) for image in images]


def test_moderation_checks_every_input_image_of_an_edit_and_names_a_bad_reference(tmp_path):
    from PIL import Image

    from pixelpipe.core.objects import FileObjectStore
    from pixelpipe.processors.imaging import encode_png

    store = FileObjectStore(tmp_path)
    uri = {
        colour: store.put(f"in/{colour}.png", encode_png(Image.new("RGB", (8, 8), colour)), "image/png").uri
        for colour in ("blue", "green", "red")
    }
    topics = TopicSettings()
    context = StageContext(topics, LIMITS, StageSettings(), Codec(), "worker", ModerationStamp("key"))
    images = RejectRedImages()
    stage = ModerationStage(context, ModerationSettings(), AllowEveryPrompt(), images, store)

    def moderated(references):
        edit = request(kind="EDIT", source_image_uri=uri["blue"], reference_image_uris=references)
        message = Inbound(context.codec.encode(edit), edit.request_id.encode(), topics.requests, 0, 0, 1000.0)
        emissions = stage.handle_batch([message])
        results = [context.codec.decode_as(ImageResult, e.value) for e in emissions if e.topic == topics.results]
        return (results[0].status, results[0].error_message) if results else "forwarded"

    assert moderated([uri["green"]]) == "forwarded"
    assert images.seen == [(0, 0, 255), (0, 128, 0)]  # the source and the reference
    assert moderated([uri["green"], uri["red"]])[0] == "REJECTED"
    missing = store.uri_for("in/missing.png")
    assert moderated([uri["green"], missing]) == ("FAILED", f"reference image 2 ({missing}): no object at {missing}")


class WithKlein(RegistryOnlyModels):
    registry = ModelRegistry(
        RegistryOnlyModels.registry.entries
        | {"tiny-klein": ModelEntry("tiny-klein", "/models/k", "flux2-klein", max_source_images=3)}
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"model": "tiny-sd", "reference_image_uris": ["file:///r.png"]},
            r"^reference_image_uris: model 'tiny-sd' takes at most 1 source image\(s\) per edit, got 2 "
            r"\(the source and 1 references\)$",
        ),
        (
            {"reference_image_uris": ["file:///r.png"], "experiments": {"b-model": "big"}},
            r"^reference_image_uris: model 'tiny-sd-b' takes at most 1 .* \(set by experiment b-model, variant big\)$",
        ),
        (
            {"reference_image_uris": ["file:///r.png"] * 3},
            r"^reference_image_uris: model 'tiny-klein' takes at most 3 source image\(s\) per edit, got 4",
        ),
        ({"negative_prompt": "blurry"}, r"^negative_prompt: model 'tiny-klein' \(flux2-klein\) takes no negative"),
    ],
)
def test_an_edit_with_more_images_than_its_model_takes_is_invalid_naming_the_model_and_its_limit(changes, message):
    edit = request(**({"kind": "EDIT", "model": "tiny-klein", "source_image_uri": "file:///s.png"} | changes))
    with pytest.raises(InvalidRequestError, match=message):
        resolve_params(edit, EXPERIMENTS, WithKlein(), LIMITS)
    two = request(kind="EDIT", model="tiny-klein", source_image_uri="file:///s.png", reference_image_uris=["r"] * 2)
    assert resolve_params(two, EXPERIMENTS, WithKlein(), LIMITS).model == "tiny-klein"
