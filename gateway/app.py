"""The gateway's HTTP API: OpenAI's Images API (``/v1/images/generations``, ``/v1/images/edits``) and
``/v1/models``, on Starlette, over the pipeline (``pipeline.py``).

A call is checked whole before anything is published: its key (401), its rate limit (429), the pipeline's backlog
(503), its parameters (400). Then it is published once and waited for; its result becomes OpenAI's response, or
its error envelope. Every answer to an authenticated call carries ``x-request-id``: the request id of the
ImageRequest, its rows in ClickHouse and its objects in the store. A caller that disconnects before its answer (its
connection closed, its own timeout, a closed event stream) abandons its request, which is cancelled unless the call
carried an idempotency key (``Pipeline.abandon``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import math
import socket
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pixelpipe.core.events import ImageResult
from pixelpipe.core.objects import FileObjectStore, ObjectStore, ObjectStoreError, open_object_store, validate_key
from pixelpipe.core.settings import Settings
from pixelpipe.core.telemetry import Health
from pixelpipe.core.validation import normalise_text
from pixelpipe.gateway.bodies import read_form, read_json_object
from pixelpipe.gateway.errors import (
    ApiError,
    InternalErrors,
    error_response,
    internal_error,
    invalid,
    rate_limited,
    route_error,
)
from pixelpipe.gateway.keys import ApiKey, KeyStore
from pixelpipe.gateway.params import ImageCall, ModelInfo, parse_call, parse_size, read_registry
from pixelpipe.gateway.pipeline import Pipeline, Submission, request_id_for
from pixelpipe.gateway.ratelimit import TokenBuckets, UsageSync
from pixelpipe.gateway.telemetry import WAITING, MetricsMiddleware
from pixelpipe.gateway.uploads import CONTENT_TYPES, check_image, mask_png, source_png

log = logging.getLogger(__name__)
MAX_IDEMPOTENCY_KEY_CHARS = 255
TILE = 16  # usage counts an image's 16x16 tiles as its tokens
# Threads for the calls' blocking work (object store reads and writes, a retry's topic scans, transcoding): the
# loop's default (CPU count + 4) would queue calls behind a few slow reads while the cores sit idle.
IO_THREADS = 64
MAX_EDIT_IMAGES = 16  # OpenAI's limit on an edit's images; each model takes at most its max_source_images
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "json": "application/json"}
CLIENT_CLOSED = 499  # nginx's status for a call whose caller left before the answer: counted, never received


class CallerGone(Exception):
    """The caller disconnected before its answer."""


def instance_id(settings: Settings) -> str:
    return settings.gateway.instance_id or f"{socket.gethostname()}-{settings.gateway.port}"


@dataclass
class Gateway:
    """Everything a request handler needs; one per process."""

    settings: Settings
    keys: KeyStore
    models: dict[str, ModelInfo]
    store: ObjectStore
    pipeline: Pipeline
    buckets: TokenBuckets

    @property
    def default_model(self) -> str:
        return self.settings.gateway.default_model or next(iter(self.models))

    # -- checks before any work ----------------------------------------------------------------------------
    def authenticate(self, request: Request) -> ApiKey:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                code="missing_api_key",
            )
        key = self.keys.authenticate(token.strip())
        if key is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key

    def admit(self, key: ApiKey) -> None:
        wait_s = self.buckets.take(key.key_id, key.requests_per_minute, key.burst)
        if wait_s > 0:
            raise rate_limited(
                f"Rate limit reached for key {key.key_id} on requests per min (RPM): Limit "
                f"{key.requests_per_minute}, in bursts of at most {key.burst}. Please try again in {wait_s:.1f}s.",
                wait_s,
            )

    def allowed_models(self, key: ApiKey) -> set[str]:
        return {name for name in self.models if key.allows(name)}

    def quality_ran(self, call: ImageCall, model: str, steps: int | None) -> str:
        """The quality, as OpenAI's answers name it, of a render by ``model`` of ``steps`` (a result's: an
        experiment's variant may set both for an ``auto`` call); without them, what the call asked for."""
        info = self.models.get(model, self.models[call.model])
        return info.quality_of(steps or call.steps or info.default_steps, call.quality)

    def check_url_possible(self, call: ImageCall) -> None:
        if (
            call.response_format == "url"
            and isinstance(self.store, FileObjectStore)
            and not self.settings.gateway.url_signing_key
        ):
            raise invalid(
                "response_format",
                "response_format 'url' needs an S3 object store or PIXELPIPE_GATEWAY_URL_SIGNING_KEY on this "
                "gateway; use b64_json",
            )

    # -- answers -------------------------------------------------------------------------------------------
    def sign(self, key: str, expires: int) -> str:
        secret = self.settings.gateway.url_signing_key.encode()
        return hmac.new(secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url_for(self, uri: str, base_url: str) -> str:
        expiry = self.settings.gateway.url_expiry_s
        if isinstance(self.store, FileObjectStore):
            key = self.store.key_of(uri)
            expires = int(time.time()) + expiry
            return f"{base_url}v1/files/{quote(key)}?expires={expires}&signature={self.sign(key, expires)}"
        return self.store.presigned_url(uri, expiry)

    def outputs(self, call: ImageCall, result: ImageResult, base_url: str) -> list[dict[str, Any]]:
        """Each stored image as OpenAI's ``data`` entry: transcoded to the output format, inline or as a URL."""
        revised = normalise_text(call.prompt)
        data = []
        for index, image in enumerate(result.images):
            uri = image.uri
            body = None
            if call.output_format != "png" or call.response_format == "b64_json":
                body = transcode(self.store.get(uri), call.output_format, call.output_compression)
            entry: dict[str, Any] = {}
            if call.response_format == "b64_json":
                entry["b64_json"] = base64.b64encode(body or b"").decode()
            else:
                if call.output_format != "png":
                    key = f"gateway/outputs/{result.request_id}/{index}.{call.output_format}"
                    uri = self.store.put(key, body or b"", MEDIA_TYPES[call.output_format]).uri
                entry["url"] = self.url_for(uri, base_url)
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


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def list_models(request: Request) -> Response:
    gateway = _gateway(request)
    try:
        key = gateway.authenticate(request)
    except ApiError as e:
        return error_response(e)
    request_id = request.state.request_id = request_id_for(key.key_id, None)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "pixelpipe"}
        for name in gateway.models
        if key.allows(name)
    ]
    return JSONResponse({"object": "list", "data": data}, headers={"x-request-id": request_id})


