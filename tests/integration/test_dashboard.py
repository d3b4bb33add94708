"""`pixelpipe dashboard` on what the demo's pipeline wrote to ClickHouse (chDB), as headless Chromium renders it:
every chart the demo feeds has rows and an image Chromium decoded, and the totals are the demo's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pixelpipe.analytics.dashboard import CHARTS, EMPTY, query
from pixelpipe.core.clickhouse import connect
from tests.conftest import free_port

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Appended to a copy of the page, for this test only: Chromium dumps the DOM after the load event, by which time
# every image has decoded, so each figure can say how wide its image came out (0 for one that did not decode).
MEASURE_IMAGES = (
    "<script>window.addEventListener('load', () => document.querySelectorAll('figure').forEach(f => {"
    "const img = f.querySelector('img'); f.dataset.imageWidth = img ? img.naturalWidth : 0; }));</script>"
)
# The demo ramps no rollout, so the rollout decisions' listing stays empty (test_dashboards.py draws one).
DEMO_CHARTS = [chart.name for chart in CHARTS if chart.name != "rollout_decisions"]


class Figures(HTMLParser):
    """Each <figure>'s attributes, and whether an <img> with an inline PNG sits inside it."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.figures: dict[str, dict[str, str]] = {}
        self._current: str | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "figure":
            self._current = values["id"]
            self.figures[self._current] = values
        elif tag == "img" and self._current and values.get("src", "").startswith("data:image/png;base64,"):
            self.figures[self._current]["png"] = values["src"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._current = None


def dashboard(url: str, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PIXELPIPE_CLICKHOUSE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "pixelpipe", "dashboard", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def chromium_dom(page: Path, tmp_path: Path) -> str:
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def demo_clickhouse(demo_run) -> str:
    assert demo_run.done.returncode == 0, demo_run.done.stdout[-3000:] + demo_run.done.stderr[-3000:]
    return demo_run.clickhouse_url


def test_every_chart_of_the_demos_clickhouse_has_data_as_chromium_renders_it(demo_clickhouse, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium (scripts/setup.sh installs it)")
    out = tmp_path / "dashboard.html"
    done = dashboard(demo_clickhouse, tmp_path, "--out", str(out), "--since", "3h")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    page = out.read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    written = Figures(page).figures
    assert sorted(written) == sorted(chart.name for chart in CHARTS)

    measured = tmp_path / "measured.html"
    measured.write_text(page.replace("</body>", MEASURE_IMAGES + "</body>"))
    rendered = Figures(chromium_dom(measured, tmp_path)).figures
    assert sorted(rendered) == sorted(written), "Chromium's DOM lost a chart"
    assert rendered["rollout_decisions"]["data-rows"] == "0"
    for name, figure in ((name, rendered[name]) for name in DEMO_CHARTS):
        assert int(figure["data-rows"]) > 0, f"{name}: no rows ({figure.get('data-error', EMPTY)})"
        assert "data-error" not in figure, f"{name}: {figure['data-error']}"
        assert figure.get("png") == written[name]["png"], f"{name}: no chart image in Chromium's DOM"
        assert int(figure["data-image-width"]) > 200, f"{name}: Chromium did not decode its image"


def test_the_charts_add_up_to_the_demos_requests(demo_clickhouse):
    import datetime as dt

    end = dt.datetime.now(dt.UTC)
    client = connect(demo_clickhouse)
    try:
        rows = {chart.name: query(client, chart, end - dt.timedelta(hours=3), end) for chart in CHARTS}
    finally:
        client.close()
    throughput = rows["throughput"]
    # The demo's 20 requests, one of them cancelled, and its two calls through the gateway: one image, one prompt
    # blocked.
    assert (throughput["results"].sum(), throughput["succeeded"].sum()) == (22, 17)
    assert (throughput["rejected"].sum(), throughput["failed"].sum(), throughput["cancelled"].sum()) == (3, 1, 1)
    cancellations = rows["cancellations"]
    assert cancellations[["stage", "cancelled", "saved_unknown"]].values.tolist() == [["GENERATE", 1, 1]]
    assert rows["rejection_rate_by_category"]["rejections"].sum() == 3
    assert rows["error_rate_by_code"][["code", "failures"]].values.tolist() == [["DEADLINE_EXCEEDED", 1]]
    assert set(rows["latency_by_stage"]["stage"]) == {"MODERATION", "GENERATE", "EDIT", "OUTPUT_MODERATION"}
    assert rows["batch_size_distribution"]["events"].sum() == rows["latency_by_stage"]["events"].sum()
    assert set(rows["cost_per_image"]["variant"]) == {"steps-test:control", "steps-test:fast"}
    # No pool configured: every render ran in the default pool, moderation named it for each request it routed there,
    # and every image counts there.
    queue = rows["queue_vs_compute"]
    assert set(queue[queue["stage"] != "MODERATION"]["pool"]) == {"default"}
    assert "default" in set(queue[queue["stage"] == "MODERATION"]["pool"])
    cost = rows["cost_per_image"]
    assert cost[cost["pool"] != "default"]["total_images"].sum() == 0 < cost["total_images"].sum()
    exposures = rows["experiment_exposures"]
    assert set(exposures["variant"]) == {"control", "fast"} and set(exposures["experiment"]) == {"steps-test"}


def test_an_empty_clickhouse_gives_every_chart_a_no_data_note(tmp_path):
    url = f"chdb://{tmp_path / 'empty'}"
    env = os.environ | {"PIXELPIPE_CLICKHOUSE_URL": url}
    migrated = subprocess.run(
        [sys.executable, "-m", "pixelpipe", "clickhouse", "migrate"], env=env, capture_output=True, text=True
    )
    assert migrated.returncode == 0, migrated.stderr
    done = dashboard(url, tmp_path, "--out", "empty.html")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    figures = Figures((tmp_path / "empty.html").read_text()).figures
    assert len(figures) == len(CHARTS)
    assert all(figure["data-rows"] == "0" and "png" not in figure for figure in figures.values())
    assert (tmp_path / "empty.html").read_text().count(EMPTY) == len(CHARTS)


def test_served_dashboard_is_rendered_again_every_refresh(demo_clickhouse, tmp_path):
    port = free_port()
    env = os.environ | {"PIXELPIPE_CLICKHOUSE_URL": demo_clickhouse}
    server = subprocess.Popen(
        [sys.executable, "-m", "pixelpipe", "dashboard", "--serve", "--port", str(port), "--refresh", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        pages, deadline = [], time.monotonic() + 240
        while len(set(pages)) < 2 and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
                    pages.append(response.read().decode())
            except OSError:
                pass  # not listening yet
            time.sleep(1)
        assert len(set(pages)) >= 2, "the page was not rendered again"
        figures = Figures(pages[-1]).figures
        assert all(int(figures[name]["data-rows"]) > 0 for name in DEMO_CHARTS), figures.keys()
        assert '<meta http-equiv="refresh" content="2">' in pages[-1]
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/elsewhere", timeout=30)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            output = server.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            server.kill()  # a server that ignored Ctrl-C must not outlive the test
            output = server.communicate()[0]
            pytest.fail(f"the server did not stop within 60 s of SIGINT:\n{output}")
    assert server.returncode == 0, output
    assert f"serving http://127.0.0.1:{port}/" in output
