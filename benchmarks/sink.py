"""ClickHouse sink throughput on the local stack: rows/s from Kafka into the ClickHouse server.

    pixelpipe stack up && eval "$(pixelpipe stack env)" && python benchmarks/sink.py [--requests 100000]

Each request contributes one ImageResult and two StageMetrics, published (untimed) to fresh topics. Two paths,
measured in the same run, each into a fresh database:
  baseline   clickhouse-driver inserting the same rows, already built, in batches of the sink's size
  sink       ClickHouseSink: consume, decode to typed events, build rows, insert, commit offsets
The sink's rate runs from its first committed batch to its last, so it leaves out joining the consumer group.
"""

from __future__ import annotations

import argparse
import datetime as dt
import threading
import time
import uuid

from confluent_kafka import Producer

from pixelpipe.core import logs
from pixelpipe.core.clickhouse import ServerClient, create_database
from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageResult, StageMetric, StoredImage
from pixelpipe.core.settings import Settings
from pixelpipe.core.topics import ensure_topics
from pixelpipe.sinks.clickhouse.migrate import migrate
from pixelpipe.sinks.clickhouse.rows import METRIC_COLUMNS, RESULT_COLUMNS, metric_row, result_row
from pixelpipe.sinks.clickhouse.sink import ClickHouseSink

BATCH_ROWS = 50_000


def events(requests: int) -> tuple[list[ImageResult], list[StageMetric]]:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    results, metrics = [], []
    for i in range(requests):
        common = {"request_id": f"req-{i:08d}", "schema_version": 1, "event_time": now, "user_id": f"user-{i % 1000}"}
        common |= {"model": "sd-1.5", "experiments": {"steps": "fast"}, "variant": "steps:fast"}
        results.append(
            ImageResult(
                **common,
                event_id=str(uuid.uuid4()),
                status="SUCCEEDED",
                kind="GENERATE",
                images=[
                    StoredImage(
                        uri=f"s3://b/req-{i}/0.png",
                        sha256="ab" * 32,
                        width=512,
                        height=512,
                        format="PNG",
                        bytes=300_000,
                    )
                ],
                moderation_stage=None,
                moderation_scores=[],
                error_code=None,
                error_message=None,
                request_created_at=now,
                timings_ms={"moderation": 12.0, "generate": 900.0},
            )
        )
        for stage in ("MODERATION", "GENERATE"):
            metrics.append(
                StageMetric(
                    **common,
                    event_id=str(uuid.uuid4()),
                    stage=stage,
                    outcome="OK",
                    queue_ms=5.0 + i % 50,
                    compute_ms=100.0 + i % 300,
                    batch_size=1 + i % 8,
                    device="cuda:0",
                    device_seconds=0.1,
                    cost_usd=0.0001,
                    worker_id="worker-1",
                )
            )
    return results, metrics


def fresh_database(url: str, name: str) -> str:
    database_url = create_database(url, name)
    migrate(database_url)
    return database_url


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100_000)
    requests = parser.parse_args().requests
    suffix = uuid.uuid4().hex[:8]
    settings = Settings.from_env().updated(
        topic_results=f"bench.results.{suffix}",
        topic_metrics=f"bench.metrics.{suffix}",
        topic_dead_letter=f"bench.dead-letter.{suffix}",
        sink_group_id=f"bench-{suffix}",
        sink_max_batch_rows=BATCH_ROWS,
    )
    logs.configure(settings.logs.level)
    topics = settings.topics
    ensure_topics(settings.kafka, topics, names=[topics.results, topics.metrics, topics.dead_letter], partitions=8)
    results, metrics = events(requests)
    total = len(results) + len(metrics)

    codec = codec_from_settings(settings.kafka)  # what the pipeline's stages write, and the sink reads
    producer = Producer(settings.kafka.client_config() | {"linger.ms": 20, "compression.type": "zstd"})
    for topic, batch in ((topics.results, results), (topics.metrics, metrics)):
        for event in batch:
            while True:
                try:
                    producer.produce(topic, codec.encode(event), event.request_id.encode())
                    break
                except BufferError:
                    producer.poll(0.01)
    producer.flush(60)
    print(f"{total} rows ({len(results)} results, {len(metrics)} metrics) on {settings.kafka.bootstrap}")

    server_url = settings.clickhouse.url
    baseline_client = ServerClient(fresh_database(server_url, f"bench_baseline_{suffix}"))
    tables = (
        ("results", RESULT_COLUMNS, [result_row(r) for r in results]),
        ("stage_metrics", METRIC_COLUMNS, [metric_row(m) for m in metrics]),
    )
    started = time.perf_counter()
    for table, columns, rows in tables:
        for i in range(0, len(rows), BATCH_ROWS):
            baseline_client.insert(table, columns, rows[i : i + BATCH_ROWS])
    baseline = total / (time.perf_counter() - started)
    baseline_client.close()
    print(f"baseline  clickhouse-driver insert of built rows: {baseline:>9,.0f} rows/s")

    sink_client = ServerClient(fresh_database(server_url, f"bench_sink_{suffix}"))
    sink = ClickHouseSink(settings.kafka, topics, settings.sink, sink_client, max_idle_s=3.0)
    runner = threading.Thread(target=sink.run)
    runner.start()
    first_rows = first_at = 0.0
    while sink.stats.rows < total and runner.is_alive():
        if not first_rows and sink.stats.rows:
            first_rows, first_at = sink.stats.rows, time.perf_counter()
        time.sleep(0.002)
    sink_rate = (sink.stats.rows - first_rows) / (time.perf_counter() - first_at)
    runner.join()
    (counted,) = sink_client.execute(
        "SELECT (SELECT count() FROM results_dedup) + (SELECT count() FROM stage_metrics_dedup)"
    )
    print(f"sink      Kafka to ClickHouse, commits included:  {sink_rate:>9,.0f} rows/s ({sink_rate / baseline:.2f}x)")
    print(f"rows in the dedup views: {counted[0]} of {total}; batches: {sink.stats.batches}")

    for name in (f"bench_baseline_{suffix}", f"bench_sink_{suffix}"):
        sink_client.execute(f"DROP DATABASE {name}")
    sink_client.close()


if __name__ == "__main__":
    main()
