"""Versioned ClickHouse schema: the SQL files in migrations/, applied once each and recorded in schema_migrations.

The same files run on a ClickHouse server (CI uses Debian's 18.16) and on chDB's current engine in-process.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from pixelpipe.core.clickhouse import ClickHouseClient, connect

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Raw event tables: the ones TTL or partition drops age out. Rollups are small and kept.
RAW_TABLES = ("results", "stage_metrics")

# Table TTL arrived in ClickHouse 19.6; 18.16 rejects the clause as a syntax error.
_TTL_SINCE = (19, 6)


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
