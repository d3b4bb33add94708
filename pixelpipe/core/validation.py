"""The rules a request must keep: checked by the producer SDK before sending, by every stage on what it reads,
and by the render stages on the final parameters (after experiment overrides and model defaults).

Prompts are normalised before they are checked, moderated or rendered (``normalised_request``): NFKC, which folds
fullwidth and mathematical letters into plain ones, with the characters that render as nothing removed, so a prompt
of zero-width spaces is empty and a blocked word laced with them is still the word.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import unicodedata
from typing import Any

from pixelpipe.core.clock import utc_now
from pixelpipe.core.events import ImageRequest
from pixelpipe.core.ids import REQUEST_ID_PATTERN
from pixelpipe.core.settings import RequestLimits, TopicSettings

KINDS = ("GENERATE", "EDIT")
PRIORITIES = ("INTERACTIVE", "BATCH")
MAX_IMAGES = 10
SIDE_MULTIPLE = 8
MAX_GUIDANCE = 50.0
MAX_TOPIC_CHARS = 249  # Kafka's own limit on a topic name
# Kafka's own rule for topic names ("." and ".." are refused besides).
TOPIC_NAME_PATTERN = re.compile(rf"[a-zA-Z0-9._-]{{1,{MAX_TOPIC_CHARS}}}")

# Default-ignorable characters that are not format characters (category Cf, removed as a class): the Hangul
# fillers, the combining grapheme joiner and the variation selectors.
_INVISIBLE = frozenset(
    "\u034f\u115f\u1160\u3164\uffa0\u180b\u180c\u180d\u180f"
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
)


def normalise_text(text: str) -> str:
    """NFKC with the characters that render as nothing removed: format characters (zero-width space, joiners, BOM,
    bidi controls, tag characters) and the other default-ignorable ones (fillers, variation selectors)."""
    if text.isascii():  # nothing to fold or remove: the common case stays cheap
        return text
    # Removed first, so that what they separated composes (e, ZWJ, U+0301 gives é, as e, U+0301 does).
    visible = "".join(c for c in text if c not in _INVISIBLE and unicodedata.category(c) != "Cf")
    return unicodedata.normalize("NFKC", visible)


def normalised_request(request: ImageRequest) -> ImageRequest:
    """``request`` with its prompts normalised (``normalise_text``): what is moderated and rendered."""
    negative = request.negative_prompt
    return dataclasses.replace(
        request,
        prompt=normalise_text(request.prompt),
        negative_prompt=None if negative is None else normalise_text(negative),
    )


class InvalidRequestError(ValueError):
    """A request broke a rule; ``field`` names the field and the message states the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def require(ok: bool, field: str, rule: str) -> None:
    if not ok:
        raise InvalidRequestError(field, rule)


BRAILLE_BLANK = "\u2800"  # a symbol by category that shows nothing


def says_something(char: str) -> bool:
    """Whether ``char`` says something in a prompt: a letter or a digit, or a pictograph such as an emoji (a prompt
    of emoji alone is a fair request). Blanks, lone accents, punctuation and invisible characters say nothing."""
    return char.isalnum() or (unicodedata.category(char) == "So" and char != BRAILLE_BLANK)


def check_compute(compute: float, limits: RequestLimits) -> None:
    """A request's compute (``ModelEntry.compute``: device seconds, by its model's fit) within the per-request
    budget."""
    require(
        compute <= limits.max_request_compute,
        "compute",
        f"{compute:.2f} device seconds is over the per-request budget of {limits.max_request_compute:g} "
        "(PIXELPIPE_MAX_REQUEST_COMPUTE)",
    )


def check_steps(steps: Any, limits: RequestLimits) -> None:
    require(
        steps is None or (_is_int(steps) and 1 <= steps <= limits.max_steps),
        "steps",
        f"must be between 1 and {limits.max_steps}, got {steps!r}",
    )


def check_guidance(guidance: Any) -> None:
    require(
        guidance is None or (isinstance(guidance, int | float) and 0 <= guidance <= MAX_GUIDANCE),
        "guidance",
        f"must be between 0 and {MAX_GUIDANCE:g}, got {guidance!r}",
    )


def check_length(field: str, value: str | None, limit: int, setting: str) -> None:
    """A string (None passes) of at most ``limit`` characters; ``setting`` names the variable that sets it."""
    require(
        value is None or len(value) <= limit,
        field,
        f"must be at most {limit} characters ({setting}), got {len(value or '')}",
    )


def check_side(side: str, value: Any, limits: RequestLimits) -> None:
    require(
        _is_int(value) and value > 0 and value % SIDE_MULTIPLE == 0,
        side,
        f"must be a positive multiple of {SIDE_MULTIPLE}, got {value!r}",
    )
    require(
        value <= limits.max_image_side,
        side,
        f"must be at most {limits.max_image_side} (PIXELPIPE_MAX_IMAGE_SIDE), got {value}",
    )


def check_reference_image_uris(uris: Any, limits: RequestLimits) -> None:
    """An edit's reference images: a list of at most ``max_reference_images`` URIs, each checked like the source."""
    field = "reference_image_uris"
    require(
        isinstance(uris, list) and all(isinstance(uri, str) and uri.strip() for uri in uris),
        field,
        "must be a list of non-empty URIs",
    )
    require(
        len(uris) <= limits.max_reference_images,
        field,
        f"must name at most {limits.max_reference_images} images (PIXELPIPE_MAX_REFERENCE_IMAGES), got {len(uris)}",
    )
    for uri in uris:
        check_length(field, uri, limits.max_uri_chars, "PIXELPIPE_MAX_URI_CHARS")


