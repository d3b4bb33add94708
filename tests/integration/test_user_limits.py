"""Per-user limits across moderation workers, on the real broker.

Three `pixelpipe worker --stages moderation` in one group hold a flooding user to the configured rate and burst
(the old per-worker limit let each worker give its own), a killed owner's successor takes the user's bucket from
the table's changelog instead of a fresh burst, and a request on another partition is moved to its user's and
counted there; a worker keeps its users' buckets through rebalances. Bounds come from the broker's append times,
never from how fast this machine is."""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_LOG_APPEND_TIME, Consumer, TopicPartition

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageRequest, ImageResult, StageMetric
from pixelpipe.core.topics import ensure_topics, user_partition
from pixelpipe.processors.limits import UserLimits
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.tools.processes import WorkerProcess

pytestmark = pytest.mark.integration
RATE, BURST, PARTITIONS = 60, 5, 6  # a low rate: the bound is small and the check sharp
FLOODER = "flooder"
ADMITTED = "ADMITTED"  # forwarded to a render topic


def ask(user: str, i: int) -> ImageRequest:
    return new_request(prompt=f"{user} lighthouse {i}", model="tiny-sd", user_id=user, width=64, height=64, steps=2)


@dataclass
class Seen:
    """Per request id: its records on the requests topic (partition, offset, broker append time in s, user), and
    its outcomes: ADMITTED for each copy forwarded, "STATUS:CODE" for each result."""

    appended: dict[str, list[tuple[int, int, float, str]]] = field(default_factory=lambda: defaultdict(list))
    outcomes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def admitted(self, ids: list[str]) -> list[str]:
        return [i for i in ids if ADMITTED in self.outcomes[i]]

    def replay(self, user: str, rate: float = RATE) -> set[str]:
        """The requests of ``user`` one bucket admits, charged in the order they arrived on the user's partition."""
        home = user_partition(user, PARTITIONS)
        records = sorted((o, t, i) for i, rs in self.appended.items() for p, o, t, u in rs if p == home and u == user)
        limits = UserLimits(rate, BURST, 0)
        return {i for _, t, i in records if limits.admit(user, t, None) is None}


def read_back(settings, ids: list[str], timeout_s: float = 240, settle_s: float = 3) -> Seen:
    """The requests topic, the render topics and the results topic from the start, until every id has an outcome
    (and ``settle_s`` more, to catch repeats)."""
    topics, codec, seen = settings.topics, codec_from_settings(settings.kafka), Seen()
    consumer = Consumer(settings.kafka.client_config() | {"group.id": f"reader-{uuid.uuid4()}"})
    names = [topics.requests, *topics.render(), topics.results]
    consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in names for p in range(PARTITIONS)])
    deadline, settle = time.monotonic() + timeout_s, None
    try:
        while time.monotonic() < (settle or deadline):
            for m in consumer.consume(500, timeout=0.5):
                if m.error():
                    continue
                if m.topic() == topics.requests:
                    kind, ms = m.timestamp()
                    assert kind == TIMESTAMP_LOG_APPEND_TIME
                    user = codec.decode_as(ImageRequest, m.value()).user_id
                    seen.appended[m.key().decode()].append((m.partition(), m.offset(), ms / 1000, user))
                elif m.topic() == topics.results:
                    result = codec.decode_as(ImageResult, m.value())
                    seen.outcomes[result.request_id].append(f"{result.status}:{result.error_code}")
                else:
                    seen.outcomes[codec.decode_as(ImageRequest, m.value()).request_id].append(ADMITTED)
            if settle is None and all(seen.outcomes.get(i) for i in ids):
                settle = time.monotonic() + settle_s
    finally:
        consumer.close()
    assert settle is not None, f"{sum(not seen.outcomes.get(i) for i in ids)} requests without an outcome"
    return seen


def publish(settings, requests) -> None:
    with Publisher(settings) as publisher:
        for pending in [publisher.publish(r) for r in requests]:
            pending.result(timeout=60)


def moderated_by(settings, user: str, not_by: str | None = None) -> str:
    """The worker that moderates a probe request of ``user`` (probes every 2 s until one other than ``not_by``)."""
    while True:
        publish(settings, [probe := ask(user, 0)])
        if (worker := metrics(settings, [probe.request_id])[probe.request_id][0]) != not_by:
            return worker
        time.sleep(2)


