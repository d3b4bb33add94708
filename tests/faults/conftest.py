"""Fault injection on a stack of the suite's own: real Kafka, ClickHouse and S3 processes it may stop and restart.

The shared ``servers`` fixture is not used: CI points it at a stack other tests share, and these tests take
services down. One ``LocalStack`` on free ports in a temporary directory serves the whole fault session; each test
gets its own topics, consumer groups, object prefix and ClickHouse database on it.

``Harness`` is one test's pipeline: workers (``WorkerProcess``), the ClickHouse sink as a subprocess, a steady
stream of small generate requests, and the checks every fault ends with: N requests in, N terminal results out,
no duplicate events in the deduplicated ClickHouse views, and every image a result names in object storage.
Each test records a row; the session prints the reliability table at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pixelpipe.core.clickhouse import ServerClient, create_database, drop_database
from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageRequest, ImageResult
from pixelpipe.core.objects import open_object_store
from pixelpipe.core.pools import apply_pools, parse_pools
from pixelpipe.core.settings import Settings, section_from_env
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.sinks.clickhouse.migrate import migrate
from pixelpipe.tools.model_builders import build_tiny_models
from pixelpipe.tools.processes import WorkerProcess
from pixelpipe.tools.stack import LocalStack, StackSettings
from tests.conftest import free_kafka_port, free_port, with_own_topics

STAGES = ("moderation", "generate")
ROWS: list[dict] = []  # one per fault, for the reliability table


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not ROWS:
        return
    head = ("fault", "requests in", "results out", "succeeded", "duplicates", "images missing", "recovery s")
    lines = [
        [r["fault"], r["in"], r["out"], r["succeeded"], r["duplicates"], r["missing"], r["recovery"]] for r in ROWS
    ]
    cells = [head, *[[str(c) for c in line] for line in lines]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    terminalreporter.write_sep("=", "pixelpipe reliability")
    for n, row in enumerate(cells):
        terminalreporter.write_line("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            terminalreporter.write_line("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    terminalreporter.write_line(
        "duplicates: events beyond one per event_id in results_dedup and stage_metrics_dedup; recovery: seconds from"
        " the fault's end until every request published before it has its result in ClickHouse"
    )


@pytest.fixture(scope="session")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    # The defaults, on ports and in a directory of the suite's own; only the cache of downloaded servers is shared.
    kafka_port = free_kafka_port()
    stack = LocalStack(
        StackSettings(
            dir=str(tmp_path_factory.mktemp("fault-stack")),
            kafka_port=kafka_port,
            clickhouse_port=free_port(),
            clickhouse_http_port=free_port(),
            s3_port=free_port(),
            prometheus_port=free_port(),
            lag_exporter_port=free_port(),
            gateway_port=0,  # the tests start gateways of their own
            cache_dir=section_from_env(StackSettings, os.environ).cache_dir,
        )
    )
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def harness(fault_stack: LocalStack, tiny_registry: Path, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(fault_stack, tiny_registry, tmp_path)
    try:
        yield h
    finally:
        h.close()


@dataclass(frozen=True)
class Rendering:
    """Where one request went: its model, when moderation forwarded it, and the worker and pool that rendered it."""

    model: str
    moderated_at: float  # seconds since the epoch, of its MODERATION metric
    worker_id: str
    pool: str


class Harness:
    """One test's pipeline on the fault stack."""

    def __init__(self, stack: LocalStack, registry: Path, tmp_path: Path) -> None:
        self.stack = stack
        self.tmp_path = tmp_path
        suffix = uuid.uuid4().hex[:8]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELPIPE_")} | stack.client_env()
        servers = Settings.from_env(env)
        self.database = f"faults_{suffix}"
        self.admin_url = servers.clickhouse.url
        url = create_database(self.admin_url, self.database)
        self.settings = with_own_topics(servers, suffix).updated(
            clickhouse_url=url,
            model_registry=str(registry),
            consumer_group=f"faults-{suffix}",
            object_store_url=f"{servers.objects.url.rstrip('/')}/{suffix}",
            topic_partitions=4,
            max_batch=4,
            take_events=4,
            max_wait_ms=100,
            log_level="INFO",
        )
        self.sink_group = f"faults-sink-{suffix}"
        ensure_topics(self.settings.kafka, self.settings.topics)
        migrate(url)
        self.workers: list[WorkerProcess] = []
        self.sinks: list[subprocess.Popen[bytes]] = []
        self.published: dict[str, float] = {}  # request id -> when its delivery was acknowledged
        self._stream: threading.Thread | None = None
        self._stream_error: BaseException | None = None

    # -- processes -------------------------------------------------------------------------------------------
    def start_worker(self, name: str, stages: tuple[str, ...] = STAGES, **overrides: object) -> WorkerProcess:
        settings = self.settings.updated(worker_id=name, **overrides)
        worker = WorkerProcess(settings, stages, self.tmp_path / f"{name}.log")
        self.workers.append(worker)
        return worker

    def start_sink(self) -> subprocess.Popen[bytes]:
        settings = self.settings.updated(
            sink_group_id=self.sink_group, sink_max_batch_rows=200, sink_max_batch_wait_ms=300
        )
        env = os.environ | settings.to_env()
        command = [sys.executable, "-m", "pixelpipe", "clickhouse", "sink"]
        log = open(self.tmp_path / f"sink-{len(self.sinks)}.log", "ab")  # noqa: SIM115 - the child keeps it
        sink = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.sinks.append(sink)
        return sink

    def logs(self) -> str:
        parts = [f"--- {w.log_path.name}\n{w.log_tail(25)}" for w in self.workers]
        for path in sorted(self.tmp_path.glob("sink-*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def close(self) -> None:
        self.join_stream(timeout_s=5)
        for worker in self.workers:
            worker.kill()
        for sink in self.sinks:
            if sink.poll() is None:
                sink.kill()
                sink.wait()
        # A test that failed with ClickHouse down leaves its database behind, in the stack's temporary directory.
        with contextlib.suppress(Exception):
            drop_database(self.admin_url, self.database)

    def apply_pools(self, models_of: dict[str, list[str]]) -> None:
        """Make these pools (name -> models) the pools in force, as ``pixelpipe pools apply`` does."""
        pools = parse_pools({"pools": [{"name": name, "models": models} for name, models in models_of.items()]})
        apply_pools(self.settings.kafka, self.settings.topics, codec_from_settings(self.settings.kafka), pools)

    # -- the steady stream -----------------------------------------------------------------------------------
    def requests(self, count: int, tag: str, models: Sequence[str] = ("tiny-sd",)) -> list[ImageRequest]:
        """``count`` small generate requests, taking ``models`` in turn."""
        return [
            new_request(
                prompt=f"{tag} lighthouse {i}",
                model=models[i % len(models)],
                user_id=f"user-{i % 5}",
                width=64,
                height=64,
                steps=2,
                seed=i,
            )
            for i in range(count)
        ]

    def publish_raw(self, topic: str, key: str, value: bytes) -> None:
        """Bytes straight onto ``topic``, as a producer without the SDK could send them."""
        with Publisher(self.settings) as publisher:
            publisher.publish_encoded(key.encode(), value, topic).result(timeout=120)

    def publish_now(self, requests: list[ImageRequest]) -> None:
        with Publisher(self.settings) as publisher:
            pending = [(r.request_id, publisher.publish(r)) for r in requests]
            for request_id, p in pending:
                p.result(timeout=120)
                self.published[request_id] = time.time()

    def stream(self, requests: list[ImageRequest], per_s: float) -> None:
        """Publish ``requests`` at ``per_s`` in a background thread (they are buffered while the broker is down)."""

        def run() -> None:
            try:
                with Publisher(self.settings) as publisher:
                    pending = []
                    for request in requests:
                        pending.append((request.request_id, publisher.publish(request)))
                        time.sleep(1 / per_s)
                        self._settle(pending)
                    for request_id, p in pending:
                        p.result(timeout=180)
                        self.published.setdefault(request_id, time.time())
            except BaseException as e:  # reported by join_stream
                self._stream_error = e

        self._stream = threading.Thread(target=run, name="stream", daemon=True)
        self._stream.start()

    def _settle(self, pending: list) -> None:
        for request_id, p in pending:
            if request_id not in self.published and p.done():
                p.result(timeout=0)
                self.published[request_id] = time.time()

    def join_stream(self, timeout_s: float = 240) -> None:
        if self._stream is not None:
            self._stream.join(timeout_s)
            assert not self._stream.is_alive(), "the request stream did not finish"
            self._stream = None
        if self._stream_error is not None:
            error, self._stream_error = self._stream_error, None
            raise error

    # -- observations ----------------------------------------------------------------------------------------
    def warehouse(self) -> ServerClient:
        return ServerClient(self.settings.clickhouse.url)

    def landed(self, request_ids: list[str]) -> int:
        """How many of these requests have their result in ClickHouse (0 while ClickHouse does not answer)."""
        if not request_ids:
            return 0
        ids = ",".join(f"'{r}'" for r in request_ids)
        try:
            client = self.warehouse()
            try:
                return client.execute(f"SELECT uniqExact(request_id) FROM results_dedup WHERE request_id IN ({ids})")[
                    0
                ][0]
            finally:
                client.close()
        except Exception:
            return 0

    def wait_results_in_clickhouse(self, request_ids: list[str], timeout_s: float) -> float:
        """Seconds until every one of ``request_ids`` has its result row; fails with the logs on timeout."""
        started = time.monotonic()
        while self.landed(request_ids) < len(request_ids):
            if time.monotonic() - started > timeout_s:
                stacks = "\n".join(f"--- stacks of {w.log_path.name}\n{w.stacks()}" for w in self.workers)
                missing = len(request_ids) - self.landed(request_ids)
                raise AssertionError(
                    f"{missing} of {len(request_ids)} results not in ClickHouse after {timeout_s:.0f}s\n{self.logs()}"
                    f"\n{stacks}"
                )
            time.sleep(0.5)
        return time.monotonic() - started

    def wait_for_some_results(self, count: int, timeout_s: float = 180) -> None:
        """Until ``count`` results of published requests are in ClickHouse: the pipeline is flowing."""
        deadline = time.monotonic() + timeout_s
        while self.landed(list(self.published)) < count:
            assert time.monotonic() < deadline, f"fewer than {count} results after {timeout_s:.0f}s\n{self.logs()}"
            time.sleep(0.5)

    def renderings(self, request_ids: list[str], timeout_s: float = 60) -> dict[str, Rendering]:
        """Where each request went, from its MODERATION and GENERATE metrics in ClickHouse (waited for)."""
        ids = ",".join(f"'{r}'" for r in request_ids)
        query = (
            "SELECT request_id, stage, model, worker_id, ifNull(pool, ''), event_time_ms FROM stage_metrics_dedup"
            f" WHERE request_id IN ({ids}) AND stage IN ('MODERATION', 'GENERATE')"
        )
        deadline = time.monotonic() + timeout_s
        while True:
            client = self.warehouse()
            try:
                rows = client.execute(query)
            finally:
                client.close()
            stages: dict[str, dict[str, tuple]] = {}
            for request_id, stage, *metric in rows:
                stages.setdefault(request_id, {})[stage] = tuple(metric)
            if all(len(stages.get(r, {})) == 2 for r in request_ids):
                break
            lacking = [r for r in request_ids if len(stages.get(r, {})) < 2]
            assert time.monotonic() < deadline, f"{len(lacking)} requests lack their metrics\n{self.logs()}"
            time.sleep(0.5)
        renderings = {}
        for request_id, metrics in stages.items():
            model, worker_id, pool, _ = metrics["GENERATE"]
            renderings[request_id] = Rendering(model, metrics["MODERATION"][3] / 1000, worker_id, pool)
        return renderings

    def recovery_after(self, cleared_at: float, timeout_s: float = 240) -> float:
        """Seconds from ``cleared_at`` until every request published before it has its result in ClickHouse."""
        before = [rid for rid, at in self.published.items() if at <= cleared_at]
        self.wait_results_in_clickhouse(before, timeout_s)
        return time.time() - cleared_at

    def verify(self, fault: str, request_ids: list[str], recovery_s: float, timeout_s: float = 240) -> dict:
        """The invariants every fault must keep; records the table row, then asserts."""
        self.join_stream()
        assert set(request_ids) <= set(self.published), "not every request was acknowledged by the broker"
        results = collect(
            self.settings.kafka, self.settings.topics.results, ImageResult, request_ids, timeout_s=timeout_s
        )
        terminal = {
            rid for rid, events in results.events.items() if events[-1].status in ("SUCCEEDED", "REJECTED", "FAILED")
        }
        succeeded = sum(1 for r in results.latest().values() if r.status == "SUCCEEDED")
        outcomes = sorted({f"{r.status}:{r.error_code or ''}" for r in results.latest().values()})
        self.wait_results_in_clickhouse(request_ids, timeout_s=120)
        time.sleep(1.5)  # the sink's last metric batches
        ids = ",".join(f"'{r}'" for r in request_ids)
        client = self.warehouse()
        try:
            ((raw_results, dedup_results, result_ids, result_requests),) = client.execute(
                f"SELECT (SELECT count() FROM results WHERE request_id IN ({ids})),"
                f" count(), uniqExact(event_id), uniqExact(request_id) FROM results_dedup WHERE request_id IN ({ids})"
            )
            ((raw_metrics, dedup_metrics, metric_ids),) = client.execute(
                f"SELECT (SELECT count() FROM stage_metrics WHERE request_id IN ({ids})),"
                f" count(), uniqExact(event_id) FROM stage_metrics_dedup WHERE request_id IN ({ids})"
            )
        finally:
            client.close()
        duplicates = (dedup_results - result_ids) + (dedup_metrics - metric_ids)
        store = open_object_store(self.settings.objects)
        missing: list[str] = []
        for events in results.events.values():
            for event in events:
                for image in event.images:
                    try:
                        data = store.get(image.uri)
                    except Exception:
                        missing.append(image.uri)
                        continue
                    if hashlib.sha256(data).hexdigest() != image.sha256:
                        missing.append(image.uri)
        row = {
            "fault": fault,
            "in": len(request_ids),
            "out": len(terminal),
            "succeeded": succeeded,
            "duplicates": duplicates,
            "missing": len(missing),
            "recovery": f"{recovery_s:.1f}",
            "redelivered": (raw_results - result_ids) + (raw_metrics - metric_ids),
            "outcomes": outcomes,
            "status_of": {rid: r.status for rid, r in results.latest().items()},
        }
        ROWS.append(row)
        shown = {k: v for k, v in row.items() if k != "status_of"}
        print(f"\n{fault}: {shown} ClickHouse results {result_requests}, metrics {metric_ids}")
        assert not results.missing, f"{len(results.missing)} requests without a result\n{self.logs()}"
        assert len(terminal) == len(request_ids)
        assert result_requests == len(request_ids) and dedup_results == len(request_ids)
        assert duplicates == 0
        assert dedup_metrics >= 2 * succeeded  # MODERATION, GENERATE (and OUTPUT_MODERATION) per request
        assert all(len({e.event_id for e in events}) == 1 for events in results.events.values())
        assert not missing, missing[:5]
        assert all(sink.poll() is None for sink in self.sinks), f"the sink exited\n{self.logs()}"
        return row
