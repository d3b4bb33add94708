# ruff: noqa: RUF001 (ordinary prompts in other scripts hold letters drawn like Latin ones)
"""Disguised prompts: Unicode look-alikes, accents, blanks and leet are read as the words they spell, prompts that
say nothing once read are refused as empty, and ordinary prompts in any script pass."""

from __future__ import annotations

import dataclasses

import pytest

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ImageResult
from pixelpipe.core.settings import RequestLimits, StageSettings, TopicSettings
from pixelpipe.core.validation import InvalidRequestError, validate_request
from pixelpipe.processors.messages import Emitter, Inbound, StageContext, decode_request
from pixelpipe.processors.moderation import ProfanityScorer, PromptModerator, skeleton, text_for_scoring
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.producers import new_request


@pytest.fixture(scope="module")
def prompts() -> PromptModerator:
    return PromptModerator()


# The table of docs/operators/moderation.md ("Disguised prompts"): what each disguise reads as.
@pytest.mark.parametrize(
    ("disguised", "read"),
    [
        ("c\u0585caine", "cocaine"),  # Armenian oh
        ("\u1d0d\u1d07\u1d1b\u029c", "meth"),  # Latin small capitals
        ("m\u00e9th", "meth"),  # precomposed accent
        ("m\u0336e\u0336t\u0336h\u0336", "meth"),  # combining strike-through
        ("me\u2800th", "meth"),  # braille pattern blank
        ("\u041c\u0415\u0422\u041d", "meth"),  # Cyrillic capitals
        ("NAZ\u0406", "nazi"),  # Cyrillic capital I: read as I, not as the l of UTS #39's prototype
        ("\U0001f17c\U0001f174\U0001f183\U0001f177", "meth"),  # negative squared letters
        ("\uff47\uff4f\uff52\uff45", "gore"),  # fullwidth
        ("Stra\u00dfe", "strasse"),  # case folding
    ],
)
def test_skeleton_takes_off_each_disguise(disguised: str, read: str) -> None:
    assert skeleton(disguised) == read


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("a lab selling c\u0585caine", "illicit"),  # Armenian oh
        ("\u1d0d\u1d07\u1d1b\u029c for sale", "illicit"),  # small capitals
        ("a lab cooking m\u00e9th", "illicit"),  # precomposed accent
        ("a lab cooking me\u0301th", "illicit"),  # combining accent
        ("a lab cooking m\u0336e\u0336t\u0336h\u0336", "illicit"),  # strike-through
        ("a lab cooking m\u0310\u0351e\u0334\u0358t\u035bh", "illicit"),  # stacked marks ("zalgo")
        ("a lab cooking m\u20dde\u20ddt\u20ddh\u20dd", "illicit"),  # enclosing circles
        ("a lab cooking me\u2800th", "illicit"),  # braille blank inside the word
        ("a g\u3164ore scene", "violence"),  # Hangul filler
        ("a go\ufe0fre scene", "violence"),  # variation selector
        ("a \u0262\u1d0f\u0280\u1d07 scene", "violence"),  # small capitals
        ("a \u041c\u0415\u0422\u041d lab", "illicit"),  # Cyrillic capitals
        ("a NAZ\u0406 rally", "hate"),  # Cyrillic capital I
        ("a \U0001f17c\U0001f174\U0001f183\U0001f177 lab", "illicit"),  # negative squared letters
        ("f\u057dck you", "profanity"),  # Armenian seh, for the profanity model
        ("\ua730\u1d1c\u1d04\u1d0b \u028f\u1d0f\u1d1c", "profanity"),  # small capitals, for the profanity model
    ],
)
def test_disguised_blocked_words_are_refused(prompts: PromptModerator, prompt: str, category: str) -> None:
    verdict = prompts.check(prompt)
    assert not verdict.allowed
    assert category in verdict.rejected_categories


def test_a_disguised_negative_prompt_is_scored_for_profanity(prompts: PromptModerator) -> None:
    negative = "\ua730\u1d1c\u1d04\u1d0b \u028f\u1d0f\u1d1c"  # small capitals
    assert prompts.check("a portrait", negative_prompt=negative).rejected_categories == ["profanity"]


