"""The dashboards' SQL, the Grafana dashboard that holds it and the HTML page drawn from it, without ClickHouse.

The rule between Grafana and the SQL files: each panel's query is a file under analytics/dashboards/ verbatim, up
to whitespace, and each file is one panel's query; the only Grafana macro they may use is ``$__timeFilter(column)``,
which ``pixelpipe dashboard`` expands as Grafana's ClickHouse plugin does (tested on 18.16 and chDB in
tests/integration/test_clickhouse_sink.py)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from pixelpipe.analytics.dashboard import (
    CHARTS,
    DASHBOARDS_DIR,
    EMPTY,
    DashboardError,
    expand_macros,
    parse_since,
    render_dashboard,
)

ROOT = Path(__file__).resolve().parents[2]
GRAFANA_DASHBOARD = ROOT / "analytics" / "grafana" / "dashboards" / "pixelpipe.json"
SQL_FILES = sorted(DASHBOARDS_DIR.glob("*.sql"))
START = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
END = dt.datetime(2026, 11, 25, 13, 0, tzinfo=dt.UTC)


def whitespace_normalised(sql: str) -> str:
    return " ".join(sql.split())


def test_the_grafana_dashboard_is_valid_json_and_holds_each_dashboard_query_once():
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    queries = [target["rawSql"] for panel in dashboard["panels"] for target in panel["targets"]]
    files = {whitespace_normalised(path.read_text()): path.name for path in SQL_FILES}
    unknown = [sql[:80] for sql in queries if whitespace_normalised(sql) not in files]
    assert not unknown, f"panels whose query is no file under analytics/dashboards/: {unknown}"
    assert sorted(files[whitespace_normalised(sql)] for sql in queries) == sorted(files.values())
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_page_draws_every_dashboard_query_and_nothing_else():
    assert sorted(chart.name for chart in CHARTS) == sorted(path.stem for path in SQL_FILES)


@pytest.mark.parametrize("path", SQL_FILES, ids=lambda p: p.stem)
def test_every_macro_in_the_sql_is_one_the_page_expands(path):
    expanded = expand_macros(path.read_text(), START, END)
    assert "$__" not in expanded
    assert "toDateTime(1795608000)" in expanded and "toDateTime(1795611600)" in expanded


def test_time_filter_expands_as_grafanas_clickhouse_plugin_does():
    assert expand_macros("WHERE $__timeFilter(event_time) AND x", START, END) == (
        "WHERE event_time >= toDateTime(1795608000) AND event_time <= toDateTime(1795611600) AND x"
    )
    with pytest.raises(DashboardError, match=r"\$__timeInterval"):
        expand_macros("SELECT $__timeInterval(event_time)", START, END)


def test_since_takes_a_duration_or_a_utc_time():
    now = END
    assert parse_since("90m", now) == now - dt.timedelta(minutes=90)
    assert parse_since("7d", now) == now - dt.timedelta(days=7)
    assert parse_since("2026-11-25T12:00", now) == START
    with pytest.raises(DashboardError, match="neither a duration"):
        parse_since("yesterday", now)


class FakeClient:
    """Answers each chart's query with the rows given for its SQL file; fails the ones named in ``failing``."""

    def __init__(self, rows: dict[str, list[tuple]], failing: tuple[str, ...] = ()) -> None:
        self.by_sql = {whitespace_normalised(expand_macros(c.sql, START, END)): c.name for c in CHARTS}
        self.rows, self.failing = rows, failing

    def execute(self, sql: str) -> list[tuple]:
        name = self.by_sql[whitespace_normalised(sql)]
        if name in self.failing:
            raise RuntimeError("Code: 60. Table default.experiment_exposures doesn't exist")
        return self.rows.get(name, [])


def figures(page: str) -> dict[str, str]:
    return dict(re.findall(r'<figure id="(\w+)"(.*?)</figure>', page, re.S))


def test_an_empty_window_gives_every_chart_a_no_data_note_and_no_crash():
    page = render_dashboard(FakeClient({}), START, END, "chdb://./data/clickhouse")
    assert all(panel.rows.empty and panel.error is None for panel in page.panels)
    found = figures(page.html)
    assert sorted(found) == sorted(chart.name for chart in CHARTS)
    for name, figure in found.items():
        assert figure.startswith(' data-rows="0"'), name
        assert EMPTY in figure and "<img" not in figure, name