def validate_request(
    request: ImageRequest, limits: RequestLimits, now: dt.datetime | None = None, check_deadline: bool = True
) -> None:
    """Raise InvalidRequestError naming the first field that breaks a rule.

    Stages pass ``check_deadline=False``: for them an expired deadline is an outcome, not a bad request.
    """
    now = now or utc_now()
    for field in ("event_id", "request_id", "user_id", "model"):
        value = getattr(request, field)
        require(isinstance(value, str) and bool(value.strip()), field, "must not be empty")
        if field != "request_id":  # its pattern (the contract's) bounds it
            check_length(field, value, limits.max_name_chars, "PIXELPIPE_MAX_NAME_CHARS")
    require(
        REQUEST_ID_PATTERN.fullmatch(request.request_id) is not None,
        "request_id",
        f"must match {REQUEST_ID_PATTERN.pattern}, got {request.request_id!r}",
    )
    require(request.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}, got {request.kind!r}")
    require(
        request.priority in PRIORITIES,
        "priority",
        f"must be one of {', '.join(PRIORITIES)}, got {request.priority!r}",
    )
    # The raw text bounds what was sent, the normalised one what is moderated and rendered (NFKC may lengthen it).
    require(isinstance(request.prompt, str), "prompt", "must not be empty")
    prompt = normalise_text(request.prompt)
    require(
        any(says_something(c) for c in prompt),
        "prompt",
        "must not be empty: it needs a letter, a digit or a pictograph (invisible characters, blanks, accents and "
        "punctuation alone do not count)",
    )
    check_length("prompt", max(request.prompt, prompt, key=len), limits.max_prompt_chars, "PIXELPIPE_MAX_PROMPT_CHARS")
    negative = request.negative_prompt
    if negative is not None:
        require(isinstance(negative, str), "negative_prompt", "must be a string or None")
        longest = max(negative, normalise_text(negative), key=len)
        check_length(
            "negative_prompt", longest, limits.max_negative_prompt_chars, "PIXELPIPE_MAX_NEGATIVE_PROMPT_CHARS"
        )
    n = request.n
    require(_is_int(n) and 1 <= n <= MAX_IMAGES, "n", f"must be between 1 and {MAX_IMAGES}, got {n!r}")
    check_side("width", request.width, limits)
    check_side("height", request.height, limits)
    check_steps(request.steps, limits)
    check_guidance(request.guidance)
    seed = request.seed
    require(seed is None or (_is_int(seed) and 0 <= seed < 2**63), "seed", f"must be in 0..2^63-1, got {seed!r}")
    if request.kind == "EDIT":
        require(bool(request.source_image_uri), "source_image_uri", "is required for an EDIT request")
        for field in ("source_image_uri", "mask_uri"):
            check_length(field, getattr(request, field), limits.max_uri_chars, "PIXELPIPE_MAX_URI_CHARS")
        check_reference_image_uris(request.reference_image_uris, limits)
        strength = request.strength
        require(strength is None or 0 < strength <= 1, "strength", f"must be in (0, 1], got {strength!r}")
    else:
        for field in ("source_image_uri", "mask_uri", "strength"):
            require(getattr(request, field) is None, field, "is only allowed on an EDIT request")
        require(not request.reference_image_uris, "reference_image_uris", "is only allowed on an EDIT request")
    experiments = request.experiments
    require(
        isinstance(experiments, dict)
        and all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in experiments.items()),
        "experiments",
        "must map non-empty experiment keys to non-empty variant names",
    )
    require(
        len(experiments) <= limits.max_experiments,
        "experiments",
        f"must name at most {limits.max_experiments} experiments (PIXELPIPE_MAX_EXPERIMENTS), got {len(experiments)}",
    )
    require(
        all(len(name) <= limits.max_name_chars for name in [*experiments, *experiments.values()]),
        "experiments",
        f"experiment keys and variant names must be at most {limits.max_name_chars} characters "
        "(PIXELPIPE_MAX_NAME_CHARS)",
    )
    check_length("reply_topic", request.reply_topic, MAX_TOPIC_CHARS, "Kafka's limit on topic names")
    deadline = request.deadline
    if deadline is not None:
        require(
            isinstance(deadline, dt.datetime) and deadline.tzinfo is not None,
            "deadline",
            "must be an aware datetime",
        )
        require(not check_deadline or deadline > now, "deadline", f"is in the past ({deadline.isoformat()})")


def check_reply_topic(reply_topic: str | None, topics: TopicSettings) -> None:
    """A reply topic, when there is one, is a legal topic name under the configured prefix and none of the
    pipeline's own: a producer must not make a worker send to a topic it cannot name, or write into the pipeline."""
    if reply_topic is None:
        return
    require(
        isinstance(reply_topic, str)
        and TOPIC_NAME_PATTERN.fullmatch(reply_topic) is not None
        and reply_topic not in (".", ".."),
        "reply_topic",
        f"must be a Kafka topic name (1 to {MAX_TOPIC_CHARS} of a-z A-Z 0-9 . _ -), got {reply_topic!r:.300}",
    )
    require(
        reply_topic.startswith(topics.reply_prefix) and len(reply_topic) > len(topics.reply_prefix),
        "reply_topic",
        f"must start with {topics.reply_prefix!r} (PIXELPIPE_REPLY_TOPIC_PREFIX), got {reply_topic!r}",
    )
    require(
        reply_topic not in topics.pipeline(),
        "reply_topic",
        f"must not be one of the pipeline's own topics, got {reply_topic!r}",
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
