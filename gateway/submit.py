"""A call handed to the pipeline and its result waited for while the caller stays: a caller that disconnects first
abandons its request (``Pipeline.abandon``), which is cancelled unless the call carried an idempotency key.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from pixelpipe.core.events import ImageResult
from pixelpipe.gateway.pipeline import Submission
from pixelpipe.gateway.state import Gateway
from pixelpipe.gateway.telemetry import WAITING


class CallerGone(Exception):
    """The caller disconnected before its answer."""


async def submit_and_wait(gateway: Gateway, submission: Submission, request: Request) -> ImageResult:
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
