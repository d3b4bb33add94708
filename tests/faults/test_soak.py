"""A long run with every restart in it.

The soak: a worker (moderation + generate, tiny models) and the ClickHouse sink run for PIXELPIPE_SOAK_S (180 s by
default: every event of the soak fits, and the suite's time goes to other tests; set it to hours for a long soak)
under a steady low load (PIXELPIPE_SOAK_RATE, 0.5 requests/s by default; 64x64, 2 steps). Along the way the worker is
stopped with SIGTERM and started again, killed with SIGKILL and started again, a second worker joins the group for a
while and leaves (two rebalances), and the broker is stopped and started as ``test_faults`` does it. Throughout,
every worker that should be running has its /healthz polled every couple of seconds, and the results landed in
ClickHouse are counted. At the end:

- ``Harness.verify``: every request has exactly one terminal result, none duplicated, every image stored;
- the worker group's lag is 0 on every partition of the topics it reads (no partition was left behind);
- no /healthz failure outside the restarts (the two worker restarts and the broker's, each until its recovery);
  the rebalance is not excused;
- no worker logged "agents stalled" outside those restarts, and results never stopped landing for long while
  requests were outstanding.

That /healthz fails for a stalled agent (idle, with events on the broker its consumer does not read) is checked in
``tests/unit/test_health_stall.py``: no honest way was found to make a real Faust consumer stop fetching from
outside the process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime

import pytest

from pixelpipe.core.events import ImageResult
from pixelpipe.core.telemetry import LagMonitor
from pixelpipe.core.topics import partition_count
from pixelpipe.processors.app import group_id
from pixelpipe.producers.results import collect
from tests.conftest import free_port
from tests.faults.conftest import STAGES

pytestmark = pytest.mark.faults

SOAK_S = float(os.environ.get("PIXELPIPE_SOAK_S", "180"))
# Low enough for a worker on a shared 2-core machine to keep up (tiny models rendered about 0.35 requests/s there
# with other suites running): a soak's backlog must drain, or its recoveries measure the backlog.
RATE_PER_S = float(os.environ.get("PIXELPIPE_SOAK_RATE", "0.5"))
POLL_S = 2.0  # /healthz of every running worker, and the results landed
FLOW_PAUSE_LIMIT_S = 60.0  # longest results may stop landing, outside the restarts, while requests are outstanding
STALLED = "agents stalled"


@dataclass
class Watch:
    """Polls /healthz of the workers that should be running, and counts the results landed, on a thread."""

    harness: object
    poll_s: float = POLL_S
    ports: dict[str, int] = field(default_factory=dict)  # worker -> ops port, while it should be running
    serving: set[str] = field(default_factory=set)  # workers that answered once (before: still importing)
    polls: int = 0
    failures: list[tuple[float, str, str]] = field(default_factory=list)  # (when, worker, answer)
    landed: list[tuple[float, int, int]] = field(default_factory=list)  # (when, results landed, published)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, name: str, port: int) -> None:
        with self._lock:
            self.ports[name] = port

    def unwatch(self, name: str) -> None:
        """Before a worker is stopped: a stopping worker's answers are not its liveness."""
        with self._lock:
            self.ports.pop(name, None)

    def start(self) -> Watch:
        self._thread = threading.Thread(target=self._run, name="healthz-watch", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                watched = dict(self.ports)
            for name, port in watched.items():
                status, body = healthz(port)
                with self._lock:
                    if name not in self.ports:  # unwatched meanwhile: stopping
                        continue
                    self.polls += 1
                    if status == 200:
                        self.serving.add(name)
                    elif name in self.serving:  # refused or 503 from a worker that was serving
                        self.failures.append((time.time(), name, f"{status} {body}".strip()))
            with contextlib.suppress(Exception):  # ClickHouse is up throughout; a slow answer skips a sample
                self.landed.append((time.time(), results_landed(self.harness), len(self.harness.published)))


def healthz(port: int, path: str = "/healthz") -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as answer:
            return answer.status, answer.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace").strip()
    except OSError as e:
        return None, repr(e)


def results_landed(harness) -> int:
    client = harness.warehouse()
    try:
        return client.execute("SELECT uniqExact(request_id) FROM results_dedup")[0][0]
    finally:
        client.close()


def wait_until(check, timeout_s: float, what: str, harness) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}\n{harness.logs()}"
        time.sleep(0.5)


