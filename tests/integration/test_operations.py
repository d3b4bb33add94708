"""Operations end to end: a worker, the sink and the lag exporter serve metrics that a real Prometheus (Debian's,
started here with a 1 s scrape and evaluation interval) scrapes; the counts it holds after a run match what was
sent, the lag alert fires while the worker is stopped and requests keep arriving and resolves when it is back,
`pixelpipe top` renders a frame from it, and every PromQL expression of the Grafana operations dashboard returns
data."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from pixelpipe.core.clickhouse import ServerClient, create_database, drop_database
from pixelpipe.core.events import ImageResult
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.sinks.clickhouse.migrate import apply_migrations
from pixelpipe.tools.processes import PixelpipeProcess, WorkerProcess
from pixelpipe.tools.stack import StackSettings
from pixelpipe.tools.stack.services import ALERT_RULES, Prometheus
from tests.conftest import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "analytics" / "grafana" / "dashboards" / "pixelpipe-operations.json"
STAGES = ("moderation", "generate")
GOOD, REJECTED, UNDECODABLE, CANCELLED = 8, 2, 3, 1


def fast_rules(path: Path) -> Path:
    """The shipped rules with every `for:` at 10 s and every 5-minute window at 20 s, for a test of minutes."""
    text = re.sub(r"for: \d+m", "for: 10s", ALERT_RULES.read_text()).replace("[5m]", "[20s]")
    path.write_text(text)
    return path


def prom(url: str, expr: str) -> list[dict]:
    address = f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(address, timeout=10) as answer:
        body = json.load(answer)
    assert body["status"] == "success", body
    return body["data"]["result"]


def value(url: str, expr: str) -> float | None:
    result = prom(url, expr)
    return float(result[0]["value"][1]) if result else None


def wait_until(check, timeout_s: float, what: str, interval_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not after {timeout_s:.0f} s (last: {last})")


def alert_state(url: str, name: str, **labels: str) -> str:
    """The state of alert ``name`` for the series with ``labels``: firing, pending or inactive."""
    with urllib.request.urlopen(f"{url}/api/v1/alerts", timeout=10) as answer:
        alerts = json.load(answer)["data"]["alerts"]
    states = {
        a["state"]
        for a in alerts
        if a["labels"].get("alertname") == name and all(a["labels"].get(k) == v for k, v in labels.items())
    }
    return "firing" if "firing" in states else ("pending" if "pending" in states else "inactive")


@dataclasses.dataclass
class Ops:
    settings: object
    prometheus: str
    prefix: str
    worker: WorkerProcess
    worker_port: int
    tmp: Path
    requests_sent: list[str] = dataclasses.field(default_factory=list)

    def start_worker(self) -> WorkerProcess:
        env = {"PIXELPIPE_METRICS_PORT": str(self.worker_port), "PIXELPIPE_METRICS_HOST": "127.0.0.1"}
        self.worker = WorkerProcess(self.settings, STAGES, self.tmp / "worker.log", env)
        return self.worker


@pytest.fixture(scope="module")
def ops(servers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ops")
    prefix = f"ops-{uuid.uuid4().hex[:8]}"
    registry = tmp / "registry.json"
    registry.write_text(json.dumps({"null": {"kind": "null", "seconds_per_image": 0.01}}))
    suffix = uuid.uuid4().hex[:8]
    topics = servers.topics
    renamed = {n: f"{getattr(topics, n)}.{suffix}" for n in ("requests", "generate", "edit", "results", "metrics")}
    renamed["dead_letter"] = f"{topics.dead_letter}.{suffix}"
    renamed["cancellations"] = f"{topics.cancellations}.{suffix}"
    database_url = create_database(servers.clickhouse.url, f"ops_{suffix}")
    settings = dataclasses.replace(servers, topics=dataclasses.replace(topics, **renamed)).updated(
        model_registry=str(registry),
        consumer_group=prefix,
        sink_group_id=f"{prefix}-sink",
        clickhouse_url=database_url,
        object_store_url=f"file://{tmp / 'objects'}",
        image_detector="null",
        topic_partitions=4,
        max_wait_ms=20,
        lag_interval_s=1.0,
        sink_max_batch_wait_ms=200,
    )
    ensure_topics(settings.kafka, settings.topics)
    client = ServerClient(database_url)
    apply_migrations(client)
    client.close()

    ports = {"worker": free_port(), "sink": free_port(), "lag": free_port()}
    stack = dataclasses.replace(
        StackSettings(),
        dir=str(tmp / "stack"),
        prometheus_port=free_port(),
        prometheus_interval_s=1.0,
        scrape_ports="",
        lag_exporter_port=ports["lag"],  # the stack's own target list: only the exporter started below
    )
    prometheus = Prometheus(stack, rules=[fast_rules(tmp / "alerts.yml")])
    prometheus.add_targets("ops", [f"127.0.0.1:{ports['worker']}", f"127.0.0.1:{ports['sink']}"])
    prometheus.start()
    metrics_env = {"PIXELPIPE_METRICS_HOST": "127.0.0.1"}
    sink = PixelpipeProcess(
        settings, ["clickhouse", "sink"], tmp / "sink.log", metrics_env | {"PIXELPIPE_METRICS_PORT": str(ports["sink"])}
    )
    exporter = PixelpipeProcess(
        settings,
        ["lag-exporter", "--group-prefix", prefix],
        tmp / "lag.log",
        metrics_env | {"PIXELPIPE_METRICS_PORT": str(ports["lag"])},
    )
    state = Ops(settings, prometheus.endpoint, prefix, None, ports["worker"], tmp)  # type: ignore[arg-type]
    state.start_worker()
    try:
        wait_until(lambda: _ready(ports["worker"]), 240, f"worker ready:\n{state.worker.log_tail()}")
        yield state
    finally:
        state.worker.stop()
        sink.stop()
        exporter.stop()
        prometheus.stop()
        drop_database(servers.clickhouse.url, f"ops_{suffix}")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _health(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def test_prometheus_holds_what_was_sent(ops):
    settings, url = ops.settings, ops.prometheus
    assert _health(ops.worker_port, "/healthz") == 200
    assert _health(ops.worker_port, "/readyz") == 200
    requests = [
        new_request(prompt=f"a lighthouse {i}", model="null", user_id=f"user-{i}", width=32, height=32)
        for i in range(GOOD)
    ]
    requests += [
        new_request(prompt=prompt, model="null", user_id="user-r", width=32, height=32)
        for prompt in ("a gory massacre", "how to make fentanyl")
    ]
    cancelled = [new_request(prompt="a cancelled lighthouse", model="null", user_id="user-c", width=32, height=32)]
    with Publisher(settings) as publisher:
        for request in cancelled:
            publisher.publish_cancellation(request.request_id).result(timeout=30)
        time.sleep(2)  # the worker's global table has read them by now
        requests += cancelled
        for pending in [publisher.publish(r) for r in requests]:
            pending.result(timeout=30)
    producer = Producer(settings.kafka.client_config())
    garbage_ids = [f"garbage-{uuid.uuid4().hex[:8]}" for _ in range(UNDECODABLE)]
    for request_id in garbage_ids:
        producer.produce(settings.topics.requests, b"\x00not avro at all", request_id.encode())
    assert producer.flush(30) == 0
    ids = [r.request_id for r in requests] + garbage_ids
    collected = collect(settings.kafka, settings.topics.results, ImageResult, ids, timeout_s=180)
    assert not collected.missing, collected.missing
    ops.requests_sent.extend(ids)

    group = f"{ops.prefix}-moderation-generate"
    lag = f'max by (group, topic, partition) (pixelpipe_consumer_lag_messages{{group="{group}"}})'

    def lag_back_to_zero():
        series = prom(url, lag)
        topics = {s["metric"]["topic"] for s in series}
        return (
            len(series) == 8  # 4 partitions of requests and of generate
            and topics == {settings.topics.requests, settings.topics.generate}
            and all(float(s["value"][1]) == 0 for s in series)
        )

    wait_until(lag_back_to_zero, 60, "worker group's lag back to 0 on every partition")
    sink_lag = f'max(pixelpipe_consumer_lag_messages{{group="{settings.sink.group_id}"}})'
    wait_until(lambda: value(url, sink_lag) == 0, 60, "sink group's lag back to 0")

    def counts():
        return {
            "moderation_queue": value(url, 'sum(pixelpipe_stage_queue_seconds_count{stage="moderation"})'),
            "moderation_compute": value(url, 'sum(pixelpipe_stage_compute_seconds_count{stage="moderation"})'),
            "generate_queue": value(url, 'sum(pixelpipe_stage_queue_seconds_count{stage="generate"})'),
            "generate_batches": value(url, 'sum(pixelpipe_stage_batch_size_count{stage="generate"})'),
            "output_moderation": value(url, 'sum(pixelpipe_stage_compute_seconds_count{stage="output_moderation"})'),
            "dead_undecodable": value(url, 'sum(pixelpipe_dead_letters_total{reason="undecodable"})'),
            "dead_all": value(url, "sum(pixelpipe_dead_letters_total)"),
            "rejections": value(url, "sum(pixelpipe_moderation_rejections_total) > 0"),
            "results": value(url, "sum(pixelpipe_results_total)"),
            "cancelled": value(url, 'sum(pixelpipe_stage_events_out_total{outcome="CANCELLED"})'),
            "sink_rows": value(url, 'sum(pixelpipe_sink_rows_total{table="results"})'),
        }

    expected = {
        "moderation_queue": GOOD + REJECTED + CANCELLED,
        "moderation_compute": GOOD + REJECTED + CANCELLED,
        "generate_queue": GOOD + CANCELLED,  # a cancelled request ends at the render stage, before the model
        "generate_batches": GOOD + CANCELLED,
        "output_moderation": GOOD,
        "dead_undecodable": UNDECODABLE,
        "dead_all": UNDECODABLE,
        "results": GOOD + REJECTED + UNDECODABLE + CANCELLED,
        "cancelled": CANCELLED,
        "sink_rows": GOOD + REJECTED + UNDECODABLE + CANCELLED,
    }
    wait_until(lambda: {k: counts()[k] for k in expected} == expected, 60, "counts in Prometheus")
    assert counts()["rejections"] >= REJECTED
    # Each batch-size observation is a request's batch: none larger than the take, none below 1.
    assert value(url, 'sum(pixelpipe_stage_batch_size_bucket{stage="generate", le="0.0"})') in (None, 0.0)
    assert value(url, 'sum(pixelpipe_stage_batch_size_bucket{stage="generate", le="+Inf"})') == GOOD + CANCELLED
    # No id ever became a label.
    names = prom(url, '{__name__=~"pixelpipe_.*"}')
    labels = {key for series in names for key in series["metric"]}
    assert not labels & {"request_id", "event_id", "user_id"}


def wait_for_rates(ops) -> None:
    """A rate over [1m] needs two scrapes of a series, and the first test can end within a scrape or two of the
    counters' first appearance."""
    stages = "sum by (stage) (rate(pixelpipe_stage_events_in_total[1m]))"
    sink = "sum by (table) (rate(pixelpipe_sink_rows_total[1m]))"
    wait_until(
        lambda: len(prom(ops.prometheus, stages)) >= 2 and prom(ops.prometheus, sink), 30, "stage and sink rates"
    )


