"""The gateway's state, one per process (``app.state.gateway``): its settings, API keys, models, object store,
pipeline and rate limits, and the checks every call passes before any work (its key, its rate, the models it may
use, a URL answer this gateway can sign) and the signed URLs of stored images.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import quote

from starlette.requests import Request

from pixelpipe.core.objects import FileObjectStore, ObjectStore
from pixelpipe.core.settings import Settings
from pixelpipe.gateway.errors import ApiError, invalid, rate_limited
from pixelpipe.gateway.keys import ApiKey, KeyStore
from pixelpipe.gateway.params import ImageCall, ModelInfo
from pixelpipe.gateway.pipeline import Pipeline
from pixelpipe.gateway.ratelimit import TokenBuckets


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

    # -- signed URLs ---------------------------------------------------------------------------------------
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


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway
