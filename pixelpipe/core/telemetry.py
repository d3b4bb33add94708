"""Operations for every long-running process: one small HTTP server with Prometheus' ``/metrics``, ``/healthz`` and
``/readyz``, and consumer lag measured in a background thread.

- ``/healthz`` (liveness) fails when the process's loop (the worker's event loop, the sink's poll loop) has not
  stamped its heartbeat for ``PIXELPIPE_LIVENESS_BOUND_S``: a blocked loop stops Kafka heartbeats and polls.
- ``/readyz`` (readiness) succeeds once the process is live and every check it declared is done (models loaded
  and warmed, partitions assigned).
- Consumer lag per group, topic and partition is the high watermark minus the committed offset (the low watermark
  where nothing is committed), and its time lag the age of the oldest unprocessed event: the broker timestamp of
  the message at the committed offset, read by a consumer of the monitor's own (assign and read one message; it
  never joins the group). Measured every ``PIXELPIPE_LAG_INTERVAL_S``, never per scrape, so a scrape costs only
  the rendering of what is already counted. A render topic's lag names its model pool too (from the topic's name).

The server is one ``ThreadingHTTPServer`` on a daemon thread; ``PIXELPIPE_METRICS_PORT=0`` (the default) serves
nothing, so processes started side by side (tests, benchmarks) never fight over a port.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.exposition import choose_encoder

from pixelpipe.core.pools import topic_pool
from pixelpipe.core.settings import KafkaSettings, OpsSettings, TopicSettings

log = logging.getLogger(__name__)

CONSUMER_LAG = Gauge(
    "pixelpipe_consumer_lag_messages",
    "Messages not yet processed: high watermark minus committed offset, per consumer group and partition; pool is "
    "the model pool of a render topic, '' for other topics.",
    ["group", "topic", "partition", "pool"],
)
CONSUMER_LAG_SECONDS = Gauge(
    "pixelpipe_consumer_lag_seconds",
    "Age of the oldest unprocessed message (broker timestamp of the message at the committed offset); 0 when none.",
    ["group", "topic", "partition", "pool"],
)
LAG_MEASURED = Gauge("pixelpipe_consumer_lag_measured_timestamp_seconds", "When consumer lag was last measured.")
DEAD_LETTERS = Counter(
    "pixelpipe_dead_letters_total", "Dead letters sent, by the stage that gave up and the reason.", ["stage", "reason"]
)
RETRIES = Counter("pixelpipe_retries_total", "Retries of transient failures, by what was retried.", ["what"])
READY = Gauge("pixelpipe_ready", "1 when /readyz answers 200: live, and every readiness check is done.")


_REASON = re.compile(r"[a-z][a-z ]{0,40}")


def reason_label(reason: str) -> str:
    """A dead letter's reason as a label: its words before the first colon ('undecodable', 'unmoderated',
    'internal error'), never the details, which carry ids."""
    head = reason.split(":", 1)[0].strip().lower()
    match = _REASON.fullmatch(head)
    return match[0].replace(" ", "_") if match else "other"


class Health:
    """Liveness (a heartbeat no older than ``bound_s``) and readiness (named checks, all done)."""

    def __init__(self, bound_s: float, checks: Iterable[str] = ()) -> None:
        self.bound_s = bound_s
        self._checks = dict.fromkeys(checks, False)
        self._beat_s: float | None = None  # no loop yet (models loading): live until its first beat

    def beat(self) -> None:
        self._beat_s = time.monotonic()

    def mark(self, check: str, done: bool = True) -> None:
        self._checks[check] = done

    def live(self) -> tuple[bool, str]:
        if self._beat_s is None:
            return True, "starting"
        silent_s = time.monotonic() - self._beat_s
        if silent_s > self.bound_s:
            return False, f"loop blocked: no heartbeat for {silent_s:.1f} s (bound {self.bound_s:g} s)"
        return True, f"ok: heartbeat {silent_s:.1f} s ago"

    def ready(self) -> tuple[bool, str]:
        live, why = self.live()
        pending = [name for name, done in self._checks.items() if not done]
        ready = live and not pending
        READY.set(1 if ready else 0)
        if not live:
            return False, why
        return (False, f"waiting for: {', '.join(pending)}") if pending else (True, "ok")


class _Handler(BaseHTTPRequestHandler):
    health: Health

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._answer(200, encoder(REGISTRY), content_type)
        elif path in ("/healthz", "/readyz"):
            ok, why = self.health.live() if path == "/healthz" else self.health.ready()
            self._answer(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
        else:
            self._answer(404, b"try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not worth a log line


class OpsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port``, served by a daemon thread."""

    def __init__(self, host: str, port: int, health: Health) -> None:
        handler = type("Handler", (_Handler,), {"health": health})
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise OSError(
                f"metrics port {port} on {host}: {e.strerror}; set PIXELPIPE_METRICS_PORT to a free port "
                "(every process on a host needs its own) or to 0 for none"
            ) from e
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ops-server", daemon=True)
        self._thread.start()
        log.info("metrics and health served", extra={"port": self.port})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(ops: OpsSettings, health: Health) -> OpsServer | None:
    """The process's ops server on ``PIXELPIPE_METRICS_PORT``, or None when it is 0."""
    return OpsServer(ops.metrics_host, ops.metrics_port, health) if ops.metrics_port else None


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int  # -1 when the group has committed nothing there
    high: int
    messages: int
    seconds: float


class LagMonitor:
    """Measures the lag of consumer groups every ``interval_s`` on a daemon thread, into the lag gauges.

    ``groups`` maps a group to the topics it reads; groups whose id starts with one of ``prefixes`` are found
    on the broker each round, with the topics they committed offsets for (the lag exporter's way, which still
    sees a group whose every member is stopped). ``topics`` are the pipeline's topic names (the default pool's
    render topics), by which a render topic's series is labelled with its pool (``pixelpipe.core.pools``).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        groups: Mapping[str, Sequence[str]] | None = None,
        prefixes: Sequence[str] = (),
        interval_s: float = 5.0,
        *,
        topics: TopicSettings,
    ) -> None:
        from confluent_kafka import Consumer
        from confluent_kafka.admin import AdminClient

        self.groups = dict(groups or {})
        self.topics = topics
        self.prefixes = tuple(prefixes)
        self.interval_s = interval_s
        self._admin = AdminClient(kafka.client_config())
        # Reads watermarks and the message at a committed offset; assigned only, never subscribed: joins no group.
        # Small fetches: it wants one message from a partition that may hold a backlog of megabytes, on a machine
        # whose cores belong to the worker (a larger first message still comes back whole).
        self._peek = Consumer(
            kafka.client_config()
            | {
                "group.id": "pixelpipe-lag-monitor",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "fetch.max.bytes": 65536,
                "max.partition.fetch.bytes": 16384,
                "message.max.bytes": 65536,
                "queued.max.messages.kbytes": 64,
                "queued.min.messages": 1,
            }
        )
        self._shown: set[tuple[str, str, str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: list[PartitionLag] = []

    def start(self) -> LagMonitor:
        self._thread = threading.Thread(target=self._run, name="lag-monitor", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with contextlib.suppress(Exception):
            self._peek.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.measure()
            except Exception as e:  # a broker restarting, say: the next round measures again
                log.warning("consumer lag not measured", extra={"error": repr(e)})
            self._stop.wait(self.interval_s)

    def measure(self) -> list[PartitionLag]:
        """One round: every watched group's lag, set into the gauges (series of groups and partitions gone are
        removed); returns what was measured."""
        lags = [lag for group, committed in self._committed().items() for lag in self._lags(group, committed)]
        now = time.time()
        shown: set[tuple[str, str, str, str]] = set()
        for lag in lags:
            labels = (lag.group, lag.topic, str(lag.partition), topic_pool(self.topics, lag.topic) or "")
            CONSUMER_LAG.labels(*labels).set(lag.messages)
            CONSUMER_LAG_SECONDS.labels(*labels).set(lag.seconds)
            shown.add(labels)
        for labels in self._shown - shown:
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(*labels)
                CONSUMER_LAG_SECONDS.remove(*labels)
        self._shown = shown
        LAG_MEASURED.set(now)
        self.last = lags
        return lags

    def _committed(self) -> dict[str, dict[tuple[str, int], int]]:
        """Each watched group's committed offset per (topic, partition) of the topics it reads."""
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

        wanted: dict[str, list[TopicPartition] | None] = {}
        for group, topics in self.groups.items():
            wanted[group] = [TopicPartition(topic, p) for topic in topics for p in self._partitions(topic)]
        if self.prefixes:
            listed = self._admin.list_consumer_groups(request_timeout=10).result()
            for group in listed.valid:
                if group.group_id.startswith(self.prefixes) and group.group_id not in wanted:
                    wanted[group.group_id] = None  # every partition it committed
        committed: dict[str, dict[tuple[str, int], int]] = {}
        for group, partitions in wanted.items():
            if partitions == []:
                continue
            request = [ConsumerGroupTopicPartitions(group, partitions)]
            found = self._admin.list_consumer_group_offsets(request, request_timeout=10)[group].result()
            committed[group] = {(tp.topic, tp.partition): tp.offset for tp in found.topic_partitions}
        return committed

    def _partitions(self, topic: str) -> list[int]:
        metadata = self._peek.list_topics(topic, timeout=10).topics.get(topic)
        return sorted(metadata.partitions) if metadata is not None and metadata.error is None else []

    def _lags(self, group: str, committed: dict[tuple[str, int], int]) -> list[PartitionLag]:
        from confluent_kafka import TopicPartition

        lags = []
        now = time.time()
        for (topic, partition), offset in sorted(committed.items()):
            low, high = self._peek.get_watermark_offsets(TopicPartition(topic, partition), timeout=10, cached=False)
            next_offset = offset if offset >= 0 else low
            messages = max(0, high - next_offset)
            seconds = 0.0
            if messages:
                produced_s = self._timestamp_at(topic, partition, max(next_offset, low))
                seconds = max(0.0, now - produced_s) if produced_s is not None else 0.0
            lags.append(PartitionLag(group, topic, partition, offset, high, messages, seconds))
        return lags

    def _timestamp_at(self, topic: str, partition: int, offset: int) -> float | None:
        """The timestamp (seconds) of the message at ``offset``; None when it cannot be read within a second."""
        from confluent_kafka import TopicPartition

        self._peek.assign([TopicPartition(topic, partition, offset)])
        try:
            message = self._peek.poll(1.0)
        finally:
            self._peek.unassign()
        if message is None or message.error() is not None:
            return None
        _kind, stamp_ms = message.timestamp()
        return stamp_ms / 1000.0 if stamp_ms > 0 else None
