"""The ClickHouse client every layer shares: a server over the native protocol (clickhouse-driver) or chDB's
engine in-process, behind one ``connect(url)``, and the error a refused insert raises."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from pixelpipe.core.settings import mask_secrets

# Server errors that say nothing about the rows: the insert may work when tried again, so no row is refused for them.
# 159 TIMEOUT_EXCEEDED, 202 TOO_MANY_SIMULTANEOUS_QUERIES, 209 SOCKET_TIMEOUT, 210 NETWORK_ERROR,
# 241 MEMORY_LIMIT_EXCEEDED, 252 TOO_MANY_PARTS.
_TRANSIENT_SERVER_CODES = frozenset({159, 202, 209, 210, 241, 252})

_INT_TYPE = re.compile(r"^(Array\()?(Nullable\()?(U?)Int(8|16|32|64)\)*$")


class InsertRefused(ValueError):
    """ClickHouse refused the rows of an insert (a value out of its column's range, say); nothing was written."""


class ClickHouseClient(Protocol):
    def execute(self, sql: str) -> list[tuple[Any, ...]]:
        """Runs one statement; returns its rows (none for DDL and inserts)."""
        ...


class ServerClient:
    """A ClickHouse server over the native protocol, from `clickhouse://user:password@host:port/db`."""

    def __init__(self, url: str) -> None:
        from clickhouse_driver import Client

        self._client = Client.from_url(url)

    def execute(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._client.execute(sql)]

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Inserts rows (tuples in `columns` order) in one native-protocol insert."""
        from clickhouse_driver.errors import ServerException, TypeMismatchError

        try:
            self._client.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES", rows)
        except TypeMismatchError as e:  # the driver checks each value against its column type before sending
            raise InsertRefused(e.message) from e
        except ServerException as e:
            if e.code in _TRANSIENT_SERVER_CODES:
                raise
            raise InsertRefused(e.message) from e

    def close(self) -> None:
        self._client.disconnect()


class ChdbClient:
    """chDB's engine in-process on a directory. Only one process may open a directory at a time."""

    def __init__(self, path: str) -> None:
        from chdb.session import Session

        self._session = Session(path)
        self._integer_checks: dict[tuple[str, tuple[str, ...]], list[tuple[int, str, int, int, bool]]] = {}
        # JSON output keeps 64-bit integers as numbers rather than strings, so rows read like the driver's.
        self._session.query("SET output_format_json_quote_64bit_integers = 0")

    def execute(self, sql: str) -> list[tuple[Any, ...]]:
        raw = self._session.query(sql, "JSONCompact").bytes()
        return [tuple(row) for row in json.loads(raw)["data"]] if raw else []

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Inserts rows (tuples in `columns` order) as one JSONCompactEachRow insert."""
        self._check_integer_ranges(table, columns, rows)
        body = "\n".join(map(json.dumps, rows))
        try:
            self._session.query(f"INSERT INTO {table} ({', '.join(columns)}) FORMAT JSONCompactEachRow\n{body}")
        except RuntimeError as e:  # chdb's query errors (chdb._exceptions.ChdbError) are RuntimeErrors
            raise InsertRefused(str(e)) from e

    def _check_integer_ranges(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        # ClickHouse's text formats wrap an out-of-range integer silently (70000 lands in a UInt16 as 4464), where
        # the server's native driver refuses it: check here so both backends refuse the same rows.
        key = (table, tuple(columns))
        if key not in self._integer_checks:
            types = dict(
                self.execute(
                    f"SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = '{table}'"
                )
            )
            checks = []
            for index, column in enumerate(columns):
                match = _INT_TYPE.match(str(types.get(column, "")))
                if match:
                    bits = int(match[4])
                    low, high = (0, 2**bits - 1) if match[3] else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                    checks.append((index, f"{column} {types[column]}", low, high, bool(match[1])))
            self._integer_checks[key] = checks
        for row in rows:
            for index, column, low, high, is_array in self._integer_checks[key]:
                for value in row[index] if is_array else (row[index],):
                    if value is not None and not low <= value <= high:
                        raise InsertRefused(f"column {column}: {value} is outside {low}..{high}")

    def close(self) -> None:
        self._session.close()


def create_database(server_url: str, database: str) -> str:
    """Create ``database`` on the server at ``server_url``; returns the URL that connects to it."""
    admin = ServerClient(server_url)
    try:
        admin.execute(f"CREATE DATABASE IF NOT EXISTS {database}")
    finally:
        admin.close()
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{database}"))


def drop_database(server_url: str, database: str) -> None:
    admin = ServerClient(server_url)
    try:
        admin.execute(f"DROP DATABASE IF EXISTS {database}")
    finally:
        admin.close()


def connect(url: str) -> ServerClient | ChdbClient:
    """`clickhouse://...` for a server, `chdb://DIR` for chDB on DIR."""
    if url.startswith("chdb://"):
        return ChdbClient(url.removeprefix("chdb://"))
    if url.startswith("clickhouse://"):
        return ServerClient(url)
    raise ValueError(f"unsupported ClickHouse URL (want clickhouse:// or chdb://): {mask_secrets(url)}")
