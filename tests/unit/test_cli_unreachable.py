"""Operator commands against servers that are down (a closed port on 127.0.0.1): one line naming the server, its
address and the setting to check, exit 1, no traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner, Result

from pixelpipe.core.cli import ReportsUnreachableServers
from pixelpipe.core.objects import open_object_store
from pixelpipe.core.settings import ObjectStoreSettings, Settings
from pixelpipe.tools.stack import free_port
from tests.unit.test_secrets import run

PASSWORD = "s3cr3t-pw"


@pytest.fixture
def closed_port() -> int:
    return free_port()  # bound and released: nothing listens there


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port that accepts connections and says nothing: a broker that answers the reachability check."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def assert_reported_in_one_line(output: str, exit_code: int, server: str, address: str, setting: str) -> None:
    assert exit_code == 1
    assert "Traceback" not in output
    [line] = output.strip().splitlines()
    assert line.startswith(f"Error: cannot reach {server} at {address} (")
    assert line.endswith(f"is it running, and is {setting} right? (`pixelpipe stack status` shows the local stack)")


def test_migrate_names_clickhouse_its_address_masked_and_its_setting(closed_port: int) -> None:
    url = f"clickhouse://u:{PASSWORD}@127.0.0.1:{closed_port}/db"
    done = run("clickhouse", "migrate", PIXELPIPE_CLICKHOUSE_URL=url)
    output = done.stdout + done.stderr
    assert_reported_in_one_line(
        output,
        done.returncode,
        "ClickHouse",
        f"clickhouse://u:***@127.0.0.1:{closed_port}/db",
        "PIXELPIPE_CLICKHOUSE_URL",
    )
    assert "Connection refused" in output
    assert PASSWORD not in output


@pytest.mark.parametrize(
    "command",
    [
        ["topics"],
        ["publish", "--synthetic", "1", "--no-progress"],
        ["cancel", "k3f2a9c01d4be-9e1c", "--wait", "0"],
        ["clickhouse", "sink", "--max-idle", "1"],
    ],
)
def test_kafka_commands_name_kafka_at_once_rather_than_wait_for_librdkafka(
    command: list[str], closed_port: int
) -> None:
    bootstrap = f"127.0.0.1:{closed_port}"
    done = run(*command, PIXELPIPE_KAFKA_BOOTSTRAP=bootstrap, PIXELPIPE_CLICKHOUSE_URL="clickhouse://127.0.0.1:1/db")
    assert_reported_in_one_line(
        done.stdout + done.stderr, done.returncode, "Kafka", bootstrap, "PIXELPIPE_KAFKA_BOOTSTRAP"
    )


def test_the_sink_names_clickhouse_when_kafka_answers(closed_port: int, listening_port: int) -> None:
    url = f"clickhouse://127.0.0.1:{closed_port}/db"
    done = run(
        "clickhouse",
        "sink",
        "--max-idle",
        "1",
        PIXELPIPE_KAFKA_BOOTSTRAP=f"127.0.0.1:{listening_port}",
        PIXELPIPE_CLICKHOUSE_URL=url,
    )
    assert_reported_in_one_line(
        done.stdout + done.stderr, done.returncode, "ClickHouse", url, "PIXELPIPE_CLICKHOUSE_URL"
    )


def test_publish_names_the_schema_registry_when_kafka_answers(closed_port: int, listening_port: int) -> None:
    registry = f"http://127.0.0.1:{closed_port}"
    done = run(
        "publish",
        "--synthetic",
        "1",
        "--no-progress",
        PIXELPIPE_KAFKA_BOOTSTRAP=f"127.0.0.1:{listening_port}",
        PIXELPIPE_SCHEMA_REGISTRY_URL=registry,
    )
    assert_reported_in_one_line(
        done.stdout + done.stderr, done.returncode, "the schema registry", registry, "PIXELPIPE_SCHEMA_REGISTRY_URL"
    )


# The handler itself, in-process, on what real clients raise against a closed port.
@click.group(cls=ReportsUnreachableServers)
def commands() -> None:
    pass


@commands.command("list-topics")
def list_topics() -> None:
    from confluent_kafka.admin import AdminClient

    AdminClient(Settings.from_env().kafka.client_config()).list_topics(timeout=2)


@commands.command("head-object")
@click.argument("endpoint")
def head_object(endpoint: str) -> None:
    settings = ObjectStoreSettings(url="s3://bucket/p", s3_endpoint_url=endpoint, s3_access_key_id="k")
    open_object_store(settings).exists("s3://bucket/p/key")


@commands.command("fail")
def fail() -> None:
    raise ValueError("a bug, not a server")


def invoke(*args: str, **env: str) -> Result:
    return CliRunner().invoke(commands, list(args), env=env)


def test_a_kafka_client_error_is_reported_in_one_line(closed_port: int) -> None:
    bootstrap = f"127.0.0.1:{closed_port}"
    result = invoke("list-topics", PIXELPIPE_KAFKA_BOOTSTRAP=bootstrap)
    assert_reported_in_one_line(result.output, result.exit_code, "Kafka", bootstrap, "PIXELPIPE_KAFKA_BOOTSTRAP")


def test_an_s3_client_error_is_reported_in_one_line(closed_port: int) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    result = invoke("head-object", endpoint)
    assert_reported_in_one_line(result.output, result.exit_code, "S3", endpoint, "PIXELPIPE_S3_ENDPOINT_URL")


def test_other_errors_are_left_to_raise() -> None:
    result = invoke("fail")
    assert isinstance(result.exception, ValueError)