def holds_all(worker: WorkerProcess) -> bool:
    """Whether the worker's latest assignment, as it logs them, is every partition of the requests topic."""
    log = worker.log_path.read_text(errors="replace").splitlines()
    lines = [line for line in log if '"msg": "partitions assigned"' in line]
    return bool(lines) and len(json.loads(lines[-1]).get("partitions", [])) == PARTITIONS


def metrics(settings, ids: list[str], settle_s: float = 0) -> dict[str, list[str]]:
    """The workers that moderated each request (a metric each time)."""
    found = collect(settings.kafka, settings.topics.metrics, StageMetric, ids, timeout_s=240, settle_s=settle_s)
    assert not found.missing
    return {i: [m.worker_id for m in events] for i, events in found.events.items()}


@pytest.fixture
def limited(topic_settings, tmp_path, request):
    """Three moderation workers in one group (a rate of ``request.param`` per minute, else RATE); yields settings,
    workers by id, each partition's owner, learnt from the metric of a probe request of a user living there, and
    those users."""
    settings = topic_settings.updated(
        consumer_group=f"limits-{uuid.uuid4().hex[:8]}",
        topic_partitions=PARTITIONS,
        max_requests_per_user_per_minute=getattr(request, "param", RATE),
        rate_limit_burst=BURST,
        max_user_compute_per_minute=0,  # requests only
        log_level="INFO",  # each assignment in the log
    )
    ensure_topics(settings.kafka, settings.topics)
    workers = {
        f"w{n}": WorkerProcess(settings.updated(worker_id=f"w{n}"), ["moderation"], tmp_path / f"w{n}.log")
        for n in range(3)
    }
    try:
        users = {user_partition(f"user-{n}", PARTITIONS): f"user-{n}" for n in range(100)}
        owners: dict[int, str] = {}
        deadline = time.monotonic() + 400  # the workers load their models, then join one by one
        while len(owners) < PARTITIONS or len(set(owners.values())) < 3:
            assert time.monotonic() < deadline, "\n".join(w.log_tail() for w in workers.values())
            publish(settings, (probes := {p: ask(user, 0) for p, user in users.items()}).values())
            ids = [r.request_id for r in probes.values()]
            found = collect(settings.kafka, settings.topics.metrics, StageMetric, ids, timeout_s=5).events
            owners = {p: found[r.request_id][0].worker_id for p, r in probes.items() if r.request_id in found}
            time.sleep(2)  # a probe refused for its user's rate is moderated (and measured) all the same
        yield settings, workers, owners, users
    finally:
        for worker in workers.values():
            worker.kill()


