"""Shared fixtures: the real servers the integration tests use.

Where they come from, first match wins:
1. servers named by the environment (PIXELPIPE_KAFKA_BOOTSTRAP set: CI exports the local stack's);
2. testcontainers, where a Docker engine answers;
3. the local stack, started for this test session in a temporary directory on free ports.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pixelpipe.core.clickhouse import ChdbClient, ServerClient, create_database, drop_database
from pixelpipe.core.settings import Settings, section_from_env
from pixelpipe.tools.stack import LocalStack, StackSettings, free_port, port_bindable


def free_kafka_port() -> int:
    """A free port whose next two are free too: the local Kafka's controller and SASL listener take them."""
    while True:
        port = free_port()
        if port_bindable(port + 1) and port_bindable(port + 2):
            return port


def with_own_topics(settings: Settings, suffix: str | None = None) -> Settings:
    """``settings`` with every pipeline topic renamed with a suffix, so concurrent tests never share events."""
    suffix = suffix or uuid.uuid4().hex[:8]
    topics = settings.topics
    names = (
        "requests",
        "generate",
        "edit",
        "generate_long",
        "edit_long",
        "results",
        "metrics",
        "dead_letter",
        "gateway_usage",
        "cancellations",
        "model_pools",
        "experiments",
        "rollouts",
    )
    renamed = {name: f"{getattr(topics, name)}.{suffix}" for name in names}
    return dataclasses.replace(settings, topics=dataclasses.replace(topics, **renamed))


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # no client, no socket, no engine: all mean "no Docker"
        return False
    return True


def _containers() -> Iterator[Settings]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    kafka_port = free_port()
    kafka = (
        DockerContainer("apache/kafka:4.1.1")
        .with_bind_ports(9092, kafka_port)
        .with_env("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093")
        .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://127.0.0.1:{kafka_port}")
    )
    clickhouse = DockerContainer("clickhouse/clickhouse-server:latest").with_exposed_ports(9000)
    minio = (
        DockerContainer("minio/minio:latest")
        .with_command("server /data")
        .with_env("MINIO_ROOT_USER", "pixelpipe")
        .with_env("MINIO_ROOT_PASSWORD", "pixelpipe-local-secret")
        .with_exposed_ports(9000)
    )
    with kafka, clickhouse, minio:
        wait_for_logs(kafka, "Kafka Server started", timeout=120)
        wait_for_logs(clickhouse, "Ready for connections", timeout=120)
        wait_for_logs(minio, "API:", timeout=120)
        s3 = f"http://127.0.0.1:{minio.get_exposed_port(9000)}"
        settings = Settings().updated(
            kafka_bootstrap=f"127.0.0.1:{kafka_port}",
            clickhouse_url=f"clickhouse://default@127.0.0.1:{clickhouse.get_exposed_port(9000)}/default",
            object_store_url="s3://pixelpipe/images",
            s3_endpoint_url=s3,
            s3_access_key_id="pixelpipe",
            s3_secret_access_key="pixelpipe-local-secret",
            moderation_stamp_key=secrets.token_hex(32),
        )
        import boto3

        boto3.client(
            "s3",
            endpoint_url=s3,
            aws_access_key_id="pixelpipe",
            aws_secret_access_key="pixelpipe-local-secret",
            region_name="us-east-1",
        ).create_bucket(Bucket="pixelpipe")
        yield settings


def _local_stack(tmp_dir: str) -> Iterator[Settings]:
    kafka_port = free_kafka_port()
    stack_settings = dataclasses.replace(
        section_from_env(StackSettings, os.environ),
        dir=tmp_dir,
        kafka_port=kafka_port,
        clickhouse_port=free_port(),
        clickhouse_http_port=free_port(),
        s3_port=free_port(),
        prometheus_port=free_port(),
        lag_exporter_port=free_port(),
        gateway_port=0,  # the tests start gateways of their own
    )
    stack = LocalStack(stack_settings)
    try:
        stack.up()
        yield Settings.from_env(os.environ | stack.client_env())
    finally:
        stack.down()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings whose Kafka, ClickHouse and S3 are real servers, whichever way they were found."""
    if os.environ.get("PIXELPIPE_KAFKA_BOOTSTRAP"):
        yield Settings.from_env()
    elif _docker_answers():
        yield from _containers()
    else:
        yield from _local_stack(str(tmp_path_factory.mktemp("stack")))


@pytest.fixture
def topic_settings(servers: Settings) -> Settings:
    """The servers' settings with pipeline topic names of this test's own, so tests never see each other's events."""
    return with_own_topics(servers)


@pytest.fixture
def clickhouse_url(servers: Settings) -> Iterator[str]:
    """The URL of an empty database of this test's own on the ClickHouse server, dropped afterwards."""
    database = f"test_{uuid.uuid4().hex[:10]}"
    url = create_database(servers.clickhouse.url, database)
    try:
        yield url
    finally:
        drop_database(servers.clickhouse.url, database)


@pytest.fixture
def server_client(clickhouse_url: str) -> Iterator[ServerClient]:
    """A client of this test's own database on the ClickHouse server."""
    client = ServerClient(clickhouse_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def chdb_client(tmp_path: Path) -> Iterator[ChdbClient]:
    """An embedded chDB on a directory of this test's own."""
    client = ChdbClient(str(tmp_path / "chdb"))
    try:
        yield client
    finally:
        client.close()
