"""``pixelpipe analyze``: register with ``main.add_command(analyze)`` in pixelpipe/cli.py."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import click

from pixelpipe.analytics.defaults import DEFAULT_MIN_USERS_PER_ARM
from pixelpipe.core.experiments import (
    ExperimentConfigError,
    UnknownExperimentError,
    get_experiment,
    load_experiments,
)
from pixelpipe.core.experiments import parse_time as _parse_time


def _time(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime.datetime | None:
    if value is None:
        return None
    try:
        return _parse_time(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO date or date-time (e.g. 2025-01-06 or 2025-01-06T12:00)"
        ) from None


@click.command("analyze")
@click.argument("experiment")
@click.option(
    "--experiments",
    "experiments_file",
    default="experiments.json",
    show_default=True,
    envvar="PIXELPIPE_EXPERIMENTS_FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The experiments file (env PIXELPIPE_EXPERIMENTS_FILE).",
)
@click.option("--from", "start", callback=_time, help="Start of the window (UTC); default: the experiment's start.")
@click.option("--to", "end", callback=_time, help="End of the window (UTC, exclusive); default: its end, or now.")
@click.option("--metrics", help="Comma-separated metric names; default: all of them.")
@click.option("--by", "dimension", help="Also split every metric by this dimension (kind or model).")
@click.option("--pre-days", default=14, show_default=True, type=click.IntRange(min=0), help="Pre-period for CUPED.")
@click.option(
    "--revision",
    type=click.IntRange(min=0),
    help="Only users assigned under this revision of a live experiment (one allocation); default: the latest with "
    "results in every arm, when the window holds several.",
)
@click.option(
    "--min-users",
    default=DEFAULT_MIN_USERS_PER_ARM,
    show_default=True,
    type=click.IntRange(min=2),
    help="Per arm, for an interval.",
)
@click.option("--clickhouse-url", envvar="PIXELPIPE_CLICKHOUSE_URL", help="Default: PIXELPIPE_CLICKHOUSE_URL.")
@click.option(
    "--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), help="Default: report-EXPERIMENT.html."
)
def analyze(
    experiment: str,
    experiments_file: Path,
    start: datetime.datetime | None,
    end: datetime.datetime | None,
    metrics: str | None,
    dimension: str | None,
    pre_days: int,
    revision: int | None,
    min_users: int,
    clickhouse_url: str | None,
    html_path: Path | None,
) -> None:
    """Analyse EXPERIMENT: print lifts per metric and write a self-contained HTML report."""
    from pixelpipe.analytics.report import AnalysisError
    from pixelpipe.analytics.report import analyze as run_analysis
    from pixelpipe.core.cli import load_settings
    from pixelpipe.core.clickhouse import connect

    try:
        spec = get_experiment(load_experiments(experiments_file), experiment)
    except (ExperimentConfigError, UnknownExperimentError) as e:
        raise click.ClickException(str(e)) from e
    client = connect(clickhouse_url or load_settings().clickhouse.url)
    try:
        names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
        result = run_analysis(
            client, spec, start, end, names, dimension, pre_days, min_users_per_arm=min_users, revision=revision
        )
    except AnalysisError as e:
        raise click.ClickException(str(e)) from e
    finally:
        client.close()
    click.echo(result.table())
    out = result.write_html(html_path or Path(f"report-{experiment}.html"))
    click.echo(f"report: {out.resolve().as_uri()}")


@click.command("dashboard")
@click.option(
    "--out",
    default="dashboard.html",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the page here (without --serve).",
)
@click.option(
    "--since",
    default="24h",
    show_default=True,
    help="Start of the window: a duration back from now (30m, 6h, 7d) or an ISO date or date-time (UTC).",
)
@click.option("--serve", "serve_page", is_flag=True, help="Serve the page on 127.0.0.1, re-rendered every --refresh.")
@click.option("--port", default=8050, show_default=True, type=click.IntRange(0, 65535), help="With --serve.")
@click.option("--refresh", default=30, show_default=True, type=click.IntRange(min=1), help="With --serve: seconds.")
@click.option("--clickhouse-url", envvar="PIXELPIPE_CLICKHOUSE_URL", help="Default: PIXELPIPE_CLICKHOUSE_URL.")
def dashboard(out: Path, since: str, serve_page: bool, port: int, refresh: int, clickhouse_url: str | None) -> None:
    """Render the dashboards (analytics/dashboards/*.sql) into one self-contained HTML page with charts."""
    from pixelpipe.analytics.dashboard import Dashboard, DashboardError, parse_since, render_dashboard, serve
    from pixelpipe.core.cli import load_settings
    from pixelpipe.core.clickhouse import connect
    from pixelpipe.core.settings import mask_secrets

    url = clickhouse_url or load_settings().clickhouse.url
    try:
        parse_since(since, datetime.datetime.now(datetime.UTC))
    except DashboardError as e:
        raise click.BadParameter(str(e), param_hint="--since") from e

    def render(refresh_s: int | None = None) -> Dashboard:
        end = datetime.datetime.now(datetime.UTC)
        # A connection per render: chDB lets one process at a time open its directory, so between renders the
        # sink can write to it.
        try:
            client = connect(url)
        except (RuntimeError, OSError, ValueError) as e:
            hint = " (another process, a sink or analyze, may hold the chDB directory)" if "chdb://" in url else ""
            raise click.ClickException(mask_secrets(f"cannot open ClickHouse {url}{hint}: {e}")) from e
        try:
            return render_dashboard(client, parse_since(since, end), end, url, refresh_s)
        finally:
            client.close()

    if serve_page:
        serve(
            lambda: render(refresh).html,
            port,
            refresh,
            lambda message: click.echo(message, err=True),
            lambda address: click.echo(f"serving {address}, re-rendered every {refresh} s; Ctrl-C stops"),
        )
        return
    began = time.perf_counter()
    page = render()
    out.write_text(page.html)
    for panel in page.panels:
        click.echo(f"  {panel.chart.name:<28} {panel.error or f'{len(panel.rows)} rows'}")
    click.echo(f"dashboard ({time.perf_counter() - began:.1f} s): {out.resolve().as_uri()}")
    failed = [panel.chart.name for panel in page.panels if panel.error]
    if failed:
        raise click.ClickException(f"queries failed: {', '.join(failed)}")
