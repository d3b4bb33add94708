"""Versioned ClickHouse schema: the SQL files in migrations/, applied once each and recorded in schema_migrations.

The same files run on a ClickHouse server (CI uses Debian's 18.16) and on chDB's current engine in-process.
"""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path

from pixelpipe.core.clickhouse import ClickHouseClient, connect

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Raw event tables: the ones TTL or delete_expired_events age out. Rollups are small and kept.
RAW_TABLES = ("results", "stage_metrics")

# Table TTL arrived in ClickHouse 19.6; 18.16 rejects the clause as a syntax error.
_TTL_SINCE = (19, 6)
# How a table's TTL reads back from system.tables: `TTL event_date + toIntervalDay(30)`.
_TTL_DAYS = re.compile(r"TTL event_date \+ toIntervalDay\((\d+)\)")
_MUTATION_WAIT_S = 60.0


def split_statements(sql: str) -> list[str]:
    """Statements end with `;` at the end of a line; `--` comment lines are dropped."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    parts = re.split(r";[ \t]*$", "\n".join(lines), flags=re.MULTILINE)
    return [part.strip() for part in parts if part.strip()]


def server_version(client: ClickHouseClient) -> tuple[int, ...]:
    (version,) = client.execute("SELECT version()")[0]
    return tuple(int(part) for part in str(version).split(".")[:2])


def ttl_clause(client: ClickHouseClient, ttl_days: int | None) -> str:
    """A TTL clause for the raw tables where the engine has table TTL, of ttl_days or else of the TTL the raw tables
    already have; empty without either, and on engines without table TTL (see delete_expired_events)."""
    if server_version(client) < _TTL_SINCE:
        return ""
    days = ttl_days or ttl_days_in_force(client)
    return f"TTL event_date + INTERVAL {int(days)} DAY" if days else ""


def ttl_days_in_force(client: ClickHouseClient) -> int | None:
    """The days of the raw tables' TTL, as an earlier migrate set it; None without one (or without the tables)."""
    rows = client.execute(
        "SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = 'results'"
    )
    match = _TTL_DAYS.search(str(rows[0][0])) if rows else None
    return int(match[1]) if match else None


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


def applied_migrations(client: ClickHouseClient) -> set[str]:
    return {name for (name,) in client.execute("SELECT name FROM schema_migrations")}


def apply_migrations(client: ClickHouseClient, ttl_days: int | None = None, until: str | None = None) -> list[str]:
    """Applies the migrations not yet recorded, in name order, up to and including ``until`` when given (a name such
    as ``0005_what_ran``); returns their names.

    Statements use IF NOT EXISTS, so a migration that failed halfway can be applied again. ttl_days only shapes
    tables created now: changing it later needs a migration of its own. Without it, a migration that rebuilds a raw
    table keeps the TTL the table had.
    """
    client.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (name String, applied_at DateTime DEFAULT now())"
        " ENGINE = MergeTree ORDER BY name"
    )
    done = applied_migrations(client)
    pending = [path for path in migration_files() if path.stem not in done and (until is None or path.stem <= until)]
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


def delete_expired_events(
    client: ClickHouseClient, ttl_days: int, today: datetime.date | None = None
) -> dict[str, int]:
    """Retention without table TTL (18.16): deletes raw-table rows older than ttl_days; returns the rows deleted
    per table.

    The raw tables are one partition each (0006), so that every replay of an event collapses; old rows go by an
    ALTER ... DELETE mutation, waited for here.
    """
    oldest_kept = (today or datetime.date.today()) - datetime.timedelta(days=ttl_days)
    cutoff = f"toDate('{oldest_kept.isoformat()}')"
    deleted: dict[str, int] = {}
    for table in RAW_TABLES:
        ((expired,),) = client.execute(f"SELECT count() FROM {table} WHERE event_date < {cutoff}")
        if expired:
            client.execute(f"ALTER TABLE {table} DELETE WHERE event_date < {cutoff}")
            _wait_for_mutations(client, table)
        deleted[table] = int(expired)
    return deleted


def _wait_for_mutations(client: ClickHouseClient, table: str) -> None:
    deadline = time.monotonic() + _MUTATION_WAIT_S
    pending = (
        f"SELECT count() FROM system.mutations WHERE database = currentDatabase() AND table = '{table}' AND NOT is_done"
    )
    while client.execute(pending)[0][0]:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the delete on {table} did not finish in {_MUTATION_WAIT_S:.0f} s (see system.mutations)"
            )
        time.sleep(0.1)
