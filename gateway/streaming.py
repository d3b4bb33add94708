"""An images call with ``stream=true`` answered as OpenAI's server-sent events: a partial image for each preview
the render stage sends while the image renders, then the completed image, or an error event.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from pixelpipe.gateway.answers import outputs, result_error, transcode, usage
from pixelpipe.gateway.errors import ApiError, internal_error
from pixelpipe.gateway.params import ImageCall
from pixelpipe.gateway.pipeline import Submission
from pixelpipe.gateway.state import Gateway
from pixelpipe.gateway.submit import CallerGone, submit_and_wait

log = logging.getLogger(__name__)


def stream(
    gateway: Gateway, call: ImageCall, submission: Submission, created: int, request: Request, edit: bool
) -> StreamingResponse:
    """Server-sent events: a partial image for each preview the render stage sends to the reply topic while the
    image renders, then the completed image (or an error event); nothing more once the caller has left."""
    prefix = "image_edit" if edit else "image_generation"
    size = f"{submission.width}x{submission.height}"
    common = {"background": "opaque", "output_format": call.output_format, "size": size}
    asked_quality = gateway.quality_ran(call, call.model, call.steps)  # the partial images come before the result
    base_url = str(request.base_url)

    async def events() -> AsyncIterator[bytes]:
        previews = gateway.pipeline.previews(submission.request_id)
        task = asyncio.ensure_future(submit_and_wait(gateway, submission, request))

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
            data = await asyncio.to_thread(outputs, gateway, b64_call, result, base_url)
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
            gateway.pipeline.forget_previews(submission.request_id)
            if not task.done():
                task.cancel()

    headers = {"x-request-id": submission.request_id, "Cache-Control": "no-cache"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _event(body: dict[str, Any]) -> bytes:
    return f"event: {body['type']}\ndata: {json.dumps(body)}\n\n".encode()
