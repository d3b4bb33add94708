"""Versioned ClickHouse schema: the SQL files in migrations/, applied once each and recorded in schema_migrations.

The same files run on a ClickHouse server (CI uses Debian's 18.16) and on chDB's current engine in-process.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Raw event tables: the ones TTL or partition drops age out. Rollups are small and kept.
RAW_TABLES = ("requests", "results", "stage_metrics")

# Table TTL arrived in ClickHouse 19.6; 18.16 rejects the clause as a syntax error.
_TTL_SINCE = (19, 6)


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
    raise ValueError(f"unsupported ClickHouse URL (want clickhouse:// or chdb://): {url}")


def split_statements(sql: str) -> list[str]:
    """Statements end with `;` at the end of a line; `--` comment lines are dropped."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    parts = re.split(r";[ \t]*$", "\n".join(lines), flags=re.MULTILINE)
    return [part.strip() for part in parts if part.strip()]


def server_version(client: ClickHouseClient) -> tuple[int, ...]:
    (version,) = client.execute("SELECT version()")[0]
    return tuple(int(part) for part in str(version).split(".")[:2])


def ttl_clause(client: ClickHouseClient, ttl_days: int | None) -> str:
    """A TTL clause for the raw tables where the engine has table TTL; empty otherwise (see drop_expired_partitions)."""
    if ttl_days is None or server_version(client) < _TTL_SINCE:
        return ""
    return f"TTL event_date + INTERVAL {int(ttl_days)} DAY"


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


def applied_migrations(client: ClickHouseClient) -> set[str]:
    return {name for (name,) in client.execute("SELECT name FROM schema_migrations")}


def apply_migrations(client: ClickHouseClient, ttl_days: int | None = None) -> list[str]:
    """Applies the migrations not yet recorded, in name order; returns their names.

    Statements use IF NOT EXISTS, so a migration that failed halfway can be applied again. ttl_days only shapes
    tables created now: changing it later needs a migration of its own.
    """
    client.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (name String, applied_at DateTime DEFAULT now())"
        " ENGINE = MergeTree ORDER BY name"
    )
    done = applied_migrations(client)
    pending = [path for path in migration_files() if path.stem not in done]
    ttl = ttl_clause(client, ttl_days) if pending else ""
    for path in pending:
        for statement in split_statements(path.read_text().replace("{ttl}", ttl)):
            client.execute(statement)
        client.execute(f"INSERT INTO schema_migrations (name) SELECT '{path.stem}'")
    return [path.stem for path in pending]


def migrate(url: str, ttl_days: int | None = None) -> list[str]:
    """Connect to ``url``, apply the pending migrations and close; returns the names applied."""
    client = connect(url)
    try:
        return apply_migrations(client, ttl_days)
    finally:
        client.close()


def drop_expired_partitions(
    client: ClickHouseClient, ttl_days: int, today: datetime.date | None = None
) -> list[tuple[str, str]]:
    """Retention without table TTL (18.16): drops raw-table month partitions wholly older than ttl_days.

    Returns (table, partition id) pairs dropped. Month granularity keeps up to a month beyond ttl_days.
    """
    cutoff = (today or datetime.date.today()) - datetime.timedelta(days=ttl_days)
    tables = ", ".join(f"'{table}'" for table in RAW_TABLES)
    expired = client.execute(
        "SELECT table, partition_id FROM system.parts"
        f" WHERE active AND database = currentDatabase() AND table IN ({tables})"
        f" GROUP BY table, partition_id HAVING max(max_date) < toDate('{cutoff.isoformat()}')"
    )
    for table, partition_id in expired:
        client.execute(f"ALTER TABLE {table} DROP PARTITION ID '{partition_id}'")
    return [(str(table), str(partition_id)) for table, partition_id in expired]
