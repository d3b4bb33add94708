"""OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status to send.

Every answer that is not a success is one: the handlers' refusals, Starlette's 404 and 405 (``route_error``), and
any exception no handler caught (``InternalErrors``), which is logged with the call's request id and answered with
a generic 500 that names that id and nothing of the exception.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)
# Starlette's routing errors, in OpenAI's wording.
ROUTE_ERRORS = {404: ("Invalid URL", "unknown_url"), 405: ("Invalid method for URL", "method_not_allowed")}


class ApiError(Exception):
    """An error the client gets in OpenAI's envelope; ``retry_after_s`` adds a Retry-After header."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        # Retry-After is whole seconds; OpenAI's clients read the finer retry-after-ms first.
        seconds = max(0.0, self.retry_after_s)
        return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, round(seconds * 1000)))}


def invalid(param: str | None, message: str, code: str | None = None) -> ApiError:
    """A 400 naming the parameter at fault; ``code`` as OpenAI's API gives it (``unknown_parameter``,
    ``invalid_value``, ``missing_required_parameter``) where it names one for the refusal."""
    return ApiError(400, message, param=param, code=code)


def rate_limited(message: str, retry_after_s: float) -> ApiError:
    """A 429 as OpenAI's API answers a request rate limit: type ``requests`` (``tokens`` is for token limits), code
    ``rate_limit_exceeded``."""
    return ApiError(429, message, type="requests", code="rate_limit_exceeded", retry_after_s=retry_after_s)


def internal_error(request_id: str | None) -> ApiError:
    """The answer to a failure of the gateway's own: nothing of its cause, which is logged under the request id."""
    report = f"; retry it, or report its request id {request_id}" if request_id else "; retry it"
    return ApiError(500, f"The server had an error while processing your request{report}.", type="server_error")


def error_response(error: ApiError, request_id: str | None = None) -> Response:
    """The envelope, with ``x-request-id`` where the call has one; as ASCII JSON, so that an envelope quoting the
    caller's text always encodes."""
    headers = error.headers() | ({"x-request-id": request_id} if request_id else {})
    return Response(json.dumps(error.body()), error.status, headers, media_type="application/json")


async def route_error(request: Request, exc: Exception) -> Response:
    """Starlette's 404 (no route for the path) or 405 (none for the method; its Allow header kept)."""
    assert isinstance(exc, HTTPException)
    wording, code = ROUTE_ERRORS[exc.status_code]
    path = request.scope["path"]  # not request.url, which parses the Host header
    response = error_response(ApiError(exc.status_code, f"{wording} ({request.method} {path})", code=code))
    response.headers.update(exc.headers or {})
    return response


class InternalErrors:
    """Answers an exception that no handler caught with ``internal_error``, logged with the call's request id
    (``request.state.request_id``, once the handler has assigned one). Pure ASGI, like the metrics middleware; an
    exception after the answer began (an event stream's) can only end the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answered = False

        async def sending(message: Message) -> None:
            nonlocal answered
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if answered:
                raise
            request_id = getattr(HTTPConnection(scope).state, "request_id", None)
            log.exception(
                "call failed", extra={"request_id": request_id, "method": scope["method"], "path": scope["path"]}
            )
            await error_response(internal_error(request_id), request_id)(scope, receive, send)
