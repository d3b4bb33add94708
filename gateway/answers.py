"""A pipeline's result as OpenAI's answer: its images as ``data`` entries (transcoded to the output format, inline
or as a URL), its usage in tokens, or the error envelope of a result that did not succeed.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from PIL import Image

from pixelpipe.core.events import ImageResult
from pixelpipe.core.validation import normalise_text
from pixelpipe.gateway.errors import ApiError, rate_limited
from pixelpipe.gateway.params import ImageCall
from pixelpipe.gateway.state import Gateway

TILE = 16  # usage counts an image's 16x16 tiles as its tokens
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "json": "application/json"}


def outputs(gateway: Gateway, call: ImageCall, result: ImageResult, base_url: str) -> list[dict[str, Any]]:
    """Each stored image as OpenAI's ``data`` entry: transcoded to the output format, inline or as a URL."""
    revised = normalise_text(call.prompt)
    data = []
    for index, image in enumerate(result.images):
        uri = image.uri
        body = None
        if call.output_format != "png" or call.response_format == "b64_json":
            body = transcode(gateway.store.get(uri), call.output_format, call.output_compression)
        entry: dict[str, Any] = {}
        if call.response_format == "b64_json":
            entry["b64_json"] = base64.b64encode(body or b"").decode()
        else:
            if call.output_format != "png":
                key = f"gateway/outputs/{result.request_id}/{index}.{call.output_format}"
                uri = gateway.store.put(key, body or b"", MEDIA_TYPES[call.output_format]).uri
            entry["url"] = gateway.url_for(uri, base_url)
        if revised != call.prompt:
            entry["revised_prompt"] = revised
        data.append(entry)
    return data


def transcode(data: bytes, output_format: str, compression: int, source_format: str = "png") -> bytes:
    """``data`` (a stored PNG, or a worker's JPEG preview) as ``output_format``; jpeg and webp at quality
    ``compression`` (0-100)."""
    if output_format == source_format:
        return data
    with Image.open(io.BytesIO(data), formats=[source_format.upper()]) as image:
        rgb = image.convert("RGB")
    out = io.BytesIO()
    lossy = {"quality": max(1, compression)} if output_format in ("jpeg", "webp") else {}
    rgb.save(out, format=output_format.upper(), **lossy)
    return out.getvalue()


def result_error(result: ImageResult) -> ApiError | None:
    """The error envelope of a result that did not succeed, by its status and code."""
    if result.status == "SUCCEEDED":
        return None
    message = result.error_message or result.error_code or result.status
    if result.status == "REJECTED":  # as OpenAI answers a blocked image call: no param, the check in the message
        stage = (result.moderation_stage or "PROMPT").lower().replace("_", " ")
        flagged = message.split(": ", 1)[1] if ": " in message else message
        return ApiError(
            400,
            f"Your request was rejected by the safety system at the {stage} check (stage "
            f"{result.moderation_stage}); categories: {flagged}.",
            type="image_generation_user_error",
            code="moderation_blocked",
        )
    if result.status == "CANCELLED":  # by someone else: this call's own caller is still here
        return ApiError(409, f"The request was cancelled before its image was ready: {message}", code="cancelled")
    code = result.error_code or "INTERNAL_ERROR"
    if code == "RATE_LIMITED":
        return rate_limited(message, retry_after_s=1)
    if code == "DEADLINE_EXCEEDED":
        return ApiError(504, f"The image was not ready by the deadline: {message}", type="server_error", code="timeout")
    if code == "EXPERIMENT_UNAVAILABLE":  # a renderer had not read the experiment it was assigned under: transient
        return ApiError(
            503,
            f"The image could not be rendered yet ({message}); retry it.",
            type="server_error",
            code="experiment_unavailable",
            retry_after_s=1,
        )
    if code == "INVALID_REQUEST":
        field = message.split(":", 1)[0] if ":" in message else None
        return ApiError(400, message, param=field, code="invalid_value")
    if code == "INVALID_SOURCE":
        return ApiError(400, message, param="image", code="invalid_image")
    # The stage's own message (an exception's text) stays with the result, found by the request id.
    return ApiError(
        500,
        f"The pipeline failed the request ({code}); retry it, or report its request id {result.request_id}.",
        type="server_error",
        code=code.lower(),
    )


def usage(call: ImageCall, result: ImageResult, source_images: int) -> dict[str, Any]:
    """Tokens as the API counts them: prompt words as text tokens, 16x16 tiles of each image as image tokens."""
    text = len(call.prompt.split())
    width, height = result.width or call.width or 0, result.height or call.height or 0
    tiles = math.ceil(width / TILE) * math.ceil(height / TILE)
    images_in = tiles * source_images
    out = tiles * len(result.images)
    return {
        "input_tokens": text + images_in,
        "input_tokens_details": {"text_tokens": text, "image_tokens": images_in},
        "output_tokens": out,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": out},
        "total_tokens": text + images_in + out,
    }
