"""The local stack's own settings: where it keeps its servers' data and which ports they listen on."""

from __future__ import annotations

from dataclasses import dataclass

from pixelpipe.core.settings import setting


@dataclass(frozen=True)
class StackSettings:
    dir: str = setting("STACK_DIR", "./data/stack", "Where `pixelpipe stack` keeps each service's data and logs.")
    kafka_port: int = setting("STACK_KAFKA_PORT", 9092, "Local Kafka broker port (the controller uses the next one).")
    clickhouse_port: int = setting("STACK_CLICKHOUSE_PORT", 9000, "Local ClickHouse native-protocol port.")
    clickhouse_http_port: int = setting("STACK_CLICKHOUSE_HTTP_PORT", 8123, "Local ClickHouse HTTP port.")
    s3_port: int = setting("STACK_S3_PORT", 9100, "Local S3 endpoint port.")
    s3_bucket: str = setting("STACK_S3_BUCKET", "pixelpipe", "Bucket the local stack creates.")
    default_partitions: int = setting(
        "STACK_DEFAULT_PARTITIONS", 8, "Partitions of topics the local broker creates on first use."
    )
    kafka_acls: int = setting(
        "STACK_KAFKA_ACLS",
        0,
        "1: the local Kafka authorises every client by ACLs, a SASL user per role (publisher, moderation, renderer, "
        "sink) and a super user for the tools; its PLAINTEXT listener is then allowed nothing.",
    )
    prometheus_port: int = setting("STACK_PROMETHEUS_PORT", 9090, "Local Prometheus port (web UI and HTTP API).")
    prometheus_interval_s: float = setting(
        "STACK_PROMETHEUS_INTERVAL_S", 5.0, "Local Prometheus' scrape and rule evaluation interval, in seconds."
    )
    scrape_ports: str = setting(
        "STACK_SCRAPE_PORTS",
        "9400,9401,9402,9403",
        "Ports on 127.0.0.1 the local Prometheus scrapes besides the lag exporter: the demo's workers and sink "
        "serve their metrics on the first ones, the stack's gateway on the last.",
    )
    lag_exporter_port: int = setting(
        "STACK_LAG_EXPORTER_PORT", 9409, "Port of the local stack's `pixelpipe lag-exporter` (every group's lag)."
    )
    gateway_port: int = setting(
        "STACK_GATEWAY_PORT",
        8080,
        "Port of the local stack's `pixelpipe gateway`, started where PIXELPIPE_MODEL_REGISTRY names a registry; "
        "0: none.",
    )
    cache_dir: str = setting(
        "CACHE_DIR", "~/.cache/pixelpipe", "Downloaded server jars and the cached virtual environment."
    )