def flood(settings, count: int, per_s: float, others: list[ImageRequest], midway=None) -> list[ImageRequest]:
    """``count`` requests of FLOODER at ``per_s``, ``others`` spread among them; ``midway(flood)`` is called once,
    a fifth of the way through."""
    requests = [ask(FLOODER, i) for i in range(count)]
    spread = max(1, count // max(1, len(others)))
    with Publisher(settings) as publisher:
        pending = []
        for i, r in enumerate(requests):
            if midway is not None and i == count // 5:
                midway(requests)
            pending.append(publisher.publish(r))
            if i % spread == 0 and others:
                pending.append(publisher.publish(others.pop()))
            time.sleep(1 / per_s)
        for p in pending:
            p.result(timeout=60)
    return requests


def bound_of(seen: Seen, ids: list[str], rate: float = RATE) -> tuple[int, float, float]:
    """The requests of ``ids`` admitted, the most one bucket allows over their arrival window (+1 for a token at
    the boundary), and that window."""
    times = [seen.appended[i][0][2] for i in ids]
    window_s = max(times) - min(times)
    return len(seen.admitted(ids)), rate / 60 * window_s + BURST + 1, window_s


def test_three_workers_hold_a_flooding_user_to_one_rate_and_serve_the_others(limited):
    settings, _workers, _owners, users = limited
    others = [ask(user, 1) for user in users.values()]
    flooded = [r.request_id for r in flood(settings, 150, 25, list(others))]
    seen = read_back(settings, flooded + [r.request_id for r in others])
    admitted, bound, window_s = bound_of(seen, flooded)
    print(f"\nno kill: admitted {admitted} of {len(flooded)} over {window_s:.2f} s; bound {bound:.1f}")
    assert all(seen.outcomes[i] in ([ADMITTED], ["FAILED:RATE_LIMITED"]) for i in flooded)  # each exactly once
    assert BURST <= admitted <= bound < 3 * bound
    assert set(seen.admitted(flooded)) == seen.replay(FLOODER)  # one bucket, charged in arrival order
    assert all(seen.outcomes[r.request_id] == [ADMITTED] for r in others)  # the others are not held back


def test_the_next_owner_takes_the_flooding_users_bucket_from_the_changelog(limited):
    settings, workers, owners, _users = limited
    owner = owners[user_partition(FLOODER, PARTITIONS)]

    def kill_owner(requests: list[ImageRequest]) -> None:
        metrics(settings, [r.request_id for r in requests[: BURST + 2]])  # it has charged the user
        workers[owner].kill()

    flooded = [r.request_id for r in flood(settings, 200, 20, [], midway=kill_owner)]
    seen = read_back(settings, flooded)
    admitted, bound, window_s = bound_of(seen, flooded)
    by = metrics(settings, flooded, settle_s=2)
    before = sum(owner in by[i] for i in seen.admitted(flooded))
    print(
        f"\nowner {owner} killed: admitted {admitted} of {len(flooded)} over {window_s:.2f} s ({before} by the killed"
        f" owner); bound {bound:.1f}, 3x {3 * bound:.1f}; moderated by {sorted({w for ws in by.values() for w in ws})}"
    )
    assert all(set(seen.outcomes[i]) <= {ADMITTED, "FAILED:RATE_LIMITED"} for i in flooded)
    assert {w for ws in by.values() for w in ws} - {owner}, "no other worker took the user's partition"
    assert 0 < before < admitted, "the kill was not mid-flood"
    assert BURST <= admitted <= bound


def test_a_request_on_another_partition_is_moved_home_and_counted_there(limited):
    settings, _workers, owners, _users = limited
    user = "mover"
    home = user_partition(user, PARTITIONS)
    wrong = next(p for p in range(PARTITIONS) if owners[p] != owners[home])
    placed, moved = [ask(user, i) for i in range(BURST)], ask(user, BURST)
    publish(settings, placed)
    with Publisher(settings) as publisher:
        value = codec_from_settings(settings.kafka).encode(moved)
        publisher.publish_encoded(moved.request_id.encode(), value, partition=wrong).result(timeout=60)
    ids = [r.request_id for r in placed] + [moved.request_id]
    seen = read_back(settings, ids)
    print(f"\nmoved from {wrong} to {home}: {seen.appended[moved.request_id]} -> {seen.outcomes[moved.request_id]}")
    assert sorted(p for p, *_ in seen.appended[moved.request_id]) == sorted([wrong, home])  # where sent, and home
    assert len(seen.outcomes[moved.request_id]) == 1  # exactly once
    assert set(seen.admitted(ids)) == seen.replay(user)  # counted in the user's one bucket, when it got home
    assert metrics(settings, [moved.request_id], settle_s=2)[moved.request_id] == [owners[home]]


@pytest.mark.parametrize("limited", [6], indirect=True)  # a bucket that takes 50 s to refill outlasts two rebalances
def test_a_partition_kept_through_a_rebalance_keeps_its_users_buckets(limited):
    settings, workers, owners, users = limited
    home = user_partition(FLOODER, PARTITIONS)
    first, second = [ask(FLOODER, i) for i in range(20)], [ask(FLOODER, 20 + i) for i in range(20)]
    publish(settings, first)
    read_back(settings, [r.request_id for r in first])  # the bucket emptied on its first owner
    workers[owners[home]].kill()
    successor = moderated_by(settings, users[home], not_by=owners[home])  # it recovered the bucket
    # The third worker leaves: the successor keeps the user's partition through a second rebalance.
    workers[next(w for w in workers if w not in (owners[home], successor))].stop()
    deadline = time.monotonic() + 120
    while not holds_all(workers[successor]):
        assert time.monotonic() < deadline, workers[successor].log_tail()
        time.sleep(0.5)
    assert moderated_by(settings, users[home]) == successor
    publish(settings, second)
    ids = [r.request_id for r in first + second]
    seen = read_back(settings, ids)
    admitted, bound, window_s = bound_of(seen, ids, 6)
    print(f"\ntwo rebalances: admitted {admitted} of {len(ids)} over {window_s:.2f} s; bound {bound:.1f}")
    assert admitted <= bound
    assert set(seen.admitted(ids)) == seen.replay(FLOODER, 6)
