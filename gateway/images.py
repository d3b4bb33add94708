"""OpenAI's Images API calls, ``/v1/images/generations`` (a JSON body) and ``/v1/images/edits`` (a multipart form
with the images), step by step: authenticate the key, check the idempotency key, read the call, admit it, store its
uploads and make its Submission, then answer with its result or stream it (``streaming.py``).

A call is checked whole before anything is published: its key (401), its parameters and uploads (400), its rate
limit (429), the pipeline's backlog (503). Then it is published once and waited for (``submit.py``); its result
becomes OpenAI's response, or its error envelope (``answers.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pixelpipe.core.objects import ObjectStore
from pixelpipe.gateway.answers import outputs, result_error, usage
from pixelpipe.gateway.bodies import read_form, read_json_object
from pixelpipe.gateway.errors import ApiError, error_response, invalid
from pixelpipe.gateway.keys import ApiKey
from pixelpipe.gateway.params import ImageCall, ModelInfo, parse_call, parse_size
from pixelpipe.gateway.pipeline import Submission, request_id_for
from pixelpipe.gateway.state import Gateway, gateway_of
from pixelpipe.gateway.streaming import stream
from pixelpipe.gateway.submit import CallerGone, submit_and_wait
from pixelpipe.gateway.uploads import CONTENT_TYPES, check_image, mask_png, source_png

MAX_IDEMPOTENCY_KEY_CHARS = 255
MAX_EDIT_IMAGES = 16  # OpenAI's limit on an edit's images; each model takes at most its max_source_images
CLIENT_CLOSED = 499  # nginx's status for a call whose caller left before the answer: counted, never received


async def generations(request: Request) -> Response:
    return await _images(request, "GENERATE")


async def edits(request: Request) -> Response:
    return await _images(request, "EDIT")


async def _images(request: Request, kind: str) -> Response:
    gateway = gateway_of(request)
    request_id = None
    started_s = time.perf_counter()
    try:
        key = gateway.authenticate(request)
        idempotency_key = request.headers.get("idempotency-key")
        request_id = request.state.request_id = request_id_for(key.key_id, idempotency_key)
        _check_idempotency_key(idempotency_key)
        call, uploads = await _read_call(request, kind, gateway, key)
        gateway.admit(key)
        gateway.pipeline.check_capacity()
        submission = await _submission(gateway, kind, key, call, uploads, request_id, idempotency_key is not None)
        created = int(time.time())
        if call.stream:
            return stream(gateway, call, submission, created, request, uploads is not None)
        return await _answer(gateway, call, submission, uploads, created, request, started_s)
    except CallerGone:
        return Response(status_code=CLIENT_CLOSED)
    except ApiError as e:
        return error_response(e, request_id)


def _check_idempotency_key(idempotency_key: str | None) -> None:
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise invalid(None, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")


async def _read_call(request: Request, kind: str, gateway: Gateway, key: ApiKey) -> tuple[ImageCall, Uploads | None]:
    """The call's parameters (a generation's JSON body, or an edit's form and its images), checked against the
    models ``key`` may use and this gateway's limits."""
    uploads = None
    if kind == "EDIT":
        params, uploads = await _read_form(request, gateway)
    else:
        params = read_json_object(await request.body())
    default_size = parse_size(gateway.settings.gateway.default_size, gateway.settings.limits) or (512, 512)
    call = parse_call(
        params,
        kind,
        gateway.models,
        gateway.default_model,
        gateway.allowed_models(key),
        gateway.settings.limits,
        default_size,
    )
    gateway.check_url_possible(call)
    if uploads is not None:
        check_image_count(uploads, gateway.models[call.model])
    return call, uploads


@dataclass
class Uploads:
    source: bytes
    references: list[bytes]  # the images after the first, for models that take several
    mask: bytes | None
    size: tuple[int, int]

    @property
    def images(self) -> list[bytes]:
        return [self.source, *self.references]


