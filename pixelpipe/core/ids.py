"""Ids: fresh event ids, ids derived from a request id (so a redelivery repeats them), and the request-id rule."""

from __future__ import annotations

import re
import uuid

# request_id is the Kafka key and a segment of object keys, so the contract limits it to safe characters.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_EVENT_NAMESPACE = uuid.UUID("6f1e3c2a-8d4b-4f0e-9a7c-5b2d1e0f3a4c")


def new_event_id() -> str:
    return str(uuid.uuid4())


def derived_event_id(source: str, what: str) -> str:
    """The same id every time ``what`` happens to ``source``: replays repeat it and the sinks count it once."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{source}/{what}"))