async def generations(request: Request) -> Response:
    return await _images(request, "GENERATE")


async def edits(request: Request) -> Response:
    return await _images(request, "EDIT")


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


async def _images(request: Request, kind: str) -> Response:
    gateway = _gateway(request)
    request_id = None
    started_s = time.perf_counter()
    try:
        key = gateway.authenticate(request)
        idempotency_key = request.headers.get("idempotency-key")
        request_id = request.state.request_id = request_id_for(key.key_id, idempotency_key)
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise invalid(None, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
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
        gateway.admit(key)
        gateway.pipeline.check_capacity()
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
        submission = Submission(
            request_id=request_id,
            idempotent=idempotency_key is not None,
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
        created = int(time.time())
        if call.stream:
            return _stream(gateway, call, submission, created, request, uploads is not None)
        waited_s = time.perf_counter()
        result = await _wait_for(gateway, submission, request)
        waited_s = time.perf_counter() - waited_s
        error = result_error(result)
        if error is not None:
            raise error
        data = await asyncio.to_thread(gateway.outputs, call, result, str(request.base_url))
    except CallerGone:
        return Response(status_code=CLIENT_CLOSED)
    except ApiError as e:
        return error_response(e, request_id)
    body = {
        "created": created,
        "data": data,
        "background": "opaque",
        "output_format": call.output_format,
        "quality": gateway.quality_ran(call, result.model, result.steps),
        "size": f"{result.width or width}x{result.height or height}",
        "usage": usage(call, result, len(uploads.images) if uploads is not None else 0),
    }
    # The gateway's own time (checks, uploads, publishing, answering) beside the wait for the pipeline's result.
    total_s = time.perf_counter() - started_s
    timing = f"gateway;dur={(total_s - waited_s) * 1000:.1f}, pipeline;dur={waited_s * 1000:.1f}"
    return JSONResponse(body, headers={"x-request-id": request_id, "server-timing": timing})


async def _wait_for(gateway: Gateway, submission: Submission, request: Request) -> ImageResult:
    """The submission's result, counted in the calls waiting (``pixelpipe_gateway_calls_waiting``) meanwhile. If the
    caller disconnects first, or the wait is cancelled (Starlette cancels an event stream whose caller left), the
    request is abandoned (``Pipeline.abandon``), and CallerGone raised."""
    WAITING.inc()
    waiting = asyncio.ensure_future(gateway.pipeline.submit(submission))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        if waiting.done():
            return waiting.result()
        raise CallerGone(submission.request_id)
    except (CallerGone, asyncio.CancelledError):
        waiting.cancel()
        gateway.pipeline.abandon(submission)
        raise
    finally:
        gone.cancel()
        WAITING.dec()


async def _disconnected(request: Request) -> None:
    """Returns once the caller has disconnected. Its body is read by then, so the server's next message is the
    disconnect (uvicorn sends it when the connection closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _stream(
    gateway: Gateway, call: ImageCall, submission: Submission, created: int, request: Request, edit: bool
) -> StreamingResponse:
    """Server-sent events: a partial image for each preview the render stage sends to the reply topic while the
    image renders, then the completed image (or an error event); nothing more once the caller has left."""
    prefix = "image_edit" if edit else "image_generation"
    size = f"{submission.width}x{submission.height}"
    common = {"background": "opaque", "output_format": call.output_format, "size": size}
    asked_quality = gateway.quality_ran(call, call.model, call.steps)  # the partial images come before the result
    listener = gateway.pipeline.listener
    base_url = str(request.base_url)

    async def events() -> AsyncIterator[bytes]:
        previews = listener.previews(submission.request_id)
        task = asyncio.ensure_future(_wait_for(gateway, submission, request))

        async def partial(index: int, preview: bytes) -> bytes:
            image = await asyncio.to_thread(transcode, preview, call.output_format, call.output_compression, "jpeg")
            return _event(
                common
                | {
                    "type": f"{prefix}.partial_image",
                    "quality": asked_quality,
                    "b64_json": base64.b64encode(image).decode(),
                    "created_at": created,
                    "partial_image_index": index,
                }
            )

        try:
            while not task.done():
                getting = asyncio.ensure_future(previews.get())
                await asyncio.wait({task, getting}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    break
                index, preview = getting.result()
                if index < call.partial_images:
                    yield await partial(index, preview)
            while not previews.empty():  # sent before the result: the reply topic keeps their order
                index, preview = previews.get_nowait()
                if index < call.partial_images:
                    yield await partial(index, preview)
            result = await task
            error = result_error(result)
            if error is not None:
                raise error
            b64_call = dataclasses.replace(call, response_format="b64_json")
            data = await asyncio.to_thread(gateway.outputs, b64_call, result, base_url)
            completed = common | {
                "type": f"{prefix}.completed",
                "quality": gateway.quality_ran(call, result.model, result.steps),
                "b64_json": data[0]["b64_json"],
                "created_at": created,
                "usage": usage(call, result, 1 if edit else 0),
            }
            yield _event(completed)
        except CallerGone:
            return
        except ApiError as e:
            yield _event({"type": "error", **e.body()})
        except Exception:  # after the 200 began: the error is the stream's last event (InternalErrors cannot answer)
            log.exception("call failed", extra={"request_id": submission.request_id})
            yield _event({"type": "error", **internal_error(submission.request_id).body()})
        finally:
            listener.forget_previews(submission.request_id)
            if not task.done():
                task.cancel()

    headers = {"x-request-id": submission.request_id, "Cache-Control": "no-cache"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _event(body: dict[str, Any]) -> bytes:
    return f"event: {body['type']}\ndata: {json.dumps(body)}\n\n".encode()


def _store_uploads(store: ObjectStore, request_id: str, uploads: Uploads) -> tuple[str, list[str], str | None]:
    """The checked uploads in the object store, before the request is published (deterministic keys): the source's
    URI, the references' and the mask's."""

    # Named by their hashes: a retry under the same idempotency key with other files never replaces the originals.
    def put(data: bytes) -> str:
        key = f"gateway/uploads/{request_id}/{hashlib.sha256(data).hexdigest()[:32]}.png"
        return store.put(key, data, CONTENT_TYPES["PNG"]).uri

    mask = None if uploads.mask is None else put(uploads.mask)
    return put(uploads.source), [put(reference) for reference in uploads.references], mask


async def files(request: Request) -> Response:
    """Objects of a file:// store, for ``response_format=url``: the link is signed and expires."""
    gateway = _gateway(request)
    key = request.path_params["key"]
    try:
        expires = int(request.query_params.get("expires", "0"))
    except ValueError:
        expires = 0
    signature = request.query_params.get("signature", "")
    store = gateway.store
    if (
        not isinstance(store, FileObjectStore)
        or not gateway.settings.gateway.url_signing_key
        or expires < time.time()
        or not hmac.compare_digest(signature, gateway.sign(key, expires))
    ):
        return error_response(ApiError(403, "This link is invalid or has expired.", code="invalid_signature"))
    try:
        data = await asyncio.to_thread(store.get, store.uri_for(validate_key(key)))
    except ObjectStoreError:
        return error_response(ApiError(404, "No such file.", code="not_found"))
    return Response(data, media_type=MEDIA_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream"))


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "reply_topic": _gateway(request).pipeline.reply_topic})


def create_app(settings: Settings, ops_health: Health | None = None) -> Starlette:
    """The ASGI app; the pipeline connects when it starts (the lifespan), and closes when it stops. ``ops_health``
    (the ops server's) gets a heartbeat from the event loop every second, and its ``pipeline`` check is done while the
    pipeline is started (the publisher made, the reply topic's consumer assigned) until shutdown begins."""
    ops_health = ops_health or Health(float("inf"), ["pipeline"])

    async def heartbeat() -> None:
        while True:
            ops_health.beat()
            await asyncio.sleep(1.0)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="gateway-io")
        )
        beating = asyncio.ensure_future(heartbeat())
        store = open_object_store(settings.objects)
        pipeline = Pipeline(settings, store, instance_id(settings))
        await asyncio.to_thread(pipeline.start, asyncio.get_running_loop())
        keys, buckets = KeyStore(settings.gateway.keys_file), TokenBuckets()
        usage = None
        if settings.gateway.usage_sync_s > 0:
            usage = UsageSync(
                settings.kafka, settings.topics, instance_id(settings), buckets, keys, settings.gateway.usage_sync_s
            )
            await asyncio.to_thread(usage.start)
        app.state.gateway = Gateway(
            settings=settings,
            keys=keys,
            models=read_registry(settings.models.registry),
            store=store,
            pipeline=pipeline,
            buckets=buckets,
        )
        ops_health.mark("pipeline")
        log.info("gateway ready", extra={"reply_topic": pipeline.reply_topic})
        try:
            yield
        finally:
            ops_health.mark("pipeline", False)
            beating.cancel()
            if usage is not None:
                await asyncio.to_thread(usage.close)
            await asyncio.to_thread(pipeline.close)

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/files/{key:path}", files, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(MetricsMiddleware), Middleware(InternalErrors)],
        exception_handlers={404: route_error, 405: route_error},
    )
