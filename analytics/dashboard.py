"""The analysts' dashboards without Grafana: every query in ``analytics/dashboards/*.sql`` run against ClickHouse
and drawn with matplotlib into one self-contained HTML page (PNG charts inlined as base64, no script, no network),
which opens from disk or is served on 127.0.0.1 and re-rendered every few seconds (``pixelpipe dashboard``).

The SQL files are the ones Grafana's panels hold (``analytics/grafana/dashboards/pixelpipe.json``); the only
Grafana macro they use is ``$__timeFilter(column)``, which ``expand_macros`` expands the way Grafana's ClickHouse
plugin does, so both read the same rows.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd

from pixelpipe.core.clickhouse import ClickHouseClient
from pixelpipe.core.settings import mask_secrets

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
EMPTY = "no data in the window"

_MACRO = re.compile(r"\$__(\w+)(?:\(([^)]*)\))?")
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class DashboardError(ValueError):
    """A dashboard query that cannot be run or read: an unknown macro, or columns that are not the chart's."""


def expand_macros(sql: str, start: dt.datetime, end: dt.datetime) -> str:
    """``sql`` with Grafana's ``$__timeFilter(column)`` expanded as its ClickHouse plugin does: ``column >=
    toDateTime(start) AND column <= toDateTime(end)`` in epoch seconds. Any other macro is refused, since this
    page could not give it Grafana's meaning."""

    def expand(match: re.Match[str]) -> str:
        if match[1] != "timeFilter" or not match[2] or not re.fullmatch(r"\w+", match[2].strip()):
            raise DashboardError(f"unsupported Grafana macro {match[0]!r}: only $__timeFilter(column) is expanded")
        column = match[2].strip()
        return f"{column} >= toDateTime({int(start.timestamp())}) AND {column} <= toDateTime({int(end.timestamp())})"

    return _MACRO.sub(expand, sql)


def parse_since(value: str, now: dt.datetime) -> dt.datetime:
    """The start of the window: ``now`` minus a duration (``90s``, ``30m``, ``6h``, ``7d``, ``2w``), or an ISO
    date or date-time (UTC when it names no zone)."""
    match = _DURATION.match(value)
    if match:
        return now - dt.timedelta(seconds=int(match[1]) * _SECONDS[match[2]])
    try:
        start = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise DashboardError(
            f"{value!r} is neither a duration (30m, 6h, 7d) nor an ISO date or date-time (2026-11-25T12:00)"
        ) from None
    return start if start.tzinfo else start.replace(tzinfo=dt.UTC)


# -- charts -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chart:
    """One dashboard: the SQL file ``dashboards/<name>.sql``, the columns it returns, in order, and its plot; a
    chart without one is a listing, its rows shown as a table."""

    name: str
    title: str
    columns: tuple[str, ...]
    plot: Callable[[Any, pd.DataFrame], None] | None  # draws the rows on a matplotlib Axes

    @property
    def sql(self) -> str:
        return (DASHBOARDS_DIR / f"{self.name}.sql").read_text()


def _minutes(values: pd.Series) -> pd.Series:
    # clickhouse-driver gives datetimes and chDB's JSON gives strings: both become timestamps.
    return pd.to_datetime(values)


