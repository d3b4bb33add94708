"""The experiments file, the analysis on chDB (in-process) with a planted effect, its error messages, the CLI,
and the HTML report rendered by headless Chromium."""

from __future__ import annotations

import dataclasses
import datetime
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from pixelpipe.analytics import report, report_html
from pixelpipe.analytics import sufficient_stats as ss
from pixelpipe.analytics.cli import analyze as analyze_command
from pixelpipe.core.clickhouse import ChdbClient, connect
from pixelpipe.core.experiments import (
    Experiment,
    ExperimentConfigError,
    UnknownExperimentError,
    Variant,
    assign_variant,
    get_experiment,
    load_experiments,
    parse_experiments,
)
from pixelpipe.sinks.clickhouse.migrate import apply_migrations

EXAMPLE = Path(__file__).parents[2] / "analytics" / "experiments.example.json"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _spec(**changes: object) -> dict:
    spec = {"key": "k", "start": "2025-01-06", "variants": [{"name": "a"}, {"name": "b", "overrides": {"steps": 4}}]}
    return {"experiments": [spec | changes]}


def test_example_file_loads_with_overrides_and_defaults():
    experiments = load_experiments(EXAMPLE)
    steps = experiments["steps-test"]
    assert steps.control == "control" and steps.treatments == ["fast"]
    assert steps.overrides_for("fast") == {"steps": 4, "scheduler": "lcm", "guidance": 1.5}
    assert steps.overrides_for("control") == {}
    assert steps.start == datetime.datetime(2025, 1, 6, tzinfo=datetime.UTC)
    model = experiments["model-test"]
    assert model.control == "tiny-sd" and model.end is None  # first variant; still running
    with pytest.raises(KeyError, match="variants: \\['control', 'fast'\\]"):
        steps.overrides_for("slow")


def test_assignment_is_the_producers_hash_and_stable():
    steps = load_experiments(EXAMPLE)["steps-test"]
    arms = [steps.assign(f"user-{i}") for i in range(2000)]
    assert arms == [assign_variant("steps-test", f"user-{i}", {"control": 1, "fast": 1}) for i in range(2000)]
    assert arms == [steps.assign(f"user-{i}") for i in range(2000)]
    assert 900 < arms.count("fast") < 1100


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"variants": [{"name": "a"}]}, "two or more uniquely named variants"),
        ({"variants": [{"name": "a"}, {"name": "b", "overrides": {"seed": 1}}]}, "may override model, steps"),
        ({"variants": [{"name": "a"}, {"name": "b", "overrides": {"steps": "4"}}]}, "steps='4' has the wrong type"),
        ({"variants": [{"name": "a", "weight": -1}, {"name": "b"}]}, "weight -1"),
        ({"control": "c"}, "control 'c' is not one of"),
        ({"end": "2025-01-01"}, "is not after start"),
        ({"start": "next week"}, "Invalid isoformat"),
        ({"colour": "red"}, "unknown fields \\['colour'\\]"),
    ],
)
def test_invalid_experiments_are_refused_with_the_reason(changes, message):
    with pytest.raises(ExperimentConfigError, match=message):
        parse_experiments(_spec(**changes))


def test_unknown_experiment_lists_those_that_exist():
    with pytest.raises(UnknownExperimentError, match=r"unknown experiment 'nope'.*defines: model-test, steps-test"):
        get_experiment(load_experiments(EXAMPLE), "nope")


STEPS = load_experiments(EXAMPLE)["steps-test"]
END = STEPS.end or STEPS.start


@pytest.fixture(scope="module")
def chdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbClient]:
    client = connect(f"chdb://{tmp_path_factory.mktemp('chdb')}")
    assert isinstance(client, ChdbClient)
    apply_migrations(client)
    ss.seed_synthetic(client, STEPS, users=600, latency_effect_ms=-200.0)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def analysis(chdb: ChdbClient) -> report.Analysis:
    return report.analyze(chdb, STEPS, dimension="kind", metrics=[m for m in ss.METRICS if m != "cost_per_image"])


def test_analysis_finds_the_planted_latency_effect(analysis: report.Analysis):
    res = analysis.results.set_index(["segment", "metric"])
    latency = res.loc[("all", "latency_ms")]
    assert latency["status"] == "ok" and latency["method"] == "cuped"
    assert latency["abs_ci_low"] < -200 < latency["abs_ci_high"] and latency["abs_ci_high"] < 0
    assert latency["p_holm"] < 0.001
    assert res.loc[("all", "latency_p95"), "method"] == "quantile (DKY)"
    assert {"EDIT", "GENERATE"} <= set(analysis.results["segment"])
    assert not analysis.srm.flagged
    last = analysis.sequential.dropna().iloc[-1]
    assert last["ci_low"] < -200 < last["ci_high"] < 0  # the always-valid interval covers the effect
    assert analysis.users_over_time.groupby("variant")["users"].max().sum() == 600
    table = analysis.table()
    assert "latency_ms" in table and "SRM: ok" in table


