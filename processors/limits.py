"""Per-user limits that hold across moderation workers: each user's token buckets live in one place, the
partition that user's requests arrive on.

Publishers put a user's requests on the requests topic's partition
``pixelpipe.core.topics.user_partition(user, partitions)`` (the
request id stays the key), so one moderation worker sees all of a user's requests, whatever the number of
workers. The worker keeps the buckets in a Faust table keyed by user (``UserLimits.state``), and writes each change
to the table's changelog partition of the same number alongside the take's other events, so a restart or a
rebalance hands the next owner the user's bucket as it was, not a fresh one. A request found on another partition
(a publisher that does not place them) is moved to its user's partition before it is counted.
"""

from __future__ import annotations

from collections.abc import Collection, MutableMapping

from pixelpipe.core.topics import user_partition

IDLE_S = 60.0  # a bucket idle this long is full again: the same as no bucket, so it may be forgotten


class TokenBucket:
    """A token bucket's arithmetic: up to ``capacity`` tokens (never more than a minute's), refilled at
    ``per_minute``; a charge of ``cost`` tokens is taken, or refused and takes none. ``per_minute`` 0 turns it off."""

    def __init__(self, per_minute: float, burst: float) -> None:
        self.per_minute = per_minute
        self.capacity = float(max(1, min(burst, per_minute)))

    def charge(self, tokens: float, last_s: float, at_s: float, cost: float) -> tuple[bool, float, float]:
        """Whether ``cost`` is allowed from a bucket of ``tokens`` last charged at ``last_s``; and the bucket after."""
        if self.per_minute <= 0:
            return True, tokens, last_s
        tokens = min(self.capacity, tokens + max(0.0, at_s - last_s) * self.per_minute / 60.0)
        allowed = tokens >= cost
        return allowed, tokens - cost if allowed else tokens, max(last_s, at_s)


class UserLimits:
    """Each user's request-rate and compute buckets, in ``state`` (user: [tokens, at, compute tokens, compute at, home
    partition]).

    Counting requests, each costs one token; counting compute, each costs its device seconds
    (``ModelEntry.compute``). Time comes from the broker's arrival time, never the producer's own timestamp, so a
    producer cannot buy tokens by stamping its requests apart. The burst is small on purpose: what a flood gets past
    moderation lands in the render topics ahead of everyone else's requests. ``changes`` hands over the users whose
    buckets changed, each with its home partition (of ``partitions``), for the table's changelog."""

    def __init__(
        self,
        requests_per_minute: float,
        burst: float,
        compute_per_minute: float,
        state: MutableMapping[str, list[float]] | None = None,
        partitions: int = 1,
    ) -> None:
        self.requests = TokenBucket(requests_per_minute, burst)
        self.compute = TokenBucket(compute_per_minute, compute_per_minute)
        self.state: MutableMapping[str, list[float]] = {} if state is None else state
        self.partitions = partitions
        self._changed: set[str] = set()
        self.latest_s = 0.0  # the latest arrival charged: the buckets' clock

    def home(self, user_id: str) -> int:
        return user_partition(user_id, self.partitions)

    def admit(self, user_id: str, at_s: float, compute: float | None) -> str | None:
        """Charge one request (and its ``compute``, where known) to ``user_id``; None when admitted, else which
        limit refused it: "requests" or "compute" (a refused request takes no compute tokens)."""
        self.latest_s = max(self.latest_s, at_s)
        bucket = self.state.get(user_id)
        if bucket is None:
            bucket = [self.requests.capacity, at_s, self.compute.capacity, at_s, self.home(user_id)]
        tokens, last_s, compute_tokens, compute_last_s, home = bucket
        allowed, tokens, last_s = self.requests.charge(tokens, last_s, at_s, 1.0)
        refused = None if allowed else "requests"
        if allowed and compute is not None:
            allowed, compute_tokens, compute_last_s = self.compute.charge(compute_tokens, compute_last_s, at_s, compute)
            refused = None if allowed else "compute"
        self.state[user_id] = [tokens, last_s, compute_tokens, compute_last_s, home]
        self._changed.add(user_id)
        return refused

    def forget_idle(self) -> dict[str, tuple[int, None]]:
        """Drop the buckets idle for IDLE_S (full again) by the buckets' own clock, the latest arrival charged, so a
        moderation worker catching up on a backlog forgets nobody early; returns those users with their home
        partitions, whose changelog entries the caller deletes."""
        now_s = self.latest_s
        # A copy to iterate (made at once, under the GIL): Faust may add recovered users meanwhile.
        idle = {user: b[4] for user, b in list(self.state.items()) if now_s - max(b[1], b[3]) >= IDLE_S}
        for user in idle:
            self.state.pop(user, None)
            self._changed.discard(user)
        return {user: (home, None) for user, home in idle.items()}

    def keep_only(self, partitions: Collection[int]) -> None:
        """Forget the users of every other partition (moved in a rebalance: their next owner reads them back from
        the changelog)."""
        for user, bucket in list(self.state.items()):
            if bucket[4] not in partitions:
                self.state.pop(user, None)
                self._changed.discard(user)

    def changes(self) -> dict[str, tuple[int, list[float]]]:
        """The users charged since the last call: their home partition and their bucket now."""
        changed, self._changed = self._changed, set()
        return {user: (int(bucket[4]), bucket) for user in changed if (bucket := self.state.get(user)) is not None}
