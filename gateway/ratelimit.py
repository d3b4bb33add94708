"""Each key's rate limit, enforced by the gateway itself: a token bucket per key, in this process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBuckets:
    """``burst`` calls at once per key, refilled at ``per_minute`` a minute; ``take`` says how long to wait."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, per_minute: int, burst: int) -> float:
        """0 when a call may go now (and it is counted), else the seconds until one may."""
        rate = per_minute / 60.0
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate
