"""Per-user limits: the token buckets' arithmetic, and the bookkeeping that keeps them in a Faust table (changes with
their home partitions, users forgotten when idle or when their partition moves)."""

from pixelpipe.core.settings import ModerationSettings, RequestLimits
from pixelpipe.core.topics import user_partition
from pixelpipe.processors.limits import IDLE_S, UserLimits


def test_a_flooding_user_gets_a_small_burst_then_the_rate_and_others_are_not_held():
    limits = UserLimits(requests_per_minute=60, burst=10, compute_per_minute=0)  # one a second, ten at once
    flood = [limits.admit("flooder", 1000.0 + i * 0.01, None) for i in range(200)]  # 200 requests in 2 s
    assert flood.count(None) == 11  # the burst, plus the one token the 2 s refilled
    assert set(flood) == {None, "requests"}
    assert all(limits.admit("someone-else", 1001.0 + i, None) is None for i in range(10))
    assert limits.admit("flooder", 1003.0, None) is None  # a second later, the next token
    assert UserLimits(5, 10, 0).requests.capacity == 5  # never more than a minute's worth at once
    assert all(UserLimits(0, 10, 0).admit("u", 0.0, None) is None for _ in range(1000))  # 0 turns it off


def test_a_request_is_charged_its_compute_and_a_refused_one_nothing():
    limits = UserLimits(requests_per_minute=0, burst=0, compute_per_minute=600)  # 600 device seconds a minute
    assert limits.compute.capacity == 600
    assert limits.admit("u", 0.0, 500) is None
    assert limits.admit("u", 0.0, 200) == "compute"  # 100 left: refused, and charged nothing
    assert limits.admit("u", 0.0, 100) is None
    assert limits.admit("u", 5.0, 60) == "compute"  # 5 s refill 50
    assert limits.admit("u", 6.0, 60) is None
    assert limits.admit("someone-else", 6.0, 600) is None
    assert limits.admit("v", 0.0, 601) == "compute"  # more than a minute's worth never passes
    assert limits.admit("w", 0.0, None) is None  # a model the registry lacks: the render stage fails it


def test_the_default_budgets_let_the_largest_request_through_a_fresh_bucket_and_not_twice_at_once():
    largest = RequestLimits().max_request_compute  # device seconds
    moderation = ModerationSettings()
    limits = UserLimits(0, 0, moderation.max_user_compute_per_minute)
    assert moderation.long_request_compute < largest <= limits.compute.capacity
    burst = int(limits.compute.capacity // largest)
    assert [limits.admit("u", 0.0, largest) for _ in range(burst + 1)] == [None] * burst + ["compute"]


def test_a_request_over_the_rate_takes_no_compute():
    limits = UserLimits(requests_per_minute=60, burst=1, compute_per_minute=600)
    assert limits.admit("u", 0.0, 100) is None
    assert limits.admit("u", 0.0, 100) == "requests"
    assert limits.state["u"][2] == 500  # only the admitted request's compute was taken


def test_changes_name_each_charged_user_once_with_its_home_partition_and_bucket():
    limits = UserLimits(60, 10, 600, partitions=8)
    for user in ("ann", "bob", "ann"):
        limits.admit(user, 0.0, 10)
    changes = limits.changes()
    assert set(changes) == {"ann", "bob"}
    assert changes["ann"] == (user_partition("ann", 8), limits.state["ann"])
    assert changes["ann"][1][0] == 8  # two of ten tokens taken
    assert limits.changes() == {}  # handed over once


def test_idle_users_are_forgotten_and_moved_partitions_users_dropped():
    limits = UserLimits(60, 10, 600, partitions=8)
    users = [f"user-{i}" for i in range(40)]
    for user in users:
        limits.admit(user, 0.0, 1)
    limits.changes()
    limits.admit(users[0], IDLE_S + 1.0, 1)  # charged again later: not idle
    forgotten = limits.forget_idle()
    assert set(forgotten) == set(users[1:])
    assert all(forgotten[u] == (user_partition(u, 8), None) for u in forgotten)  # tombstones for their partitions
    assert set(limits.state) == {users[0]}

    for user in users:
        limits.admit(user, 100.0, 1)
    given_up = {0, 1, 2}
    kept = set(range(8)) - given_up
    limits.keep_only(kept)
    assert limits.state and all(limits.home(u) in kept for u in limits.state)
    assert all(u in limits.state for u in users if limits.home(u) in kept)


def test_users_spread_over_partitions_and_each_keeps_one():
    homes = [user_partition(f"user-{i}", 12) for i in range(1200)]
    assert set(homes) == set(range(12))
    assert max(homes.count(p) for p in range(12)) < 2 * 1200 / 12
    assert all(user_partition(f"user-{i}", 12) == homes[i] for i in range(1200))