def test_charts_with_rows_are_inline_pngs_and_a_failing_query_stays_in_its_own_panel():
    minute = "2026-11-25 12:01:00"  # chDB's JSON gives strings, the server's driver datetimes: both are drawn
    rows = {
        "throughput": [(minute, 6, 3, 1, 1, 1, 4), (dt.datetime(2026, 11, 25, 12, 2), 2, 2, 0, 0, 0, 2)],
        "latency_by_stage_over_time": [(minute, "GENERATE", 400.0, 900.0), (minute, "MODERATION", 12.0, None)],
        "latency_by_stage": [("GENERATE", 5, 400.0, 900.0, 950.0)],
        "queue_vs_compute": [
            ("GENERATE", "tiny-sd", "tiny-sd", 300.0, 100.0, 0.75),
            ("MODERATION", "", "x", 1.0, 2.0, 0.3),
        ],
        "batch_size_distribution": [("GENERATE", 1, 4), ("GENERATE", 3, 3), ("EDIT", 1, 2)],
        "cost_per_image": [("tiny-sd", "tiny-sd", "control", 0.002, 10, 0.0002), ("", "tiny-sd", "", 0.001, 0, 0.0)],
        "rejection_rate_by_category": [("PROMPT", "violence", 1, 0.1)],
        "error_rate_by_code": [(None, 1, 0.1)],
        "cancellations": [
            ("GENERATE", "tiny-sd", "tiny-sd", 3, 0.5, 1.5, 1),
            ("MODERATION", "", "tiny-sd", 1, 0.0, 0.0, 1),
        ],
    }
    page = render_dashboard(FakeClient(rows, failing=("experiment_exposures",)), START, END, "clickhouse://u:pw@h/db")
    found = figures(page.html)
    assert {chart.name for chart in CHARTS if chart.plot is None} == {"rollout_decisions"}  # a listing, not a chart
    for name, chart_rows in rows.items():
        assert found[name].startswith(f' data-rows="{len(chart_rows)}"'), name
        assert '<img alt="' in found[name] and 'src="data:image/png;base64,' in found[name], name
    assert 'data-error="RuntimeError: Code: 60.' in found["experiment_exposures"]
    assert "query failed" in found["experiment_exposures"]
    assert ":pw@" not in page.html  # the password is masked
    assert "clickhouse://u:***@h/db" in page.html
    assert "<script" not in page.html and "http://" not in page.html and "https://" not in page.html


def test_a_listing_shows_its_rows_as_a_table_and_draws_no_image():
    decisions = [
        (
            dt.datetime(2026, 11, 25, 12, 40),
            "lcm",
            "ROLLBACK",
            5.0,
            0.0,
            3,
            "failure_rate breached",
            "rollout-controller:a",
        ),
        (
            "2026-11-25 12:10:00",
            "lcm",
            "ADVANCE",
            1.0,
            5.0,
            2,
            "every guardrail within its margin",
            "rollout-controller:a",
        ),
    ]
    page = render_dashboard(FakeClient({"rollout_decisions": decisions}), START, END)
    listing = figures(page.html)["rollout_decisions"]
    assert listing.startswith(' data-rows="2"') and "<img" not in listing
    table = listing.split("<div class=listing>")[1].split("</div>")[0]
    cells = re.findall(r"<td>(.*?)</td>", table)
    assert cells[:8] == [
        "2026-11-25 12:40:00",
        "lcm",
        "ROLLBACK",
        "5",
        "0",
        "3",
        "failure_rate breached",
        "rollout-controller:a",
    ]
    assert cells[8:11] == ["2026-11-25 12:10:00", "lcm", "ADVANCE"]  # the query's order: latest first


def test_the_page_reloads_itself_only_when_served():
    assert 'http-equiv="refresh"' not in render_dashboard(FakeClient({}), START, END).html
    assert '<meta http-equiv="refresh" content="15">' in render_dashboard(FakeClient({}), START, END, "", 15).html


def test_a_query_returning_other_columns_than_its_chart_draws_is_an_error_in_that_panel():
    page = render_dashboard(FakeClient({"error_rate_by_code": [("OOM", 1)]}), START, END)
    panel = next(p for p in page.panels if p.chart.name == "error_rate_by_code")
    assert panel.error and "returns 2 columns but the chart draws 3" in panel.error
    assert isinstance(panel.rows, pd.DataFrame) and panel.rows.empty