def _numbers(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    # JSON output writes NaN (a 0/0 share) as null; plots skip NaN.
    return frame.assign(**{c: pd.to_numeric(frame[c], errors="coerce") for c in columns})


def _time_axis(ax: Any, times: pd.Series) -> None:
    """Concise dates on x; a single minute gets ten minutes around it, not matplotlib's default span of years."""
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if len(times) and times.min() == times.max():
        ax.set_xlim(times.min() - pd.Timedelta(minutes=5), times.max() + pd.Timedelta(minutes=5))


def _plot_throughput(ax: Any, frame: pd.DataFrame) -> None:
    frame = _numbers(frame, "succeeded", "rejected", "failed", "cancelled")
    minutes = _minutes(frame["minute"])
    colours = {"succeeded": "tab:green", "rejected": "tab:orange", "failed": "tab:red", "cancelled": "tab:gray"}
    for column, colour in colours.items():
        ax.plot(minutes, frame[column], marker="o", color=colour, label=column)
    _time_axis(ax, minutes)
    ax.set_ylabel("results per minute")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def _plot_latency_over_time(ax: Any, frame: pd.DataFrame) -> None:
    frame = _numbers(frame, "p50_ms", "p95_ms").assign(minute=_minutes(frame["minute"]))
    for name, rows in frame.groupby("stage", sort=True):
        (line,) = ax.plot(rows["minute"], rows["p95_ms"], marker="o", label=f"{name} p95")
        ax.plot(rows["minute"], rows["p50_ms"], marker=".", linestyle="--", color=line.get_color())
    _time_axis(ax, frame["minute"])
    ax.set_yscale("log")  # queue waits and compute times lie orders of magnitude apart
    ax.set_ylabel("ms, queue + compute (dashed: p50)")
    ax.legend(fontsize=8)


def _grouped_bars(ax: Any, labels: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def _plot_latency_by_stage(ax: Any, frame: pd.DataFrame) -> None:
    frame = _numbers(frame, "p50_ms", "p95_ms", "p99_ms")
    series = {q: frame[f"{q}_ms"].tolist() for q in ("p50", "p95", "p99")}
    _grouped_bars(ax, frame["stage"].astype(str).tolist(), series, "ms, queue + compute")
    ax.set_yscale("log")  # queue waits and compute times lie orders of magnitude apart


def _joined(frame: pd.DataFrame, *columns: str) -> list[str]:
    """Each row's values of ``columns`` as one label, the empty ones left out (a pool of '': none)."""
    return [" / ".join(str(value) for value in row if value) for row in frame[list(columns)].itertuples(index=False)]


def _plot_queue_vs_compute(ax: Any, frame: pd.DataFrame) -> None:
    frame = _numbers(frame, "avg_queue_ms", "avg_compute_ms")
    labels = _joined(frame, "stage", "pool", "model")
    ax.barh(labels, frame["avg_queue_ms"], color="tab:gray", label="queue wait")
    ax.barh(labels, frame["avg_compute_ms"], left=frame["avg_queue_ms"], color="tab:blue", label="compute")
    totals = frame["avg_queue_ms"].fillna(0) + frame["avg_compute_ms"].fillna(0)
    for i, (total, share) in enumerate(zip(totals, pd.to_numeric(frame["queue_share"], errors="coerce"), strict=True)):
        if pd.notna(share):
            ax.text(total, i, f" {share:.0%} queued", va="center", fontsize=8)
    ax.set_xlim(right=max(1.0, float(totals.max())) * 1.25)  # room for the labels
    ax.invert_yaxis()
    ax.set_xlabel("mean ms per stage event")
    ax.legend(fontsize=8)


def _plot_batch_sizes(ax: Any, frame: pd.DataFrame) -> None:
    table = frame.pivot_table(index="batch_size", columns="stage", values="events", aggfunc="sum", fill_value=0)
    series = {str(stage): table[stage].tolist() for stage in table.columns}
    _grouped_bars(ax, [str(b) for b in table.index], series, "stage events")
    ax.set_xlabel("batch size")


def _plot_cost_per_image(ax: Any, frame: pd.DataFrame) -> None:
    frame = _numbers(frame, "usd_per_image")
    names = _joined(frame, "pool", "model")
    labels = [f"{name}\n{v or '(no variant)'}" for name, v in zip(names, frame["variant"], strict=True)]
    ax.bar(labels, frame["usd_per_image"], color="tab:purple")
    ax.set_ylabel("USD per image")
    ax.tick_params(axis="x", labelsize=8)


def _plot_rejections(ax: Any, frame: pd.DataFrame) -> None:
    frame = _numbers(frame, "rejection_rate")
    labels = [f"{s}\n{c or '(none)'}" for s, c in zip(frame["moderation_stage"], frame["category"], strict=True)]
    ax.bar(labels, 100 * frame["rejection_rate"], color="tab:orange")
    ax.set_ylabel("% of all results")
    ax.tick_params(axis="x", labelsize=8)


def _plot_errors(ax: Any, frame: pd.DataFrame) -> None:
    frame = _numbers(frame, "error_rate")
    ax.bar([c or "(no code)" for c in frame["code"]], 100 * frame["error_rate"], color="tab:red")
    ax.set_ylabel("% of all results")
    ax.tick_params(axis="x", labelsize=8)


def _plot_cancellations(ax: Any, frame: pd.DataFrame) -> None:
    frame = _numbers(frame, "cancelled", "device_s_spent", "device_s_saved", "saved_unknown")
    labels = _joined(frame, "stage", "pool", "model")
    ax.barh(labels, frame["device_s_spent"], color="tab:gray", label="spent")
    ax.barh(labels, frame["device_s_saved"], left=frame["device_s_spent"], color="tab:green", label="saved")
    totals = frame["device_s_spent"].fillna(0) + frame["device_s_saved"].fillna(0)
    for i, (total, count, unknown) in enumerate(zip(totals, frame["cancelled"], frame["saved_unknown"], strict=True)):
        ax.text(total, i, f" {count:.0f} cancelled ({unknown:.0f} before rendering)", va="center", fontsize=8)
    ax.set_xlim(right=max(1.0, float(totals.max())) * 1.6)  # room for the labels
    ax.invert_yaxis()
    ax.set_xlabel("device seconds")
    ax.legend(fontsize=8)


def _plot_exposures(ax: Any, frame: pd.DataFrame) -> None:
    frame = _numbers(frame, "users").assign(arm=frame["experiment"] + ": " + frame["variant"])
    frame = frame.sort_values("minute", kind="stable")
    frame["cumulative"] = frame.groupby("arm")["users"].cumsum()
    frame["minute"] = _minutes(frame["minute"])
    for name, rows in frame.groupby("arm", sort=True):
        # From zero a minute before the arm's first exposure, so an arm filled within one minute still shows a rise.
        minutes = pd.concat([pd.Series([rows["minute"].min() - pd.Timedelta(minutes=1)]), rows["minute"]])
        users = [0, *rows["cumulative"]]
        ax.step(minutes, users, where="post", marker="o", label=f"{name} ({rows['users'].sum():.0f})")
    _time_axis(ax, frame["minute"])
    ax.set_ylabel("users exposed, cumulative")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


CHARTS = (
    Chart(
        "throughput",
        "Throughput (results per minute)",
        ("minute", "results", "succeeded", "rejected", "failed", "cancelled", "images"),
        _plot_throughput,
    ),
    Chart(
        "latency_by_stage_over_time",
        "Latency p50 / p95 by stage over time (ms)",
        ("minute", "stage", "p50_ms", "p95_ms"),
        _plot_latency_over_time,
    ),
    Chart(
        "latency_by_stage",
        "Latency p50 / p95 / p99 by stage (ms)",
        ("stage", "events", "p50_ms", "p95_ms", "p99_ms"),
        _plot_latency_by_stage,
    ),
    Chart(
        "queue_vs_compute",
        "Queue wait vs compute by stage, pool and model",
        ("stage", "pool", "model", "avg_queue_ms", "avg_compute_ms", "queue_share"),
        _plot_queue_vs_compute,
    ),
    Chart(
        "batch_size_distribution",
        "Batch-size distribution",
        ("stage", "batch_size", "events"),
        _plot_batch_sizes,
    ),
    Chart(
        "cost_per_image",
        "Cost per image by pool, model and variant (USD)",
        ("pool", "model", "variant", "total_cost_usd", "total_images", "usd_per_image"),
        _plot_cost_per_image,
    ),
    Chart(
        "rejection_rate_by_category",
        "Rejection rate by category",
        ("moderation_stage", "category", "rejections", "rejection_rate"),
        _plot_rejections,
    ),
    Chart(
        "error_rate_by_code",
        "Error rate by code",
        ("code", "failures", "error_rate"),
        _plot_errors,
    ),
    Chart(
        "cancellations",
        "Cancellations and device time saved by stage, pool and model",
        ("stage", "pool", "model", "cancelled", "device_s_spent", "device_s_saved", "saved_unknown"),
        _plot_cancellations,
    ),
    Chart(
        "experiment_exposures",
        "Experiment exposures (cumulative users per arm)",
        ("minute", "experiment", "variant", "users"),
        _plot_exposures,
    ),
    Chart(
        "rollout_decisions",
        "Rollout decisions (latest first)",
        (
            "event_time",
            "rollout",
            "action",
            "percent_before",
            "percent_after",
            "revision_after",
            "reason",
            "decided_by",
        ),
        None,
    ),
)


# -- rendering ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Panel:
    """One chart as rendered: its rows (empty when the window has none) or the error its query met."""

    chart: Chart
    rows: pd.DataFrame
    error: str | None = None


@dataclass(frozen=True)
class Dashboard:
    panels: list[Panel]
    html: str


def query(client: ClickHouseClient, chart: Chart, start: dt.datetime, end: dt.datetime) -> pd.DataFrame:
    """The chart's rows in the window, as a frame with the chart's columns."""
    rows = client.execute(expand_macros(chart.sql, start, end))
    if rows and len(rows[0]) != len(chart.columns):
        raise DashboardError(
            f"{chart.name}.sql returns {len(rows[0])} columns but the chart draws {len(chart.columns)}: "
            f"{', '.join(chart.columns)}"
        )
    return pd.DataFrame(rows, columns=list(chart.columns))


def render_dashboard(
    client: ClickHouseClient,
    start: dt.datetime,
    end: dt.datetime,
    source: str = "",
    refresh_s: int | None = None,
) -> Dashboard:
    """Run every chart's query in [start, end] and draw the page. A query that fails shows its error in its own
    panel rather than losing the others; ``refresh_s`` makes the page reload itself (for ``--serve``)."""
    panels = []
    for chart in CHARTS:
        try:
            panels.append(Panel(chart, query(client, chart, start, end)))
        except Exception as e:  # each backend raises its own errors; the panel shows which
            panels.append(Panel(chart, pd.DataFrame(columns=list(chart.columns)), f"{type(e).__name__}: {e}"))
    return Dashboard(panels, _page(panels, start, end, source, refresh_s))


def _page(panels: list[Panel], start: dt.datetime, end: dt.datetime, source: str, refresh_s: int | None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    window = f"{start.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} to {end.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC"
    figures = "".join(_figure(panel) for panel in panels)
    return (
        f"<!doctype html><html><head><meta charset=utf-8>{refresh}<title>pixelpipe dashboard</title>"
        f"<style>{_CSS}</style></head><body><h1>pixelpipe dashboard</h1>"
        f"<p class=window>{_e(window)}, from ClickHouse {_e(mask_secrets(source))}; rendered "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC</p><main>{figures}</main></body></html>"
    )


def _figure(panel: Panel) -> str:
    chart, rows = panel.chart, panel.rows
    if panel.error:
        body = f"<p class=error>query failed: {_e(panel.error)}</p>"
    elif rows.empty:
        body = f"<p class=empty>{EMPTY}</p>"
    else:
        table = rows.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0)
        if chart.plot is None:
            body = f"<div class=listing>{table}</div>"
        else:
            plt = _pyplot()
            fig, ax = plt.subplots(figsize=(7, 3.6))
            chart.plot(ax, rows)
            ax.grid(alpha=0.3)
            png = _png(fig)
            body = f'<img alt="{_e(chart.title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            body += f"<details><summary>{len(rows)} rows</summary>{table}</details>"
    error = f' data-error="{_e(panel.error)}"' if panel.error else ""
    return (
        f'<figure id="{chart.name}" data-rows="{len(rows)}"{error}><figcaption>{_e(chart.title)}</figcaption>'
        f"{body}<details><summary>SQL: analytics/dashboards/{chart.name}.sql</summary><pre>{_e(chart.sql)}</pre>"
        "</details></figure>"
    )


_CSS = (
    "body{font-family:sans-serif;max-width:1500px;margin:1em auto;color:#222}"
    "main{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:12px}"
    "figure{margin:0;border:1px solid #ddd;border-radius:4px;padding:8px}figcaption{font-weight:bold}"
    "img{max-width:100%}.window{color:#555}.empty{color:#777;padding:3em 0;text-align:center}.error{color:#a33}"
    "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 5px}"
    "pre{font-size:11px;overflow-x:auto}summary{color:#555;font-size:12px;cursor:pointer}"
    ".listing{max-height:330px;overflow:auto}"
)


def _pyplot():  # noqa: ANN202 - matplotlib is imported lazily, so there is no annotation to give
    import matplotlib

    matplotlib.use("Agg")  # no display: render to PNG bytes
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _e(text: object) -> str:
    return html.escape(str(text))


# -- serving ------------------------------------------------------------------------------------------------
def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def serve(
    render: Callable[[], str],
    port: int,
    refresh_s: float,
    on_error: Callable[[str], None],
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the latest page at http://127.0.0.1:PORT/ until interrupted, rendering it anew every ``refresh_s``.

    The standard library's http.server is enough for one page read by a few analysts on this machine and adds no
    dependency; it is bound to 127.0.0.1 only, since it has neither authentication nor TLS. A failed render keeps
    the last good page and reports the error."""
    page = {"html": render().encode()}
    stop = threading.Event()

    def rerender() -> None:
        while not stop.wait(refresh_s):
            try:
                page["html"] = render().encode()
            except Exception as e:  # keep serving the last page whatever went wrong
                on_error(f"render failed, still serving the last page: {type(e).__name__}: {e}")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server dispatches to
            if self.path.split("?", 1)[0] not in ("/", "/index.html"):
                self.send_error(404)
                return
            body = page["html"]
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # the base class's signature
            pass  # one line per page load would bury the render errors

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    # Ctrl-C and a service manager's stop end it alike, also where SIGINT came in ignored (a script's background job).
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _interrupt)
    thread = threading.Thread(target=rerender, name="dashboard-render", daemon=True)
    thread.start()
    if ready:
        ready(f"http://127.0.0.1:{server.server_address[1]}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.server_close()
        thread.join(timeout=60)
