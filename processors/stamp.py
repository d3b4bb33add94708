"""The moderation stamp: proof, on a request in a render topic, that moderation forwarded it to that topic.

Moderation puts an HMAC-SHA256 of the topic it forwards a request to and the request's bytes, keyed by
``PIXELPIPE_MODERATION_STAMP_KEY``, in a Kafka header of the request it forwards; a render stage renders only
requests whose stamp verifies for the topic it read them from. A header rather than a wrapper: the forwarded value
stays the request's own bytes, so the render stages, the dead letters and any other reader of those topics decode
it as before. The topic is part of what is signed because it is part of what moderation decided: the stage (generate
or edit) and the lane (main or long, by the request's compute). A stamped request copied onto another render topic
fails the check there. Kafka ACLs keep producers off those topics; the stamp is the second line, for a principal or
listener the ACLs do not cover. It does not stop a replay onto the same topic: that renders the request again under
the same request id, and its results are deduplicated downstream.
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

    def headers(self, topic: str, value: bytes) -> dict[str, bytes]:
        """The headers a request forwarded to ``topic`` carries."""
        return {STAMP_HEADER: self._sign(topic, value)}

    def verify(self, topic: str, value: bytes, headers: Mapping[str, bytes]) -> bool:
        """Whether ``value``, read from ``topic``, carries moderation's stamp for that topic."""
        return hmac.compare_digest(headers.get(STAMP_HEADER) or b"", self._sign(topic, value))

    def _sign(self, topic: str, value: bytes) -> bytes:
        # A topic name never holds a NUL (Kafka allows [a-zA-Z0-9._-]), so topic and value cannot run into each other.
        return hmac.new(self._key, topic.encode() + b"\0" + value, hashlib.sha256).hexdigest().encode()
