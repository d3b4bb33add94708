"""`pixelpipe clickhouse migrate` and `pixelpipe clickhouse sink`; also runs alone: python -m pixelpipe.sinks.cli."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import click

from pixelpipe.core.cli import ReportsUnreachableServers, load_settings, needs_kafka
from pixelpipe.core.settings import Settings, mask_secrets
from pixelpipe.core.telemetry import Health, LagMonitor, serve


def _connect(settings: Settings):  # noqa: ANN202 - ServerClient or ChdbClient
    from pixelpipe.core.clickhouse import connect

    try:
        return connect(settings.clickhouse.url)
    except ValueError as e:
        raise click.ClickException(f"PIXELPIPE_CLICKHOUSE_URL: {e}") from e


@click.group(cls=ReportsUnreachableServers)
def clickhouse() -> None:
    """The ClickHouse schema and the sink that loads results, metrics and rollout decisions into it."""


@clickhouse.command("migrate")
@click.option("--ttl-days", type=click.IntRange(min=1), help="Age out raw events after this many days.")
def migrate_command(ttl_days: int | None) -> None:
    """Apply the schema migrations not yet applied to PIXELPIPE_CLICKHOUSE_URL."""
    from pixelpipe.sinks.clickhouse.migrate import apply_migrations

    client = _connect(load_settings())
    try:
        applied = apply_migrations(client, ttl_days=ttl_days)
    finally:
        client.close()
    click.echo(f"applied: {', '.join(applied) or 'none (up to date)'}")


@clickhouse.command("sink")
@click.option("--max-idle", type=click.FloatRange(min=0), help="Exit after this many seconds without events.")
@needs_kafka
def sink_command(max_idle: float | None) -> None:
    """Load PIXELPIPE_TOPIC_RESULTS, PIXELPIPE_TOPIC_METRICS and PIXELPIPE_TOPIC_ROLLOUTS into ClickHouse until
    SIGTERM or SIGINT.

    The consumer group and batch sizes are the PIXELPIPE_SINK_* settings."""
    from pixelpipe.sinks.clickhouse.migrate import applied_migrations, migration_files
    from pixelpipe.sinks.clickhouse.sink import ClickHouseSink

    settings = load_settings()
    client = _connect(settings)
    try:
        try:
            pending = sorted({path.stem for path in migration_files()} - applied_migrations(client))
        except Exception as e:  # no schema_migrations table, or no server: both need the operator
            raise click.ClickException(
                f"cannot read the schema version ({mask_secrets(str(e))}); run `pixelpipe clickhouse migrate`"
            ) from e
        if pending:
            raise click.ClickException(
                f"migrations not applied: {', '.join(pending)}; run `pixelpipe clickhouse migrate`"
            )
        stop = threading.Event()

        def request_stop(_signum: int, _frame: FrameType | None) -> None:
            stop.set()  # the sink inserts and commits what it holds, then returns

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        health = Health(settings.ops.liveness_bound_s, ["partitions"])
        server = serve(settings.ops, health)
        lag = None
        if server is not None:
            topics = settings.topics
            groups = {settings.sink.group_id: [topics.results, topics.metrics, topics.rollouts]}
            lag = LagMonitor(
                settings.kafka, groups, interval_s=settings.ops.lag_interval_s, topics=settings.topics
            ).start()
        sink = ClickHouseSink(
            settings.kafka, settings.topics, settings.sink, client, max_idle_s=max_idle, health=health
        )
        try:
            stats = sink.run(stop)
        finally:
            if lag is not None:
                lag.close()
            if server is not None:
                server.close()
    finally:
        client.close()
    click.echo(f"rows={stats.rows} batches={stats.batches} dead_letters={stats.dead_letters}")


if __name__ == "__main__":
    clickhouse()