def test_cost_per_image_finds_the_cheaper_arm(chdb: ChdbClient):
    (row,) = report.analyze(chdb, STEPS, metrics=["cost_per_image"]).results.itertuples()
    assert row.method == "delta" and row.rel_ci_high < 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": ["latency_ms", "joy"]}, "unknown metric\\(s\\) 'joy'; metrics that exist: latency_ms,"),
        ({"dimension": "colour"}, "unknown dimension 'colour'; dimensions that exist: kind, model"),
        ({"dimension": "kind", "metrics": ["cost_per_image"]}, "stage metrics have no kind"),
        ({"start": END, "end": END}, "empty date range: .* runs from 2025-01-06 00:00 to 2025-01-20 00:00"),
        (
            {"start": END + datetime.timedelta(days=1), "end": END + datetime.timedelta(days=5)},
            "empty date range",
        ),
    ],
)
def test_bad_requests_say_what_exists(chdb: ChdbClient, kwargs, message):
    with pytest.raises(report.AnalysisError, match=message):
        report.analyze(chdb, STEPS, **kwargs)


def test_a_window_without_data_names_where_the_data_is(chdb: ChdbClient):
    later = dataclasses.replace(STEPS, end=None)  # a window after the last event
    with pytest.raises(report.AnalysisError, match=r"no users .* its \d+ results span 2025-01-06 .* to 2025-01-19"):
        report.analyze(chdb, later, start=END + datetime.timedelta(days=1), now=END + datetime.timedelta(days=9))


def test_a_variant_without_users_is_named(chdb: ChdbClient):
    three = dataclasses.replace(STEPS, variants=(*STEPS.variants, Variant("slow", 1.0)))
    with pytest.raises(
        report.AnalysisError, match=r"variant\(s\) \['slow'\] .* no users .*control=\d+, fast=\d+, slow=0"
    ):
        report.analyze(chdb, three)
    other = Experiment("steps-test", (Variant("control"), Variant("turbo")), STEPS.start, STEPS.end)
    with pytest.raises(
        report.AnalysisError, match="variant\\(s\\) \\['fast'\\] that the experiments file does not define"
    ):
        report.analyze(chdb, other)


def test_a_small_sample_says_how_many_users_are_needed(chdb: ChdbClient):
    small = report.analyze(chdb, STEPS, metrics=["latency_ms"], min_users_per_arm=1000)
    (row,) = small.results.itertuples()
    assert row.status == "too small" and row.abs_ci_low != row.abs_ci_low  # NaN: no interval printed
    assert re.search(r"need 1000 per arm \(control needs \d+ more, fast needs \d+ more\)", row.note)
    assert "need 1000 per arm" in small.table()
    assert small.sequential["abs_lift"].isna().all()
    assert small.min_users_per_arm == 1000  # what the sequential plot says is missing
    (option,) = [p for p in analyze_command.params if p.name == "min_users"]
    assert option.default == report.DEFAULT_MIN_USERS_PER_ARM


def test_cli_prints_the_table_and_writes_the_report(chdb: ChdbClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    class Shared:  # the module's chDB session: chDB allows one data directory per process
        execute = staticmethod(chdb.execute)

        def close(self) -> None:
            pass

    monkeypatch.setattr("pixelpipe.core.clickhouse.connect", lambda url: Shared())
    out = tmp_path / "r.html"
    args = ["steps-test", "--experiments", str(EXAMPLE), "--metrics", "latency_ms,rejection_rate", "--html", str(out)]
    result = CliRunner().invoke(analyze_command, [*args, "--clickhouse-url", "chdb://x"])
    assert result.exit_code == 0, result.output
    assert "latency_ms" in result.output and "rejection_rate" in result.output and out.exists()

    bad = CliRunner().invoke(analyze_command, ["nope", "--experiments", str(EXAMPLE)])
    assert bad.exit_code == 1 and "defines: model-test, steps-test" in bad.output
    bad = CliRunner().invoke(analyze_command, [*args[:3], "--metrics", "joy", "--clickhouse-url", "chdb://x"])
    assert bad.exit_code == 1 and "metrics that exist" in bad.output


def test_html_report_is_self_contained(analysis: report.Analysis):
    page = analysis.to_html()
    for section in report_html.SECTIONS:
        assert f'<section id="{section}">' in page
    assert page.count("data:image/png;base64,") == 4
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing to fetch from a server


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(analysis: report.Analysis, tmp_path: Path):
    page = analysis.write_html(tmp_path / "report.html")
    shot = tmp_path / "report.png"
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = page.resolve().as_uri()
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1280,4000", url], check=True, timeout=60, capture_output=True
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    dom = subprocess.run([*flags, "--dump-dom", url], check=True, timeout=60, capture_output=True, text=True).stdout
    assert set(re.findall(r'<section id="(\w+)"', dom)) == set(report_html.SECTIONS)
    assert dom.count('<img alt="plot" src="data:image/png;base64,') == 4
