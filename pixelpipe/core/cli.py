"""What every layer's commands share: settings from the environment, with logs set up, and one line for a server
that cannot be reached."""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import click

from pixelpipe.core import logs
from pixelpipe.core.settings import ConfigError, KafkaSettings, Settings, mask_secrets

P = ParamSpec("P")
R = TypeVar("R")

# Seconds to wait for a broker's (or the schema registry's) connection before calling it unreachable.
_CONNECT_TIMEOUT_S = 3.0


def load_settings() -> Settings:
    """The settings from the environment, with logging configured; a bad setting is a clean CLI error."""
    try:
        settings = Settings.from_env()
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    logs.configure(settings.logs.level)
    return settings


class UnreachableServer(click.ClickException):
    """A server that did not answer, in one line: which, where, why, and what to check."""

    def __init__(self, server: str, address: str, setting: str, reason: object) -> None:
        why = " ".join(mask_secrets(str(reason)).split())  # one line, whatever the library's message held
        super().__init__(
            f"cannot reach {server} at {mask_secrets(address)} ({why}); is it running, and is {setting} right? "
            "(`pixelpipe stack status` shows the local stack)"
        )


def _kafka_addresses(bootstrap: str) -> Iterator[tuple[str, int]]:
    for broker in bootstrap.split(","):
        address = broker.strip().rpartition("://")[2]
        host, colon, port = address.rpartition(":")
        yield (host.strip("[]"), int(port)) if colon and port.isdigit() else (address, 9092)


def _check_kafka(kafka: KafkaSettings) -> None:
    """Raise ``UnreachableServer`` unless a bootstrap broker accepts a connection, and the schema registry (when
    one is set) answers."""
    errors = []
    for address in _kafka_addresses(kafka.bootstrap):
        try:
            socket.create_connection(address, timeout=_CONNECT_TIMEOUT_S).close()
            break
        except OSError as e:
            errors.append(e.strerror or repr(e))
    else:
        raise UnreachableServer("Kafka", kafka.bootstrap, "PIXELPIPE_KAFKA_BOOTSTRAP", "; ".join(errors))
    if kafka.schema_registry_url:
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(kafka.schema_registry_url, timeout=_CONNECT_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # it answered: what it answered to a bare GET is no concern here
        except OSError as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise UnreachableServer(
                "the schema registry", kafka.schema_registry_url, "PIXELPIPE_SCHEMA_REGISTRY_URL", reason
            ) from None


def needs_kafka(command: Callable[P, R]) -> Callable[P, R]:
    """Check first that Kafka (and its schema registry, when one is set) answers: librdkafka never raises for an
    unreachable broker, it retries until a timeout (minutes for a producer), so a command would wait in silence."""

    @functools.wraps(command)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        _check_kafka(load_settings().kafka)
        return command(*args, **kwargs)

    return checked


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it was raised from or during, as a traceback would show them."""
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:  # a chain can loop back on itself
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _unreachable_server(error: BaseException) -> UnreachableServer | None:
    """The one-line error when ``error`` (or an error it came from) is a client failing to reach its server."""
    from botocore.exceptions import EndpointConnectionError
    from clickhouse_driver.errors import NetworkError, SocketTimeoutError
    from confluent_kafka import KafkaError, KafkaException

    unreachable_broker = (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE)
    for cause in _causes(error):
        if isinstance(cause, NetworkError | SocketTimeoutError):
            url = Settings.from_env().clickhouse.url
            return UnreachableServer("ClickHouse", url, "PIXELPIPE_CLICKHOUSE_URL", cause.message)
        kafka_error = cause.args[0] if isinstance(cause, KafkaException) and cause.args else None
        if isinstance(kafka_error, KafkaError) and kafka_error.code() in unreachable_broker:
            bootstrap = Settings.from_env().kafka.bootstrap
            return UnreachableServer("Kafka", bootstrap, "PIXELPIPE_KAFKA_BOOTSTRAP", kafka_error.str())
        if isinstance(cause, EndpointConnectionError):  # connect timeouts too
            endpoint = urlsplit(cause.kwargs["endpoint_url"])  # the request's URL: its server is the address
            address = f"{endpoint.scheme}://{endpoint.netloc}"
            return UnreachableServer("S3", address, "PIXELPIPE_S3_ENDPOINT_URL", cause.kwargs["error"])
    return None


class ReportsUnreachableServers(click.Group):
    """A command group whose commands (and its groups' commands) report a server they cannot reach in one line,
    exit 1 and print no traceback: an operator's problem to fix, not the program's. Errors that wrap one (a
    command's own ClickException raised from it) are reported the same way."""

    def invoke(self, ctx: click.Context) -> Any:
        # The ClickHouse driver logs a failed connection with its traceback before it raises the error reported here.
        logging.getLogger("clickhouse_driver.connection").setLevel(logging.ERROR)
        try:
            return super().invoke(ctx)
        except Exception as error:
            reported = _unreachable_server(error)
            if reported is None:
                raise
            raise reported from None