def top_frame(ops, width: int = 110) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pixelpipe", "top", "--once", "--width", str(width), "--prometheus", ops.prometheus],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_pixelpipe_top_renders_a_frame(ops):
    wait_for_rates(ops)
    frame = top_frame(ops)
    (ops.tmp / "top.txt").write_text(frame)
    assert "consumer lag" in frame and "stages" in frame
    assert f"{ops.prefix}-moderation-generate" in frame
    for stage in ("moderation", "generate", "output_moderation"):
        assert re.search(rf"\b{stage}\b", frame), frame
    assert "targets up 3/3" in frame, frame


def test_grafana_operations_dashboard_queries_return_data(ops):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"].replace("$__rate_interval", "1m").replace("$__range", "5m")
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    assert len(exprs) >= 8
    # GPU panels have data only where a worker sees a GPU; every other expression must return data here.
    exprs = [expr for expr in exprs if "pixelpipe_gpu_" not in expr]
    wait_for_rates(ops)
    empty = [expr for expr in exprs if not prom(ops.prometheus, expr)]
    assert not empty, f"expressions without data: {empty}"


def test_lag_alert_fires_while_the_worker_is_stopped_and_resolves_when_it_is_back(ops):
    settings, url = ops.settings, ops.prometheus
    alert = {"group": f"{ops.prefix}-moderation-generate", "topic": settings.topics.requests}

    def state() -> str:
        return alert_state(url, "PixelpipeConsumerLagGrowing", **alert)

    # The first test's burst may still be inside the alert's 20 s window.
    wait_until(lambda: state() == "inactive", 60, "no lag alert before the worker stops")
    assert ops.worker.stop() == 0
    stop = threading.Event()

    def keep_publishing():
        with Publisher(settings) as publisher:
            i = 0
            while not stop.is_set():
                request = new_request(prompt=f"a fox {i}", model="null", user_id=f"late-{i}", width=32, height=32)
                publisher.publish(request).result(timeout=30)
                i += 1
                time.sleep(0.25)

    publishing = threading.Thread(target=keep_publishing, daemon=True)
    publishing.start()
    try:
        started = time.monotonic()
        wait_until(lambda: state() == "firing", 120, "lag alert firing")
        fired_after_s = time.monotonic() - started
        ops.start_worker()
        wait_until(lambda: _ready(ops.worker_port), 240, f"worker back:\n{ops.worker.log_tail()}")
        time.sleep(3)  # a few scrapes of the worker catching up, for the docs' `pixelpipe top` frame
        (ops.tmp / "top-catching-up.txt").write_text(top_frame(ops))
    finally:
        stop.set()
        publishing.join(60)
    group = f"{ops.prefix}-moderation-generate"
    lag = f'sum(max by (topic, partition) (pixelpipe_consumer_lag_messages{{group="{group}"}}))'
    wait_until(lambda: value(url, lag) == 0, 120, "lag back to 0 after the restart")
    wait_until(lambda: state() == "inactive", 120, "lag alert resolved")
    print(f"lag alert fired {fired_after_s:.0f} s after the worker stopped")