# Leet and spelled-out spellings of the default rules' terms (docs/operators/moderation.md, "Disguised prompts").
LEET_RULE_TERMS = [
    ("m e t h", "illicit"), ("c0c41n3", "illicit"), ("p.o.r.n", "sexual"), ("s3x", "sexual"), ("n4z1", "hate"),
    ("g0re", "violence"), ("h3r01n", "illicit"), ("nud3", "sexual"), ("p0rn", "sexual"), ("s e x", "sexual"),
    ("n.a.z.i", "hate"), ("su1c1d3", "self-harm"), ("m3th", "illicit"), ("k k k", "hate"), ("n-u-d-e", "sexual"),
    ("p 0 r n", "sexual"), ("5ex", "sexual"), ("c.o.c.a.i.n.e", "illicit"), ("g.o.r.e", "violence"),
    ("m3thamph3tamin3", "illicit"),
]  # fmt: skip


@pytest.mark.parametrize(("prompt", "category"), LEET_RULE_TERMS)
def test_leet_and_spelled_out_rule_terms_are_refused(prompts: PromptModerator, prompt: str, category: str) -> None:
    assert category in prompts.check(f"a poster saying {prompt} in red").rejected_categories


@pytest.mark.parametrize("prompt", ["f u c k you", "you are a b!tch", "sh1t", "a$$hole"])
def test_leet_and_spelled_out_profanity_is_refused(prompts: PromptModerator, prompt: str) -> None:
    assert prompts.check(prompt).rejected_categories == ["profanity"]


# Spellings of profane words, for the profanity model's recall with and without the reading
# (docs/operators/moderation.md).
LEET_PROFANITY = [
    "f u c k", "f.u.c.k", "f-u-c-k", "f_u_c_k", "fu ck", "fuk", "fck", "f*ck", "f**k", "fvck", "phuck", "fuc|<",
    "sh1t", "5h1t", "sh!t", "s h i t", "b1tch", "b!tch", "8itch", "b i t c h", "a$$hole", "@sshole", "a s s h o l e",
    "c0ck", "c o c k", "d1ck", "d!ck", "pu$$y", "wh0re", "sl*t", "5lut", "c u n t", "cvnt", "b@stard",
    "m0therf*cker", "fuckk", "sh!tty", "b1tches", "f.u.c.k you", "you are a b!tch",
]  # fmt: skip


def test_the_reading_raises_the_profanity_model_s_recall_on_leet_spellings() -> None:
    score = ProfanityScorer()
    as_written = sum(p >= 0.5 for p in score(LEET_PROFANITY))
    as_read = sum(p >= 0.5 for p in score([text_for_scoring(text) for text in LEET_PROFANITY]))
    assert as_read > 2 * as_written


@pytest.mark.parametrize(
    ("text", "read"),
    [
        ("version 3.5.1, sd 1.5, an rtx 4090", "version 3.5.1, sd 1.5, an rtx 4090"),  # numbers stay numbers
        ("wow! what the hell!", "wow! what the hell!"),  # a symbol after a word is punctuation
        ("the U.S.A. flag", "the usa. flag"),
        ("a 4k 3d render", "a ak ed render"),  # read, yet no blocked word: ordinary prompts pass (below)
    ],
)
def test_the_leet_reading_reads_only_words(text: str, read: str) -> None:
    assert text_for_scoring(text) == read


