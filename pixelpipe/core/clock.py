"""The one clock: event times in UTC, at the millisecond precision Avro's timestamp-millis keeps."""

from __future__ import annotations

import datetime as dt


def utc_now() -> dt.datetime:
    """Now in UTC, truncated to the millisecond, so a time compares equal after an Avro round trip."""
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
