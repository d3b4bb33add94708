import dataclasses
import datetime as dt

import pytest

from pixelpipe.core.experiments import assign_variant, parse_experiment_spec
from pixelpipe.core.settings import RequestLimits, TopicSettings
from pixelpipe.core.validation import check_reply_topic, normalise_text, normalised_request
from pixelpipe.producers import InvalidRequestError, new_request, validate_request

SETTINGS = RequestLimits(max_prompt_chars=100, max_image_side=1024)


def request(**changes):
    return dataclasses.replace(new_request(prompt="a red fox", model="tiny-sd", user_id="u1"), **changes)


def test_a_good_request_passes():
    validate_request(request(), SETTINGS)
    validate_request(
        request(kind="EDIT", source_image_uri="s3://b/k.png", mask_uri="s3://b/m.png", strength=0.5), SETTINGS
    )
    references = [f"s3://b/ref-{i}.png" for i in range(4)]  # PIXELPIPE_MAX_REFERENCE_IMAGES
    validate_request(request(kind="EDIT", source_image_uri="s3://b/k.png", reference_image_uris=references), SETTINGS)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": ""}, "prompt: must not be empty"),
        ({"prompt": "   "}, "prompt: must not be empty"),
        ({"prompt": "x" * 101}, "prompt: must be at most 100 characters \\(PIXELPIPE_MAX_PROMPT_CHARS\\), got 101"),
        ({"prompt": "\u200b\u200c\u200d\ufeff\u2060\u202e\u3164"}, "prompt: must not be empty"),  # invisible only
        ({"prompt": "\ufdfa" * 10}, "prompt: must be at most 100 characters .*, got 180"),  # NFKC: 18 letters each
        ({"negative_prompt": "blurry, " * 64_000}, "negative_prompt: must be at most 2000 characters"),
        ({"user_id": "u" * 129}, "user_id: must be at most 128 characters \\(PIXELPIPE_MAX_NAME_CHARS\\), got 129"),
        ({"model": "m" * 200}, "model: must be at most 128 characters"),
        ({"event_id": "e" * 1000}, "event_id: must be at most 128 characters"),
        (
            {"kind": "EDIT", "source_image_uri": "s3://b/" + "k" * 2000},
            "source_image_uri: must be at most 1024 characters \\(PIXELPIPE_MAX_URI_CHARS\\), got 2007",
        ),
        (
            {"kind": "EDIT", "source_image_uri": "s3://b/k", "mask_uri": "s3://b/" + "m" * 1020},
            "mask_uri: must be at most",
        ),
        ({"experiments": {f"exp-{i}": "a" for i in range(33)}}, "experiments: must name at most 32 experiments"),
        ({"experiments": {"exp": "v" * 129}}, "experiments: experiment keys and variant names must be at most 128"),
        ({"reply_topic": "t" * 250}, "reply_topic: must be at most 249 characters"),
        ({"n": 0}, "n: must be between 1 and 10, got 0"),
        ({"n": 11}, "n: must be between 1 and 10, got 11"),
        ({"width": 500}, "width: must be a positive multiple of 8, got 500"),
        ({"height": 0}, "height: must be a positive multiple of 8, got 0"),
        ({"width": 2048}, "width: must be at most 1024 \\(PIXELPIPE_MAX_IMAGE_SIDE\\), got 2048"),
        ({"height": 1032}, "height: must be at most 1024"),
        ({"kind": "EDIT"}, "source_image_uri: is required for an EDIT request"),
        ({"kind": "UPSCALE"}, "kind: must be one of GENERATE, EDIT, got 'UPSCALE'"),
        ({"priority": "URGENT"}, "priority: must be one of INTERACTIVE, BATCH, got 'URGENT'"),
        (
            {"deadline": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)},
            "deadline: is in the past \\(2020-01-01T00:00:00\\+00:00\\)",
        ),
        ({"deadline": dt.datetime(2999, 1, 1)}, "deadline: must be an aware datetime"),
        ({"steps": 0}, "steps: must be between 1 and 150, got 0"),
        ({"steps": 151}, "steps: must be between 1 and 150"),
        ({"guidance": -1.0}, "guidance: must be between 0 and 50"),
        ({"seed": -5}, "seed: must be in 0..2\\^63-1, got -5"),
        ({"user_id": ""}, "user_id: must not be empty"),
        ({"request_id": "../etc/passwd"}, "request_id: must match"),
        ({"request_id": "a" * 129}, "request_id: must match"),
        ({"model": " "}, "model: must not be empty"),
        ({"source_image_uri": "s3://b/k.png"}, "source_image_uri: is only allowed on an EDIT request"),
        (
            {"kind": "EDIT", "source_image_uri": "s3://b/k", "strength": 0.0},
            "strength: must be in \\(0, 1\\]",
        ),
        ({"experiments": {"exp": ""}}, "experiments: must map non-empty experiment keys"),
        ({"reference_image_uris": ["s3://b/r.png"]}, "reference_image_uris: is only allowed on an EDIT request"),
        (
            {"kind": "EDIT", "source_image_uri": "s3://b/k", "reference_image_uris": [f"s3://b/{i}" for i in range(5)]},
            "reference_image_uris: must name at most 4 images \\(PIXELPIPE_MAX_REFERENCE_IMAGES\\), got 5",
        ),
        (
            {"kind": "EDIT", "source_image_uri": "s3://b/k", "reference_image_uris": ["s3://b/r", " "]},
            "reference_image_uris: must be a list of non-empty URIs",
        ),
        (
            {"kind": "EDIT", "source_image_uri": "s3://b/k", "reference_image_uris": ["s3://b/" + "r" * 1020]},
            "reference_image_uris: must be at most 1024 characters \\(PIXELPIPE_MAX_URI_CHARS\\), got 1027",
        ),
        ({"n": True}, "n: must be between 1 and 10, got True"),
    ],
)
def test_bad_requests_are_refused_naming_field_and_rule(changes, message):
    with pytest.raises(InvalidRequestError, match=f"^{message}"):
        validate_request(request(**changes), SETTINGS)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("a red fox", "a red fox"),
        ("na\u200bzi", "nazi"),  # zero-width space
        ("\ufeffgo\u200dre\u2060", "gore"),  # BOM, zero-width joiner, word joiner
        ("\u202egore\u202c", "gore"),  # bidi override and pop
        ("\uff47\uff4f\uff52\uff45", "gore"),  # fullwidth
        ("\U0001d420\U0001d428\U0001d42b\U0001d41e", "gore"),  # mathematical bold
        ("e\u200d\u0301", "\u00e9"),  # what a joiner separated composes once it is gone
        ("caf\u00e9 \u2014 \u00fcn\u00efc\u00f6d\u00e9 \u2713", "caf\u00e9 \u2014 \u00fcn\u00efc\u00f6d\u00e9 \u2713"),
    ],
)
def test_prompts_are_normalised(text, normalised):
    assert normalise_text(text) == normalised
    assert normalise_text(normalised) == normalised


