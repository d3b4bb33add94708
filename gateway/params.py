"""The OpenAI Images API's parameters, checked and mapped onto an ImageRequest.

Every value is checked here, before anything is published: an unknown parameter, an unsupported value or one
out of range is a 400 naming the parameter. The pipeline checks the request again (``validate_request``) and
the render stages check the final parameters, as for every producer.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pixelpipe.core.registry import ModelRegistry
from pixelpipe.core.settings import RequestLimits
from pixelpipe.core.topics import MAX_PARTIAL_IMAGES
from pixelpipe.core.validation import MAX_IMAGES, SIDE_MULTIPLE
from pixelpipe.gateway.errors import ApiError, invalid

RESPONSE_FORMATS = ("b64_json", "url")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
QUALITIES = ("auto", "low", "medium", "high", "standard", "hd")
# The tier each quality runs as (``standard`` and ``hd`` are DALL·E's names), and its share of a model's default steps.
QUALITY_TIERS = {"low": "low", "medium": "medium", "standard": "medium", "high": "high", "hd": "high"}
STEP_FACTORS = {"low": 0.5, "medium": 1.0, "high": 2.0}
BACKGROUNDS = ("auto", "opaque")
INPUT_FIDELITIES = ("low",)  # the default: the models take no extra care to keep an edit source's features
MAX_USER_CHARS = 63
# No `style`: OpenAI's current models refuse it as an unknown parameter (it was DALL·E's), and ours have no style.
GENERATION_PARAMS = {
    "prompt", "model", "n", "size", "quality", "response_format", "output_format", "output_compression",
    "background", "moderation", "user", "stream", "partial_images",
}  # fmt: skip
EDIT_PARAMS = GENERATION_PARAMS | {"image", "image[]", "mask", "input_fidelity"}
UNKNOWN_PARAMETER_HINTS = {"style": " Describe the style in the prompt instead."}
# Numbers in text (multipart fields, sizes): ASCII digits only, few enough for int() (str.isdigit() also takes
# digits such as '²' that int() refuses).
_INTEGER_TEXT = re.compile(r"-?[0-9]{1,9}")
_SIZE_TEXT = re.compile(r"([0-9]{1,9})x([0-9]{1,9})")


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway needs of a registry entry: its name, how many steps each quality takes and how many images
    one edit may give it."""

    name: str
    kind: str
    default_steps: int
    max_source_images: int = 1

    def steps_for(self, quality: str) -> int | None:
        """``low`` half the model's default steps, ``medium`` (and ``standard``) the default, ``high`` (and
        ``hd``) twice; ``auto`` None, the model's default as the pipeline applies it (so an experiment's variant
        may still set the steps)."""
        return None if quality == "auto" else self._tier_steps(QUALITY_TIERS[quality])

    def quality_of(self, steps: int, asked: str) -> str:
        """The quality a render of ``steps`` ran at, as OpenAI's answers name it: the tier (low, medium, high) whose
        steps are nearest, on a tie the tier ``asked`` runs as (``auto``: medium, the model's default)."""
        tiers = dict.fromkeys([QUALITY_TIERS.get(asked, "medium"), "medium", "low", "high"])
        return min(tiers, key=lambda tier: abs(self._tier_steps(tier) - steps))

    def _tier_steps(self, tier: str) -> int:
        return max(1, math.ceil(self.default_steps * STEP_FACTORS[tier]))


def read_registry(path: str | Path) -> dict[str, ModelInfo]:
    """The registry's models, in file order (the first is the default model), as the gateway sees them: read and
    checked as the workers read them (``pixelpipe.core.registry``)."""
    registry = ModelRegistry.load(path)
    return {
        name: ModelInfo(name, entry.kind, entry.default_steps, entry.max_source_images)
        for name, entry in registry.entries.items()
    }


