"""The gateway's HTTP API on Starlette: OpenAI's Images API (``/v1/images/generations``, ``/v1/images/edits``,
handled by ``images.py``), ``/v1/models``, the signed files of ``response_format=url`` and ``/healthz``; its lifespan
starts the pipeline (``pipeline.py``) and the state every handler reads (``state.py``).

Every answer to an authenticated call carries ``x-request-id``: the request id of the ImageRequest, its rows in
ClickHouse and its objects in the store. A caller that disconnects before its answer (its connection closed, its own
timeout, a closed event stream) abandons its request, which is cancelled unless the call carried an idempotency key
(``Pipeline.abandon``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pixelpipe.core.objects import FileObjectStore, ObjectStoreError, open_object_store, validate_key
from pixelpipe.core.settings import Settings
from pixelpipe.core.telemetry import Health
from pixelpipe.gateway.answers import MEDIA_TYPES
from pixelpipe.gateway.errors import ApiError, InternalErrors, error_response, route_error
from pixelpipe.gateway.images import edits, generations
from pixelpipe.gateway.keys import KeyStore
from pixelpipe.gateway.params import read_registry
from pixelpipe.gateway.pipeline import Pipeline, request_id_for
from pixelpipe.gateway.ratelimit import TokenBuckets, UsageSync
from pixelpipe.gateway.state import Gateway, gateway_of
from pixelpipe.gateway.telemetry import MetricsMiddleware

log = logging.getLogger(__name__)
# Threads for the calls' blocking work (object store reads and writes, a retry's topic scans, transcoding): the
# loop's default (CPU count + 4) would queue calls behind a few slow reads while the cores sit idle.
IO_THREADS = 64


def instance_id(settings: Settings) -> str:
    return settings.gateway.instance_id or f"{socket.gethostname()}-{settings.gateway.port}"


async def list_models(request: Request) -> Response:
    gateway = gateway_of(request)
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


async def files(request: Request) -> Response:
    """Objects of a file:// store, for ``response_format=url``: the link is signed and expires."""
    gateway = gateway_of(request)
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
    return JSONResponse({"status": "ok", "reply_topic": gateway_of(request).pipeline.reply_topic})


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
        await pipeline.start()
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
            await pipeline.close()

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