def test_a_normalised_request_carries_normalised_prompts():
    original = request(prompt="\uff46\uff4f\uff58\u200b", negative_prompt="\u200bblur")
    assert (normalised_request(original).prompt, normalised_request(original).negative_prompt) == ("fox", "blur")
    assert normalised_request(request(negative_prompt=None)).negative_prompt is None


def test_a_reply_topic_is_a_legal_name_under_the_prefix():
    topics = TopicSettings()
    check_reply_topic(None, topics)
    check_reply_topic("pixelpipe.replies.svc-a_1", topics)
    check_reply_topic("pixelpipe.replies." + "x" * 231, topics)  # 249 characters, Kafka's longest


@pytest.mark.parametrize(
    ("reply_topic", "message"),
    [
        ("bad topic!", "must be a Kafka topic name"),
        ("", "must be a Kafka topic name"),
        ("pixelpipe.replies." + "x" * 232, "must be a Kafka topic name"),
        ("..", "must be a Kafka topic name"),
        ("svc.results", "must start with 'pixelpipe.replies.'"),
        ("pixelpipe.replies.", "must start with 'pixelpipe.replies.'"),
        ("pixelpipe.results", "must start with 'pixelpipe.replies.'"),
    ],
)
def test_bad_reply_topics_are_refused(reply_topic, message):
    with pytest.raises(InvalidRequestError, match=f"^reply_topic: {message}"):
        check_reply_topic(reply_topic, TopicSettings())


def test_a_reply_topic_is_never_one_of_the_pipelines_own():
    topics = TopicSettings(reply_prefix="pixelpipe.")
    check_reply_topic("pixelpipe.svc-a", topics)
    for own in topics.pipeline():
        with pytest.raises(InvalidRequestError, match="must not be one of the pipeline's own topics"):
            check_reply_topic(own, topics)


def test_error_exposes_field_and_rule():
    with pytest.raises(InvalidRequestError) as caught:
        validate_request(request(n=42), SETTINGS)
    assert caught.value.field == "n"
    assert "between 1 and 10" in caught.value.rule


def test_assignment_is_deterministic_and_follows_weights():
    weights = {"control": 1.0, "treatment": 3.0}
    first = [assign_variant("exp-a", f"user-{i}", weights) for i in range(20_000)]
    again = [assign_variant("exp-a", f"user-{i}", weights) for i in range(20_000)]
    assert first == again
    share = first.count("treatment") / len(first)
    assert 0.73 < share < 0.77
    other = [assign_variant("exp-b", f"user-{i}", weights) for i in range(20_000)]
    assert other != first  # experiments are hashed independently


def test_experiment_spec_parsing():
    assert parse_experiment_spec("steps=fast:1,slow:3") == ("steps", {"fast": 1.0, "slow": 3.0})
    assert parse_experiment_spec("m=a,b") == ("m", {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="expected KEY=variant"):
        parse_experiment_spec("nokey")
    with pytest.raises(ValueError, match="weight 'x' of 'a' is not a number"):
        parse_experiment_spec("k=a:x")
    with pytest.raises(ValueError, match="must be non-negative and not all zero"):
        assign_variant("k", "u", {"a": 0.0})


def test_the_sdk_stamps_active_experiments_and_keeps_given_assignments():
    from pixelpipe.core.experiments import parse_experiments, stamp_assignments

    experiments = parse_experiments(
        {
            "experiments": [
                {
                    "key": "live",
                    "start": "2026-01-01",
                    "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}],
                },
                {
                    "key": "over",
                    "start": "2020-01-01",
                    "end": "2020-02-01",
                    "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}],
                },
                {
                    "key": "kept",
                    "start": "2026-01-01",
                    "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}],
                },
            ]
        }
    )
    record = request(user_id="user-9", experiments={"kept": "b"})
    stamp_assignments(record, experiments, record.created_at)
    assert record.experiments == {"kept": "b", "live": assign_variant("live", "user-9", {"a": 1.0, "b": 1.0})}
