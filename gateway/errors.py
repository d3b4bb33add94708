"""OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status to send."""

from __future__ import annotations

import math
from typing import Any


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
    """A 400 naming the parameter at fault."""
    return ApiError(400, message, param=param, code=code)