async def _read_form(request: Request, gateway: Gateway) -> tuple[dict[str, Any], Uploads]:
    """An edit's multipart form: its text fields, and its images (``image`` or ``image[]``, the first the source)
    and mask, each checked."""
    limits = gateway.settings.limits
    form = await read_form(request, max_files=MAX_EDIT_IMAGES + 1, max_fields=64)
    try:
        params: dict[str, Any] = {}
        files: dict[str, list[UploadFile]] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.setdefault("image" if name == "image[]" else name, []).append(value)
            else:
                params[name] = value
        for name in files:
            if name not in ("image", "mask"):
                raise invalid(name, f"Unknown parameter: '{name}' (sent as a file).", code="unknown_parameter")
        images = files.get("image", [])
        if not images:
            raise invalid("image", "Missing required parameter: 'image'.", code="missing_required_parameter")
        if len(images) > MAX_EDIT_IMAGES:
            raise invalid("image", f"Send at most {MAX_EDIT_IMAGES} images; {len(images)} were sent")
        if len(files.get("mask", [])) > 1:
            raise invalid("mask", "Send at most one mask")

        async def read(upload: UploadFile) -> bytes:
            return await upload.read(limits.max_source_bytes + 1)

        checked = [
            check_image("image", await read(image), limits.max_source_bytes, limits.max_source_pixels)
            for image in images
        ]
        sources = [source_png(image) for image in checked]
        size = (checked[0].width - checked[0].width % 8, checked[0].height - checked[0].height % 8)
        mask_bytes = None
        if files.get("mask"):
            mask = check_image("mask", await read(files["mask"][0]), limits.max_source_bytes, limits.max_source_pixels)
            mask_bytes = mask_png(mask, size)
        return params, Uploads(sources[0], sources[1:], mask_bytes, size)
    finally:
        await form.close()  # its spooled files, also when a check refused them


def check_image_count(uploads: Uploads, model: ModelInfo) -> None:
    """A 400 naming ``image`` when the call sends more images than its model takes in one edit."""
    if len(uploads.images) > model.max_source_images:
        raise invalid(
            "image",
            f"The model '{model.name}' takes at most {model.max_source_images} image(s) per edit; "
            f"{len(uploads.images)} were sent",
        )


async def _submission(
    gateway: Gateway,
    kind: str,
    key: ApiKey,
    call: ImageCall,
    uploads: Uploads | None,
    request_id: str,
    idempotent: bool,
) -> Submission:
    """What to publish for the call, its uploads stored first."""
    sources: list[str] = []
    source_uri = mask_uri = None
    reference_uris: list[str] = []
    width, height = call.width, call.height
    if uploads is not None:
        sources = [hashlib.sha256(data).hexdigest() for data in (*uploads.images, uploads.mask or b"")]
        width, height = width or uploads.size[0], height or uploads.size[1]
        source_uri, reference_uris, mask_uri = await asyncio.to_thread(
            _store_uploads, gateway.store, request_id, uploads
        )
    assert width is not None and height is not None
    return Submission(
        request_id=request_id,
        idempotent=idempotent,
        fingerprint=call.fingerprint(sources),
        kind=kind,
        user_id=f"{key.user_id}:{call.user}" if call.user else key.user_id,
        prompt=call.prompt,
        model=call.model,
        n=call.n,
        width=width,
        height=height,
        steps=call.steps,
        source_image_uri=source_uri,
        reference_image_uris=tuple(reference_uris),
        mask_uri=mask_uri,
        partial_images=call.partial_images if call.stream else 0,
    )


def _store_uploads(store: ObjectStore, request_id: str, uploads: Uploads) -> tuple[str, list[str], str | None]:
    """The checked uploads in the object store, before the request is published (deterministic keys): the source's
    URI, the references' and the mask's."""

    # Named by their hashes: a retry under the same idempotency key with other files never replaces the originals.
    def put(data: bytes) -> str:
        key = f"gateway/uploads/{request_id}/{hashlib.sha256(data).hexdigest()[:32]}.png"
        return store.put(key, data, CONTENT_TYPES["PNG"]).uri

    mask = None if uploads.mask is None else put(uploads.mask)
    return put(uploads.source), [put(reference) for reference in uploads.references], mask


async def _answer(
    gateway: Gateway,
    call: ImageCall,
    submission: Submission,
    uploads: Uploads | None,
    created: int,
    request: Request,
    started_s: float,
) -> JSONResponse:
    """OpenAI's answer once the result is in, with the gateway's own time beside the pipeline's (Server-Timing)."""
    waited_s = time.perf_counter()
    result = await submit_and_wait(gateway, submission, request)
    waited_s = time.perf_counter() - waited_s
    error = result_error(result)
    if error is not None:
        raise error
    data = await asyncio.to_thread(outputs, gateway, call, result, str(request.base_url))
    body = {
        "created": created,
        "data": data,
        "background": "opaque",
        "output_format": call.output_format,
        "quality": gateway.quality_ran(call, result.model, result.steps),
        "size": f"{result.width or submission.width}x{result.height or submission.height}",
        "usage": usage(call, result, len(uploads.images) if uploads is not None else 0),
    }
    # The gateway's own time (checks, uploads, publishing, answering) beside the wait for the pipeline's result.
    total_s = time.perf_counter() - started_s
    timing = f"gateway;dur={(total_s - waited_s) * 1000:.1f}, pipeline;dur={waited_s * 1000:.1f}"
    return JSONResponse(body, headers={"x-request-id": submission.request_id, "server-timing": timing})
