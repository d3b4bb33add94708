"""Building and validating ImageRequests: every rule is checked before anything is sent."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from pixelpipe.config import Settings
from pixelpipe.schemas.codec import REQUEST_ID_PATTERN, Record

KINDS = ("GENERATE", "EDIT")
PRIORITIES = ("INTERACTIVE", "BATCH")
MAX_IMAGES = 10
SIDE_MULTIPLE = 8


class InvalidRequestError(ValueError):
    """A request broke a rule; ``field`` names the field and the message states the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def utc_now() -> dt.datetime:
    # Avro timestamp-millis keeps milliseconds; truncating here makes a round trip compare equal.
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def new_request(
    *,
    prompt: str,
    model: str,
    user_id: str,
    kind: str = "GENERATE",
    request_id: str | None = None,
    negative_prompt: str | None = None,
    n: int = 1,
    width: int = 512,
    height: int = 512,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    source_image_uri: str | None = None,
    mask_uri: str | None = None,
    strength: float | None = None,
    experiments: Mapping[str, str] | None = None,
    priority: str = "BATCH",
    deadline: dt.datetime | None = None,
    reply_topic: str | None = None,
) -> Record:
    """An ImageRequest record with fresh ids and times; validate it with ``validate_request``."""
    now = utc_now()
    return {
        "event_id": str(uuid.uuid4()),
        "request_id": request_id or str(uuid.uuid4()),
        "schema_version": 1,
        "event_time": now,
        "kind": kind,
        "user_id": user_id,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "n": n,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "model": model,
        "source_image_uri": source_image_uri,
        "mask_uri": mask_uri,
        "strength": strength,
        "experiments": dict(experiments or {}),
        "priority": priority,
        "deadline": deadline,
        "created_at": now,
        "reply_topic": reply_topic,
    }


def validate_request(
    request: Record, settings: Settings, now: dt.datetime | None = None, check_deadline: bool = True
) -> None:
    """Raise InvalidRequestError naming the first field that breaks a rule.

    Processors pass ``check_deadline=False``: for them an expired deadline is an outcome, not a bad request.
    """
    now = now or dt.datetime.now(dt.UTC)

    def require(ok: bool, field: str, rule: str) -> None:
        if not ok:
            raise InvalidRequestError(field, rule)

    for field in ("event_id", "request_id", "user_id", "model"):
        require(isinstance(request.get(field), str) and bool(request[field].strip()), field, "must not be empty")
    require(
        REQUEST_ID_PATTERN.fullmatch(request["request_id"]) is not None,
        "request_id",
        f"must match {REQUEST_ID_PATTERN.pattern}, got {request['request_id']!r}",
    )
    require(
        request.get("kind") in KINDS,
        "kind",
        f"must be one of {', '.join(KINDS)}, got {request.get('kind')!r}",
    )
    require(
        request.get("priority") in PRIORITIES,
        "priority",
        f"must be one of {', '.join(PRIORITIES)}, got {request.get('priority')!r}",
    )
    prompt = request.get("prompt")
    require(isinstance(prompt, str) and bool(prompt.strip()), "prompt", "must not be empty")
    require(
        len(prompt) <= settings.max_prompt_chars,
        "prompt",
        f"must be at most {settings.max_prompt_chars} characters, got {len(prompt)}",
    )
    n = request.get("n")
    require(_is_int(n) and 1 <= n <= MAX_IMAGES, "n", f"must be between 1 and {MAX_IMAGES}, got {n!r}")
    for side in ("width", "height"):
        value = request.get(side)
        require(
            _is_int(value) and value > 0 and value % SIDE_MULTIPLE == 0,
            side,
            f"must be a positive multiple of {SIDE_MULTIPLE}, got {value!r}",
        )
        require(
            value <= settings.max_image_side,
            side,
            f"must be at most {settings.max_image_side} (PIXELPIPE_MAX_IMAGE_SIDE), got {value}",
        )
    steps = request.get("steps")
    require(
        steps is None or (_is_int(steps) and 1 <= steps <= settings.max_steps),
        "steps",
        f"must be between 1 and {settings.max_steps}, got {steps!r}",
    )
    guidance = request.get("guidance")
    require(guidance is None or 0 <= guidance <= 50, "guidance", f"must be between 0 and 50, got {guidance!r}")
    seed = request.get("seed")
    require(seed is None or (_is_int(seed) and 0 <= seed < 2**63), "seed", f"must be in 0..2^63-1, got {seed!r}")
    if request["kind"] == "EDIT":
        require(bool(request.get("source_image_uri")), "source_image_uri", "is required for an EDIT request")
        strength = request.get("strength")
        require(strength is None or 0 < strength <= 1, "strength", f"must be in (0, 1], got {strength!r}")
    else:
        for field in ("source_image_uri", "mask_uri", "strength"):
            require(request.get(field) is None, field, "is only allowed on an EDIT request")
    experiments = request.get("experiments")
    require(
        isinstance(experiments, dict)
        and all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in experiments.items()),
        "experiments",
        "must map non-empty experiment keys to non-empty variant names",
    )
    deadline = request.get("deadline")
    if deadline is not None:
        require(
            isinstance(deadline, dt.datetime) and deadline.tzinfo is not None,
            "deadline",
            "must be an aware datetime",
        )
        require(not check_deadline or deadline > now, "deadline", f"is in the past ({deadline.isoformat()})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