def start_watched(harness, watch: Watch, name: str, **overrides):
    port = free_port()
    worker = harness.start_worker(name, STAGES, metrics_port=port, **overrides)
    worker.ops_port = port  # type: ignore[attr-defined]
    watch.watch(name, port)
    return worker


def wait_ready(harness, worker, timeout_s: float = 240) -> None:
    """Until the worker's /readyz answers 200: models warm, partitions assigned."""
    wait_until(lambda: healthz(worker.ops_port, "/readyz")[0] == 200, timeout_s, "worker ready", harness)


def stalled_warnings(harness) -> list[tuple[float, str]]:
    """Every "agents stalled" line in the workers' logs: (when, worker log). Lines are JSON until Faust's worker
    starts, then Faust's "[local time,ms] [pid] [LEVEL] message"."""
    found = []
    for worker in harness.workers:
        for line in worker.log_path.read_text(errors="replace").splitlines():
            if STALLED not in line:
                continue
            stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", line)
            if stamp:
                when = datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            else:
                entry = json.loads(line)
                when = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()
            found.append((when, worker.log_path.name))
    return found


def lag_by_partition(harness) -> dict[tuple[str, int], int]:
    """The worker group's lag in messages on every partition of the topics its agents read."""
    topics = harness.settings.topics
    group = group_id(harness.settings, STAGES)
    monitor = LagMonitor(
        harness.settings.kafka, {group: [topics.requests, topics.generate, topics.generate_long]}, topics=topics
    )
    try:
        return {(lag.topic, lag.partition): lag.messages for lag in monitor.measure()}
    finally:
        monitor.close()


def recover(harness, cleared: float, fault: str) -> float:
    """``Harness.recovery_after``; on a timeout, says where the requests without a result in ClickHouse are: with a
    result on the results topic or not, and the worker group's lag by partition."""
    try:
        return harness.recovery_after(cleared, timeout_s=300)
    except AssertionError as e:
        before = [rid for rid, at in harness.published.items() if at <= cleared]
        ids = ",".join(f"'{r}'" for r in before)
        client = harness.warehouse()
        try:
            query = f"SELECT request_id FROM results_dedup WHERE request_id IN ({ids})"
            landed = {row[0] for row in client.execute(query)}
        finally:
            client.close()
        missing = [rid for rid in before if rid not in landed]
        topics = harness.settings.topics
        on_kafka = collect(harness.settings.kafka, topics.results, ImageResult, missing, timeout_s=15)
        lags = {f"{t}[{p}]": n for (t, p), n in lag_by_partition(harness).items() if n}
        raise AssertionError(
            f"after {fault}: no result in ClickHouse for {missing}; on the results topic: "
            f"{sorted(on_kafka.latest())}; worker group lag: {lags}\n{e}"
        ) from None


def longest_flow_pause(samples: list[tuple[float, int, int]], excused) -> float:
    """The longest time results did not grow while some published request had none, outside excused windows."""
    longest, since = 0.0, None
    for (t0, landed0, _), (t1, landed1, published1) in itertools.pairwise(samples):
        if landed1 > landed0 or landed1 >= published1 or excused(t1):
            since = None
            continue
        since = t0 if since is None else since
        longest = max(longest, t1 - since)
    return longest


