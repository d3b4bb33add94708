"""Moderation with the models shipped in the wheels: prompt rules and profanity, the image detector, policy files."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from PIL import Image

from pixelpipe.processors.moderation import (
    DEFAULT_RULES,
    OUTPUT_IMAGE,
    ImageModerator,
    ModerationPolicy,
    NudeNetDetector,
    PolicyError,
    ProfanityScorer,
    PromptModerator,
    verdict_from_detections,
)


@pytest.fixture(scope="module")
def prompts() -> PromptModerator:
    return PromptModerator()


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("a NUDE figure study", "sexual"),
        ("explicit photo of a child", "sexual/minors"),
        ("a gory battlefield", "violence"),
        ("a note about suicide", "self-harm"),
        ("a poster with a swastika", "hate"),
        ("a lab cooking meth", "illicit"),
    ],
)
def test_rule_rejects_its_category_with_score(prompts: PromptModerator, prompt: str, category: str) -> None:
    verdict = prompts.check(prompt)
    assert verdict.stage == "PROMPT"
    assert not verdict.allowed
    assert category in verdict.rejected_categories
    assert verdict.scores[category] == 1.0


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("a g\u200bory battlefield", "violence"),  # zero-width space inside the word
        ("a na\u202dz\u202ci rally", "hate"),  # bidi controls inside the word
        ("a lab cooking m\ufeffe\u200dth", "illicit"),  # BOM and zero-width joiner
        ("a \uff47\uff4f\uff52\uff45 scene", "violence"),  # fullwidth letters
        ("a \U0001d427\U0001d41a\U0001d433\U0001d422 flag", "hate"),  # mathematical bold
        ("a n\u0430zi flag", "hate"),  # Cyrillic a
        ("\u0421\u041e\u0421\u0410INE for sale", "illicit"),  # Cyrillic capitals
        ("a m\u03b1ss\u03b1cre", "violence"),  # Greek alpha
    ],
)
def test_invisible_and_look_alike_variants_of_blocked_words_are_caught(
    prompts: PromptModerator, prompt: str, category: str
) -> None:
    verdict = prompts.check(prompt)
    assert not verdict.allowed
    assert category in verdict.rejected_categories


def test_look_alike_folding_leaves_ordinary_text_of_other_scripts_alone(prompts: PromptModerator) -> None:
    assert prompts.check("\u043a\u043e\u0442 \u043d\u0430 \u043a\u0440\u044b\u0448\u0435").allowed  # кот на крыше
    assert prompts.check(
        "\u03bf \u03ae\u03bb\u03b9\u03bf\u03c2 \u03c3\u03c4\u03b7 \u03b8\u03ac\u03bb\u03b1\u03c3\u03c3\u03b1"
    ).allowed


def test_minor_terms_alone_do_not_fire_sexual_minors(prompts: PromptModerator) -> None:
    verdict = prompts.check("children flying kites in a park")
    assert verdict.allowed
    assert verdict.scores["sexual/minors"] == 0.0


def test_rules_match_whole_words_only(prompts: PromptModerator) -> None:
    # "sextant" and "Essex" contain "sex"; "methodical" contains "meth".
    assert prompts.check("a sextant on a methodical map of Essex").allowed


def test_clean_prompt_passes_with_every_category_scored(prompts: PromptModerator) -> None:
    verdict = prompts.check("a watercolour of a lighthouse at dawn")
    assert verdict.allowed
    assert verdict.rejected_categories == []
    assert set(verdict.scores) == {"profanity", *DEFAULT_RULES}
    assert verdict.scores["profanity"] < 0.5


def test_profanity_is_scored_by_the_shipped_model(prompts: PromptModerator) -> None:
    clean, profane = prompts.check_many(["a bowl of fruit on a table", "fuck you, you piece of shit"])
    assert clean.scores["profanity"] < 0.2
    assert profane.scores["profanity"] > 0.9
    assert profane.rejected_categories == ["profanity"]


def test_negative_prompt_is_scored_for_profanity_not_rules(prompts: PromptModerator) -> None:
    assert prompts.check("a portrait", negative_prompt="nude, gore, blurry").allowed
    assert prompts.check("a portrait", negative_prompt="fuck you").rejected_categories == ["profanity"]


def test_check_many_calls_the_model_once(prompts: PromptModerator, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = prompts._predict_prob

    def counting(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return real(texts)

    monkeypatch.setattr(prompts, "_predict_prob", counting)
    verdicts = prompts.check_many(["a cat", "a dog", "a gory scene"], [None, "blurry", None])
    assert len(calls) == 1
    assert calls[0] == ["a cat", "a dog", "a gory scene", "blurry"]
    assert [v.allowed for v in verdicts] == [True, True, False]


def test_thresholds_from_a_policy_file_change_the_verdict(tmp_path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"profanity_threshold": 1.0, "rules": {"violence": [["dragon"]]}}))
    policy = ModerationPolicy.from_file(path)
    assert policy.thresholds["hate"] == 0.5  # untouched keys keep their defaults
    moderator = PromptModerator(policy)
    assert moderator.check("what the hell").allowed  # about 0.99: under the file's threshold of 1.0
    assert moderator.check("a friendly dragon").rejected_categories == ["violence"]
    assert not PromptModerator().check("what the hell").allowed


def test_an_empty_rule_switches_its_category_off() -> None:
    moderator = PromptModerator(ModerationPolicy.from_mapping({"rules": {"violence": []}}))
    assert moderator.check("a gory battlefield").allowed
    assert moderator.check("a cat").scores["violence"] == 0.0


def test_no_policy_file_gives_the_defaults() -> None:
    assert ModerationPolicy.from_file(None) == ModerationPolicy()


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ({"thresholds": {"violence": "high"}}, "thresholds['violence']"),
        ({"profanity_threshold": 2}, "profanity_threshold"),
        ({"rules": {"violence": ["gore"]}}, "rules['violence']"),
        ({"rules": {"violence": [["(unclosed"]]}}, "rules['violence'][0][0]"),
        ({"rules": {"gambling": [["casino"]]}}, "rules['gambling']"),
        ({"image_labels": {"ANUS_EXPOSED": "sexy"}}, "image_labels['ANUS_EXPOSED']"),
        ({"treshold": {}}, "treshold"),
    ],
)
def test_malformed_policy_file_names_the_key(tmp_path, content: dict, named: str) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(content))
    with pytest.raises(PolicyError, match=r"policy\.json: .*" + named.replace("[", r"\[").replace("]", r"\]")):
        ModerationPolicy.from_file(path)


def test_invalid_json_is_a_policy_error(tmp_path) -> None:
    path = tmp_path / "policy.json"
    path.write_text("{thresholds: 1}")
    with pytest.raises(PolicyError, match="not valid JSON"):
        ModerationPolicy.from_file(path)


def test_exposed_label_rejects_as_sexual_and_covered_labels_do_not() -> None:
    policy = ModerationPolicy()
    canned = [
        {"class": "FACE_FEMALE", "score": 0.95, "box": [0, 0, 10, 10]},
        {"class": "FEMALE_BREAST_COVERED", "score": 0.9, "box": [0, 0, 10, 10]},
        {"class": "BUTTOCKS_EXPOSED", "score": 0.62, "box": [0, 0, 10, 10]},
        {"class": "FEMALE_GENITALIA_EXPOSED", "score": 0.81, "box": [0, 0, 10, 10]},
    ]
    verdict = verdict_from_detections(canned, OUTPUT_IMAGE, policy)
    assert verdict.stage == "OUTPUT_IMAGE"
    assert not verdict.allowed
    assert verdict.rejected_categories == ["sexual"]
    assert verdict.scores == {"sexual": pytest.approx(0.81)}
    covered = verdict_from_detections(canned[:2], OUTPUT_IMAGE, policy)
    assert covered.allowed
    assert covered.scores == {"sexual": 0.0}


def test_detector_loads_and_runs_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("moderation tried to open a network connection")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    moderator = ImageModerator()
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1)))
    verdicts = moderator.check([noise, gradient], "INPUT_IMAGE")
    assert [v.stage for v in verdicts] == ["INPUT_IMAGE", "INPUT_IMAGE"]
    assert all(v.allowed for v in verdicts)
    assert all(v.scores["sexual"] < 0.5 for v in verdicts)


def test_image_check_rejects_an_unknown_stage() -> None:
    with pytest.raises(ValueError, match="stage"):
        ImageModerator().check([], "PROMPT")


def test_null_detector_passes_every_image_without_loading_nudenet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(NudeNetDetector, "__init__", _fail_if_called)
    moderator = ImageModerator(detector="null")
    images = [Image.new("RGB", (64, 32), (200, 150, 120)), Image.new("RGB", (8, 8))]
    verdicts = moderator.check(images, OUTPUT_IMAGE)
    assert [(v.stage, v.allowed, v.scores, v.rejected_categories) for v in verdicts] == [
        (OUTPUT_IMAGE, True, {"sexual": 0.0}, [])
    ] * 2


def test_an_unknown_detector_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown image detector 'nudity-ai'; choose from nudenet, null"):
        ImageModerator(detector="nudity-ai")


def _fail_if_called(*args: object) -> None:
    raise AssertionError("the null detector loaded nudenet")


def test_profanity_scores_are_the_shipped_model_s() -> None:
    from profanity_check import predict_prob

    texts = [
        "a red fox in fresh snow",
        "what the hell",
        "Fuck YOU, fuck you!",
        "",
        "the and of it",  # stop words only: no feature at all
        "qwxz zzyzx",  # no word the model knows
        "nude, gore, blurry",
        "a portrait " * 40,
    ]
    assert ProfanityScorer()(texts) == pytest.approx(predict_prob(texts), abs=1e-12)
