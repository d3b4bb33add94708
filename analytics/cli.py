"""``pixelpipe analyze``: register with ``main.add_command(analyze)`` in pixelpipe/cli.py."""

from __future__ import annotations

import datetime
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
        result = run_analysis(client, spec, start, end, names, dimension, pre_days, min_users_per_arm=min_users)
    except AnalysisError as e:
        raise click.ClickException(str(e)) from e
    finally:
        client.close()
    click.echo(result.table())
    out = result.write_html(html_path or Path(f"report-{experiment}.html"))
    click.echo(f"report: {out.resolve().as_uri()}")