@dataclass(frozen=True)
class ImageCall:
    """One checked call: what to publish, and how to answer."""

    kind: str  # GENERATE or EDIT
    prompt: str
    model: str
    n: int
    width: int | None  # None: the edit source's size (size=auto on an edit)
    height: int | None
    steps: int | None
    quality: str
    response_format: str
    output_format: str
    output_compression: int
    background: str
    user: str | None
    stream: bool
    partial_images: int

    def fingerprint(self, sources: list[str] = ()) -> str:  # type: ignore[assignment]
        """A hash of what shapes the rendered images: a retry with the same idempotency key must match it (how the
        images are answered, their format and encoding, may change between retries)."""
        shaping = ("kind", "prompt", "model", "n", "width", "height", "steps", "user")
        body = json.dumps([{k: v for k, v in asdict(self).items() if k in shaping}, list(sources)], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()


def _string(params: dict[str, Any], name: str, default: str | None = None) -> str | None:
    value = params.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise invalid(name, f"'{name}' must be a string, got {type(value).__name__}")
    return value


def _choice(params: dict[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = _string(params, name, default)
    assert value is not None
    if value not in choices:
        supported = ", ".join(f"'{choice}'" for choice in choices)
        raise invalid(
            name, f"Invalid value for '{name}': {value!r}. Supported values are: {supported}.", code="invalid_value"
        )
    return value


def _integer(params: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = params.get(name, default)
    if value is None:
        return default
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):  # multipart fields are text
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(name, f"'{name}' must be an integer from {low} to {high}, got {value!r}")
    return value


def _flag(params: dict[str, Any], name: str) -> bool:
    value = params.get(name, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be a boolean, got {value!r}")
    return value


def parse_size(value: str, limits: RequestLimits) -> tuple[int, int] | None:
    """``WIDTHxHEIGHT`` (each a positive multiple of 8, at most PIXELPIPE_MAX_IMAGE_SIDE), or None for auto."""
    if value == "auto":
        return None
    match = _SIZE_TEXT.fullmatch(value)
    if match is None:
        raise invalid(
            "size",
            f"Invalid value for 'size': {value!r}. Use WIDTHxHEIGHT (e.g. 512x512) or auto.",
            code="invalid_value",
        )
    sides = int(match[1]), int(match[2])
    for side in sides:
        if side < SIDE_MULTIPLE or side % SIDE_MULTIPLE or side > limits.max_image_side:
            raise invalid(
                "size",
                f"Invalid value for 'size': {value!r}. Each side must be a multiple of {SIDE_MULTIPLE} from "
                f"{SIDE_MULTIPLE} to {limits.max_image_side}.",
                code="invalid_value",
            )
    return sides


def parse_call(
    params: dict[str, Any],
    kind: str,
    models: dict[str, ModelInfo],
    default_model: str,
    allowed: set[str] | None,
    limits: RequestLimits,
    default_size: tuple[int, int] = (512, 512),
) -> ImageCall:
    """Check a call's parameters (a JSON body, or a multipart form's text fields) and map them; ApiError 400."""
    known = GENERATION_PARAMS if kind == "GENERATE" else EDIT_PARAMS
    for name in params:
        if name not in known:
            hint = UNKNOWN_PARAMETER_HINTS.get(name, "")
            raise invalid(name, f"Unknown parameter: '{name}'.{hint}", code="unknown_parameter")
    prompt = _string(params, "prompt")
    if not prompt or not prompt.strip():
        raise invalid("prompt", "Missing required parameter: 'prompt'.", code="missing_required_parameter")
    if len(prompt) > limits.max_prompt_chars:
        raise invalid("prompt", f"'prompt' must be at most {limits.max_prompt_chars} characters, got {len(prompt)}")
    model = _string(params, "model") or default_model
    if model not in models:
        raise ApiError(
            404 if params.get("model") else 400,
            f"The model '{model}' does not exist; GET /v1/models lists the models you may use.",
            param="model",
            code="model_not_found",
        )
    if allowed is not None and model not in allowed:
        raise ApiError(
            404,
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    size = parse_size(_string(params, "size", "auto") or "auto", limits)
    if size is None and kind == "GENERATE":
        size = default_size
    quality = _choice(params, "quality", QUALITIES, "auto")
    response_format = _choice(params, "response_format", RESPONSE_FORMATS, "b64_json")
    output_format = _choice(params, "output_format", OUTPUT_FORMATS, "png")
    compression_given = params.get("output_compression") is not None
    output_compression = _integer(params, "output_compression", 100, 0, 100)
    if compression_given and output_format == "png":
        raise invalid("output_compression", "'output_compression' applies to output_format jpeg or webp only, not png")
    background = _string(params, "background", "auto")
    if background == "transparent":
        raise invalid(
            "background",
            "background 'transparent' is not supported: the models render opaque images",
            code="invalid_value",
        )
    background = _choice(params, "background", BACKGROUNDS, "auto")
    moderation = _string(params, "moderation", "auto")
    if moderation != "auto":
        raise invalid(
            "moderation",
            f"Invalid value for 'moderation': {moderation!r}. Only 'auto' is supported: the pipeline's moderation "
            "policy is set by its operators.",
            code="invalid_value",
        )
    if params.get("input_fidelity") == "high":  # an edit's; a generation refused it above as unknown
        raise invalid(
            "input_fidelity",
            "input_fidelity 'high' is not supported: the models take no extra care to keep the source's features "
            "(faces included); use 'low', the default",
            code="invalid_value",
        )
    _choice(params, "input_fidelity", INPUT_FIDELITIES, "low")  # checked only: low is what the models do
    user = _string(params, "user")
    if user is not None and (not user or len(user) > MAX_USER_CHARS):
        raise invalid("user", f"'user' must be 1 to {MAX_USER_CHARS} characters")
    stream = _flag(params, "stream")
    partial_images = _integer(params, "partial_images", 0, 0, MAX_PARTIAL_IMAGES)
    if params.get("partial_images") is not None and not stream:
        raise invalid("partial_images", "'partial_images' needs stream=true")
    n = _integer(params, "n", 1, 1, MAX_IMAGES)
    if stream and n != 1:
        raise invalid("n", "stream=true renders one image: n must be 1")
    return ImageCall(
        kind=kind,
        prompt=prompt,
        model=model,
        n=n,
        width=size[0] if size else None,
        height=size[1] if size else None,
        steps=models[model].steps_for(quality),
        quality=quality,
        response_format=response_format,
        output_format=output_format,
        output_compression=output_compression,
        background=background,
        user=user,
        stream=stream,
        partial_images=partial_images,
    )
