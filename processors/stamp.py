"""The moderation stamp: proof, on a request in the generate or edit topic, that moderation forwarded it.

Moderation puts an HMAC-SHA256 of the request's bytes, keyed by ``PIXELPIPE_MODERATION_STAMP_KEY``, in a Kafka
header of the request it forwards; the render stages render only requests whose stamp verifies. A header rather
than a wrapper: the forwarded value stays the request's own bytes, so the render stages, the dead letters and any
other reader of those topics decode it as before. Kafka ACLs keep producers off those topics; the stamp is the
second line, for a principal or listener the ACLs do not cover. It does not stop a replay of a request moderation
did forward: that renders it again under the same request id, and its results are deduplicated downstream.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from pixelpipe.core.settings import ConfigError

STAMP_HEADER = "pixelpipe-moderation-stamp"


class ModerationStamp:
    """Makes and checks stamps with one key; refuses to exist without one, so no stage ever skips the check."""

    def __init__(self, key: str) -> None:
        if not key:
            raise ConfigError(
                "PIXELPIPE_MODERATION_STAMP_KEY is empty: moderation stamps what it forwards and the render stages "
                "check it, so every worker needs the same secret key (`pixelpipe stack env` and the demo provide one)"
            )
        self._key = key.encode()

    def headers(self, value: bytes) -> dict[str, bytes]:
        """The headers a forwarded request carries."""
        return {STAMP_HEADER: self._sign(value)}

    def verify(self, value: bytes, headers: Mapping[str, bytes]) -> bool:
        return hmac.compare_digest(headers.get(STAMP_HEADER) or b"", self._sign(value))

    def _sign(self, value: bytes) -> bytes:
        return hmac.new(self._key, value, hashlib.sha256).hexdigest().encode()