ORDINARY = [
    "кот спит на крыше под луной",  # Russian: a cat sleeps on the roof under the moon
    "Мальчик играет с собакой в парке",  # Russian: a boy plays with a dog in the park
    "Київ навесні, каштани цвітуть",  # Ukrainian: Kyiv in spring, chestnuts in bloom
    "ο ήλιος στη θάλασσα",  # Greek: the sun on the sea
    "Ελληνική σαλάτα με φέτα",  # Greek: Greek salad with feta
    "Արարատ լեռը արևածագին",  # Armenian: Mount Ararat at sunrise
    "կատուն քնած է պատուհանի մոտ",  # Armenian: the cat is asleep by the window
    "猫が屋根の上で寝ている",  # Japanese: a cat asleep on the roof
    "富士山と桜、浮世絵風",  # Japanese: Mount Fuji and cherry blossom, ukiyo-e style
    "山水画，云雾缭绕的山峰",  # Chinese: a landscape painting, peaks in mist
    "고양이가 창가에서 잔다",  # Korean: a cat sleeps by the window
    "قطة نائمة على السطح",  # Arabic: a cat asleep on the roof
    "חתול ישן על הגג",  # Hebrew: a cat asleep on the roof
    "ताजमहल सूर्योदय के समय",  # Hindi: the Taj Mahal at sunrise
    "แมวนอนบนหลังคา",  # Thai: a cat sleeping on the roof
    "თბილისი ღამით",  # Georgian: Tbilisi at night
    "Kapadokya'da sıcak hava balonları",  # Turkish: hot-air balloons in Cappadocia
    "Phố cổ Hội An về đêm",  # Vietnamese: Hoi An's old town at night
    "Une pâtisserie à Paris, crème brûlée",  # French: a patisserie in Paris, crème brûlée
    # What UTS #39's ASCII pairs (m and rn, I and l) would have refused: ASCII is never folded.
    "a pomegranate on a plate",
    "the ruins of Pompeii",
    "a pom-pom hat",
    "Illinois farmland",
    # Versions, sizes and acronyms, which a careless leet reading would refuse.
    "letters A B C on wooden blocks", "the U.S.A. flag on a pole", "a 4k 3d render, sd 1.5, mp3 cover art",
    "1girl, solo, 8k, masterpiece", "an rtx 4090 gpu on a desk", "version 3.5.1 release banner",
    "f/1.8 50mm lens photo", "route 66 sign at dusk", "an s3 bucket icon", "h2o molecule model", "a 4x4 truck in mud",
    "the year 1984", "a k-pop idol on stage", "a t-rex skeleton", "x-ray of a hand", "e.t. phone home",
    "an a.i. robot painting", "an ak-47 in a museum case", "p.s. i love you written in sand",
    "an s.o.s. message on a beach", "a s.w.a.t. team van", "plan a, b or c", "the word a s s e m b l y", "r2-d2 toy",
    "c-3po", "m&m candies", "b2b sales chart", "1337 hacker terminal", "a b c d e f g alphabet poster",
    "x y z axes plot", "g.o.a.t. jersey", "t.n.t. crate", "b-52 bomber in flight", "3 kids playing",
    "an f-16 jet", "a v8 engine", "mp5 airsoft", "w3c logo", "the 3 musketeers", "cl4p-tp robot",
]  # fmt: skip


def test_ordinary_prompts_in_any_script_pass(prompts: PromptModerator) -> None:
    verdicts = prompts.check_many(ORDINARY)
    refused = {text: v.rejected_categories for text, v in zip(ORDINARY, verdicts, strict=True) if not v.allowed}
    assert refused == {}


EMPTY_ONCE_READ = [
    "\u2800\u2800\u2800",  # braille blanks
    "\u0301\u0336\u0301",  # combining marks
    "\u20dd",  # an enclosing circle around nothing
    "\u3164 \u2800 \u200b \u0301",  # filler, blank, zero-width space, accent
    "!!! ...",  # punctuation
]


@pytest.mark.parametrize("prompt", EMPTY_ONCE_READ)
def test_a_prompt_without_a_letter_or_digit_is_invalid_as_empty(prompt: str) -> None:
    request = new_request(prompt="a red fox", model="tiny-sd", user_id="u1")
    with pytest.raises(InvalidRequestError, match="prompt: must not be empty: it needs a letter, a digit or a"):
        validate_request(dataclasses.replace(request, prompt=prompt), RequestLimits())


@pytest.mark.parametrize("prompt", ["\U0001f431\U0001f30a", "\u2603", "\u2801\u2803"])  # emoji, a snowman, braille
def test_a_prompt_of_pictographs_alone_says_something(prompt: str) -> None:
    validate_request(new_request(prompt=prompt, model="tiny-sd", user_id="u1"), RequestLimits())


def test_a_stage_fails_a_prompt_without_a_letter_or_digit_as_an_invalid_request() -> None:
    context = StageContext(TopicSettings(), RequestLimits(), StageSettings(), Codec(), "worker", ModerationStamp("key"))
    emit = Emitter(context)
    request = dataclasses.replace(
        new_request(prompt="a red fox", model="tiny-sd", user_id="u1"), prompt="\u2800\u0301\u2800"
    )
    message = Inbound(context.codec.encode(request), request.request_id.encode(), context.topics.requests, 0, 0, 1.0)
    assert decode_request(message, context, emit, "moderation") is None
    [result] = [context.codec.decode_as(ImageResult, e.value) for e in emit.take()]
    assert (result.status, result.error_code) == ("FAILED", "INVALID_REQUEST")
    assert result.error_message.startswith("prompt: must not be empty")