@pytest.mark.timeout(int(SOAK_S) + 1200)
def test_soak_with_restarts_rebalance_and_a_broker_restart(harness):
    began = time.time()
    watch = Watch(harness)
    windows: list[tuple[str, float, float]] = []  # excused: (fault, from, until its recovery)
    recoveries: dict[str, float] = {}
    harness.start_sink()
    counter = {"n": 0}

    def next_name() -> str:
        counter["n"] += 1
        return f"soak-{counter['n']}"

    worker = start_watched(harness, watch, next_name())
    warm = harness.requests(2, "soak-warm")
    harness.publish_now(warm)
    harness.wait_results_in_clickhouse([r.request_id for r in warm], timeout_s=240)
    watch.start()
    stream = harness.requests(int(SOAK_S * RATE_PER_S), "soak")
    ids = [r.request_id for r in warm + stream]
    harness.stream(stream, RATE_PER_S)
    t0 = time.time()

    def at(share: float) -> None:
        time.sleep(max(0.0, t0 + share * SOAK_S - time.time()))

    def restart(fault: str, stop) -> None:
        nonlocal worker
        at_s = time.time()
        watch.unwatch(worker_name(worker))
        stop(worker)
        worker = start_watched(harness, watch, next_name())
        cleared = time.time()
        recoveries[fault] = recover(harness, cleared, fault)
        windows.append((fault, at_s, time.time() + 5))

    def worker_name(w) -> str:
        return w.log_path.stem

    at(0.12)
    restart("worker SIGTERM", lambda w: w.stop(timeout_s=60))
    at(0.32)
    restart("worker SIGKILL", lambda w: w.kill())

    at(0.48)  # a second worker joins: the partitions are shared out, then handed back when it leaves
    joined = start_watched(harness, watch, next_name())
    wait_ready(harness, joined)
    cleared = time.time()
    recoveries["second worker joins"] = recover(harness, cleared, "second worker joins")
    at(0.64)
    watch.unwatch(worker_name(joined))
    assert joined.stop(timeout_s=60) == 0, joined.log_tail()
    cleared = time.time()
    recoveries["second worker leaves"] = recover(harness, cleared, "second worker leaves")

    at(0.8)
    kafka = harness.stack.services[0]
    at_s = time.time()
    kafka.stop()
    time.sleep(5)
    kafka.start()
    cleared = time.time()
    recoveries["broker restart"] = recover(harness, cleared, "broker restart")
    windows.append(("broker restart", at_s, time.time() + 5))

    harness.join_stream(timeout_s=SOAK_S + 300)
    soak_s = time.time() - t0
    row = harness.verify(
        f"soak {soak_s:.0f} s: 2 worker restarts, rebalance, broker restart", ids, max(recoveries.values())
    )
    watch.close()

    # No partition left behind: the group's lag drains to 0 on every partition it reads.
    lags: dict[tuple[str, int], int] = {}
    topics = harness.settings.topics
    expected = sum(
        partition_count(harness.settings.kafka, t) for t in (topics.requests, topics.generate, topics.generate_long)
    )

    def drained() -> bool:
        nonlocal lags
        with contextlib.suppress(Exception):
            lags = lag_by_partition(harness)
        return len(lags) == expected and not any(lags.values())

    wait_until(drained, 60, f"the worker group's lag back to 0 on every partition: {lags}", harness)

    def excused(when: float) -> str | None:
        return next((fault for fault, start, end in windows if start <= when <= end), None)

    failures = [(round(t - began, 1), name, answer, excused(t)) for t, name, answer in watch.failures]
    unexcused = [f for f in failures if f[3] is None]
    stalls = [(round(t - began, 1), log, excused(t)) for t, log in stalled_warnings(harness)]
    unexcused_stalls = [s for s in stalls if s[2] is None]
    pause_s = longest_flow_pause(watch.landed, excused)
    figures = {
        "soak_s": round(soak_s),
        "requests": len(ids),
        "worker_restarts": 2,
        "rebalances": 2,
        "broker_restarts": 1,
        "recovery_s": {fault: round(s, 1) for fault, s in recoveries.items()},
        "max_recovery_s": round(max(recoveries.values()), 1),
        "healthz_polls": watch.polls,
        "healthz_failures": len(failures),
        "healthz_failures_outside_restarts": len(unexcused),
        "stalled_warnings": len(stalls),
        "longest_flow_pause_s": round(pause_s, 1),
        "final_lag": sum(lags.values()),
    }
    print(f"\nsoak figures: {figures}")
    if failures:
        print(f"healthz failures (s from start, worker, answer, during): {failures}")
    if stalls:
        print(f"'{STALLED}' warnings (s from start, log, during): {stalls}")
    assert row["outcomes"] == ["SUCCEEDED:"]
    assert not unexcused, f"/healthz failed outside the restarts: {unexcused}\n{harness.logs()}"
    assert not unexcused_stalls, f"agents stalled outside the restarts: {unexcused_stalls}\n{harness.logs()}"
    assert pause_s < FLOW_PAUSE_LIMIT_S, f"results stopped landing for {pause_s:.0f} s\n{harness.logs()}"


STALL_BOUND_S = 5.0  # the stall check's PIXELPIPE_LIVENESS_BOUND_S
