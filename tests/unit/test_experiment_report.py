"""The experiments file, the analysis on chDB (in-process) with a planted effect, its error messages, the CLI,
the report's families, methods, verdicts and layout, and the HTML report rendered by headless Chromium."""

from __future__ import annotations

import dataclasses
import datetime
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from pixelpipe.analytics import report, report_html, report_text, stats
from pixelpipe.analytics import sufficient_stats as ss
from pixelpipe.analytics.cli import analyze as analyze_command
from pixelpipe.core.clickhouse import ChdbClient, connect
from pixelpipe.core.events import RolloutDecision
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
from pixelpipe.sinks.clickhouse.rows import ROLLOUT_COLUMNS, rollout_row

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
    assert latency["status"] == "ok" and latency["method"] == "CUPED"
    assert latency["abs_ci_low"] < -200 < latency["abs_ci_high"] and latency["abs_ci_high"] < 0
    assert latency["p_holm"] < 0.001
    assert res.loc[("all", "latency_p95"), "method"] == "quantile (Deng et al.)"
    assert {"EDIT", "GENERATE"} <= set(analysis.results["segment"])
    assert not analysis.srm.flagged
    looks = analysis.sequential.dropna()
    last = looks[looks["metric"] == "latency_ms"].iloc[-1]
    assert last["ci_low"] < -200 < last["ci_high"] < 0  # the always-valid interval covers the effect
    assert (looks["metric"] == "latency_p95").any()  # and the quantile metric has its own
    assert analysis.users_over_time.groupby("variant")["users"].max().sum() == 600
    table = analysis.table()
    assert "latency_ms" in table and "SRM: ok" in table


def test_cost_per_image_finds_the_cheaper_arm(chdb: ChdbClient):
    (row,) = report.analyze(chdb, STEPS, metrics=["cost_per_image"]).results.itertuples()
    assert row.method == "delta method" and row.rel_ci_high < 0


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
    # In a narrow window the page still fits: wide tables scroll inside their container.
    probe = tmp_path / "probe.html"
    script = "<script>document.body.dataset.fits = document.documentElement.scrollWidth <= innerWidth</script>"
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    narrow = [*flags, "--dump-dom", "--window-size=700,900", probe.resolve().as_uri()]
    dom = subprocess.run(narrow, check=True, timeout=60, capture_output=True, text=True).stdout
    assert 'data-fits="true"' in dom


@pytest.fixture(scope="module")
def full(chdb: ChdbClient) -> report.Analysis:
    """Every metric, no split: 4 goal metrics and 2 guardrails against one treatment."""
    return report.analyze(chdb, STEPS)


def test_holm_family_is_the_goal_metrics_only(full: report.Analysis):
    res = full.results.set_index("metric")
    goals = [m for m, metric in ss.METRICS.items() if not metric.guardrail]
    guardrails = [m for m, metric in ss.METRICS.items() if metric.guardrail]
    assert (len(goals), len(guardrails)) == (4, 2)
    assert set(res.loc[goals, "family"]) == {"goal"} and set(res.loc[guardrails, "family"]) == {"guardrail"}
    p = res.loc[goals, "p_value"].tolist()
    assert res.loc[goals, "p_holm"].tolist() == pytest.approx(stats.holm(p), rel=1e-12)
    # Over all six the smallest p would be multiplied by 6, not 4.
    six = stats.holm(res["p_value"].tolist())[: len(goals)]
    assert res.loc[goals, "p_holm"].tolist() != pytest.approx(six, rel=1e-6)
    assert res.loc[guardrails, "p_holm"].isna().all()
    # Guardrails: one-sided p for harm (an increase), half the two-sided p when the estimate points up.
    for r in res.loc[guardrails].itertuples():
        assert r.p_harm == pytest.approx(r.p_value / 2 if r.abs_lift > 0 else 1 - r.p_value / 2)
        assert r.verdict == ("guardrail breached" if r.p_harm < 0.05 else "ok")
    text = full.table()
    assert text.index("Goal metrics:") < text.index("Guardrails:")
    assert "Holm over 4 goal tests (4 metrics x 1 treatment)" in " ".join(text.split())


def test_each_method_is_named_in_the_results_and_the_table(full: report.Analysis, chdb: ChdbClient):
    welch = report.analyze(chdb, STEPS, metrics=["latency_ms"], pre_days=0)
    assert welch.results["method"].tolist() == ["Welch"]
    assert "no pre-period (--pre-days 0)" in welch.table()
    expected = {
        "latency_ms": "CUPED",
        "requests_per_user": "CUPED",
        "latency_p95": "quantile (Deng et al.)",
        "cost_per_image": "delta method",
        "rejection_rate": "delta method",
        "failure_rate": "delta method",
    }
    assert dict(zip(full.results["metric"], full.results["method"], strict=True)) == expected
    for analysis in (full, welch):
        lines = analysis.table().splitlines()
        for r in analysis.results.itertuples():
            (row,) = [line for line in lines if line.startswith(f"{r.metric} ")]
            assert f"  {r.method}  " in row


def test_cuped_reports_its_variance_reduction_and_coverage(full: report.Analysis):
    res = full.results.set_index("metric")
    for metric in ("latency_ms", "requests_per_user"):
        row = res.loc[metric]
        assert 0 < row["variance_reduction"] < 1 and 0 < row["pre_coverage"] <= 1
        line = next(n for n in full.method_notes() if n.startswith(metric))
        assert f"CUPED removed {row['variance_reduction']:.0%} of the lift's variance" in line
    # Every synthetic user sends a request before the start; a few have no succeeded one to average.
    assert res.loc["requests_per_user", "pre_coverage"] == 1
    assert 0.9 < res.loc["latency_ms", "pre_coverage"] < 1
    assert "the others get the covered users' mean" in " ".join(full.table().split())
    assert res.loc[["cost_per_image", "latency_p95"], "variance_reduction"].isna().all()


def test_a_planted_win_on_a_lower_is_better_metric_is_a_win(full: report.Analysis):
    res = full.results.set_index("metric")
    # The synthetic treatment is 200 ms faster and 20 % cheaper: both lifts are negative, and negative is good.
    for metric in ("latency_ms", "latency_p95", "cost_per_image"):
        assert ss.METRICS[metric].better == "lower"
        assert res.loc[metric, "abs_lift"] < 0 and res.loc[metric, "p_holm"] < 0.05
        assert res.loc[metric, "verdict"] == "win"
    assert res.loc["requests_per_user", "verdict"] == "inconclusive"  # nothing planted
    (row,) = [line for line in full.table().splitlines() if line.startswith("latency_ms ")]
    assert row.endswith("win") and "-8." in row  # a signed percentage


@pytest.mark.parametrize(
    ("metric", "lift", "p", "verdict"),
    [
        ("latency_ms", -10.0, 0.001, "win"),
        ("latency_ms", 10.0, 0.001, "loss"),
        ("requests_per_user", 0.5, 0.001, "win"),
        ("requests_per_user", -0.5, 0.001, "loss"),
        ("latency_ms", -10.0, 0.2, "inconclusive"),
        ("failure_rate", 0.01, 0.001, "guardrail breached"),  # a guardrail worsens: higher failure rate
        ("failure_rate", -0.01, 0.001, "ok"),  # it improves: no breach, however significant
        ("failure_rate", 0.01, 0.3, "ok"),
    ],
)
def test_verdicts_follow_each_metrics_direction(full: report.Analysis, metric, lift, p, verdict):
    """Rows rewritten with a planted lift and p-value get the verdict their metric's direction implies."""
    res = full.results.copy()
    i = res.index[res["metric"] == metric][0]
    res.loc[i, ["abs_lift", "p_value", "p_holm"]] = [lift, p, p]
    if ss.METRICS[metric].guardrail:
        res.loc[i, "p_harm"] = p / 2 if lift > 0 else 1 - p / 2
    assert report._verdict(res.loc[i], 0.05) == verdict


def test_cli_table_stays_within_120_characters_with_long_notes(analysis: report.Analysis):
    res = analysis.results.copy()
    guardrail = res.index[(res["metric"] == "failure_rate") & (res["segment"] == "all")][0]
    long_note = "the treatment arm's denominator sums to 0 over 12345 users; " * 8
    res.loc[guardrail, ["status", "note"]] = ["n/a", long_note]
    res.loc[guardrail, ["p_value", "p_harm", "rel_lift"]] = float("nan")
    res.loc[guardrail, "verdict"] = "n/a"
    # A second treatment brings a variant column; its long name must be cut, not widen the table.
    long_name = "fast-with-a-very-long-variant-name-that-nobody-should-use"
    res["variant"] = long_name
    two = dataclasses.replace(STEPS, variants=(*STEPS.variants, Variant(long_name)))
    noisy = dataclasses.replace(analysis, experiment=two, results=res, notes=[*analysis.notes, "x" * 300, long_note])
    text = noisy.table()
    lines = text.splitlines()
    assert max(map(len, lines)) <= report_text.TABLE_WIDTH
    assert max(map(len, analysis.table().splitlines())) <= report_text.TABLE_WIDTH
    # The note is below the tables, numbered, and the row points to it; it is not a column.
    (row,) = [line for line in lines if line.startswith("failure_rate ")]
    assert "n/a: see note 1" in row and "denominator" not in row
    assert re.search(r"  fast-with-a-\S+\.\.\.  ", row) and long_name not in row
    notes = text[text.index("\nNotes:") :]
    assert " ".join(notes.split()).count(" ".join(long_note.split())) == 2


def test_srm_banner_comes_first(analysis: report.Analysis):
    assert analysis.table().splitlines()[0].startswith("SRM: ok (p=")
    broken = dataclasses.replace(analysis, srm=stats.SrmResult(30.0, 1e-8, True, {"control": 300, "fast": 300}))
    first = broken.table().splitlines()[0]
    assert first.startswith("SRM: MISMATCH (p=1e-08)")
    page = broken.to_html()
    assert page.index('<section id="srm">') < page.index('<section id="goals">')
    assert 'class="banner bad"' in page and "do not trust any result below" in page


def test_power_note_sizes_each_goal_metric(full: report.Analysis):
    power = full.power.set_index("metric")
    goals = full.results[full.results["family"] == "goal"].set_index("metric")
    assert set(power.index) == set(goals.index)
    for metric, r in goals.iterrows():
        sd = stats.per_user_sd(r["std_error"], r["n_control"], r["n_treatment"])
        # Holm's strictest level over the 4 goal tests.
        assert power.loc[metric, "users_needed"] == stats.required_sample_size(r["control"], sd, 0.05, 0.05 / 4)
        assert power.loc[metric, "mde_now"] > 0
    text = " ".join(full.table().split())
    assert "users per arm to detect a 5% relative lift with 80% power, two-sided at 0.05/4" in text
    assert f"latency_ms: {int(power.loc['latency_ms', 'users_needed']):,} per arm" in text


def test_html_has_the_sections_verdicts_and_readable_numbers(full: report.Analysis):
    page = full.to_html()
    assert page.index('<section id="srm">') < page.index('<section id="goals">') < page.index('id="guardrails"')
    for header in ("relative lift [95% CI]", "p (Holm-adjusted)", "p (one-sided, harm)"):
        assert f"<th>{header}</th>" in page
    tables = page.split('<section id="lift">')[0]
    assert "rel_ci_low" not in tables and "p_holm" not in tables  # no column names
    assert not re.search(r"\de[-+]\d", tables)  # no exponents
    assert '<td class="verdict good">win</td>' in page
    assert re.search(r"<td class=\"num\">-\d+\.\d%", page)  # signed percentages
    assert "<div class=scroll>" in page


# -- a guarded rollout's ramp -------------------------------------------------------------------------------------
def _decision(rollout: str, sequence: int, action: str, before: float, after: float, reason: str) -> RolloutDecision:
    return RolloutDecision(
        event_id=f"{rollout}-{sequence}",
        event_time=datetime.datetime(2025, 1, 6, 12, tzinfo=datetime.UTC) + datetime.timedelta(hours=sequence),
        rollout=rollout,
        sequence=sequence,
        action=action,
        step=0,
        percent_before=before,
        percent_after=after,
        revision_before=sequence - 1,
        revision_after=sequence,
        reason=reason,
        decided_by="rollout-controller:test",
    )


@pytest.fixture(scope="module")
def ramp(chdb: ChdbClient) -> pd.DataFrame:
    """The ramp of rollout ramp-test: START at 1 %, held, advanced to 5 % (published twice), held twice, as the
    sink writes them; and another rollout's decision."""
    decisions = [
        _decision("ramp-test", 1, "START", 0, 1, "started by cli:ana"),
        _decision("ramp-test", 2, "HOLD", 1, 1, "control needs 120 more users"),
        _decision("ramp-test", 3, "ADVANCE", 1, 5, "every guardrail within its margin " * 6),
        _decision("ramp-test", 4, "HOLD", 5, 5, "treatment needs 300 more users"),
        _decision("ramp-test", 5, "HOLD", 5, 5, "treatment needs 20 more users"),
        _decision("other", 1, "START", 0, 1, "started by cli:bo"),
    ]
    rows = [rollout_row(d) for d in decisions]
    chdb.insert("rollout_decisions", ROLLOUT_COLUMNS, rows)
    chdb.insert("rollout_decisions", ROLLOUT_COLUMNS, rows[2:3])
    return report._ramp(chdb, "ramp-test")


def test_the_ramp_is_the_decisions_that_moved_the_rollout_and_where_it_stands(ramp: pd.DataFrame):
    assert ramp[["action", "percent_before", "percent_after", "revision"]].values.tolist() == [
        ["START", 0, 1, 1],
        ["ADVANCE", 1, 5, 3],
        ["HOLD", 5, 5, 5],  # the latest decision: why it holds now
    ]
    assert ramp["time"].tolist() == [datetime.datetime(2025, 1, 6, 12 + h, tzinfo=datetime.UTC) for h in (1, 3, 5)]
    assert ramp["reason"].iloc[-1] == "treatment needs 20 more users"


def test_the_report_shows_the_ramp_only_after_a_rollout(analysis: report.Analysis, ramp: pd.DataFrame):
    assert analysis.ramp.empty  # steps-test had no rollout
    assert "Rollout:" not in analysis.table()
    assert "No guarded rollout ramped it." in analysis.to_html()

    ramped = dataclasses.replace(analysis, ramp=ramp)
    lines = ramped.table().splitlines()
    assert max(map(len, lines)) <= report_text.TABLE_WIDTH  # the long reason is cut to fit
    start = lines.index(next(line for line in lines if line.startswith("Rollout: ")))
    header, *rows = lines[start + 2 : start + 6]
    assert header.split() == ["time", "(UTC)", "action", "treatment", "share", "revision", "reason"]
    assert rows[0].split() == ["2025-01-06", "13:00:00", "START", "0%", "->", "1%", "1", "started", "by", "cli:ana"]
    assert rows[1].split()[2:7] == ["ADVANCE", "1%", "->", "5%", "3"] and rows[1].endswith("...")
    assert rows[2].split()[2:7] == ["HOLD", "5%", "->", "5%", "5"]
    page = ramped.to_html()
    section = page.split('<section id="rollout">')[1].split("</section>")[0]
    assert section.count("<tr>") == 4 and "every guardrail within its margin " * 6 in section  # whole in the HTML


# -- an experiment ramped through two allocations ---------------------------------------------------------------
RAMPED = parse_experiments(
    {
        "experiments": [
            {
                "key": "ramped",
                "start": "2025-02-01",
                "end": "2025-02-15",
                "variants": [{"name": "control", "weight": 50}, {"name": "treatment", "weight": 50}],
            }
        ]
    }
)["ramped"]


@pytest.fixture(scope="module")
def ramped(chdb: ChdbClient) -> ChdbClient:
    """Revision 1 (the first week): 10 % of 1,000 users treated; revision 2 (the second): 50 % of 1,000 others.
    Everyone is a second slower in the second week, and the treatment changes nothing: pooled, the treatment
    (mostly second-week users) looks far slower than the control (mostly first-week ones)."""
    start_ms = int(RAMPED.start.timestamp() * 1000)
    week_ms = 7 * 86_400_000
    for revision, share, first_ms, latency in ((1, 10, start_ms, 1000), (2, 2, start_ms + week_ms, 2000)):
        arm = f"if(number % {share} = 0, 'treatment', 'control')"
        chdb.execute(
            "INSERT INTO results (event_id, request_id, schema_version, event_time_ms, status, kind, user_id,"
            " image_uris, moderation_stage, model, experiment_keys, experiment_variants, experiment_revisions,"
            " variant, request_created_at_ms)"
            f" SELECT concat('r{revision}-', toString(number)), concat('r{revision}-', toString(number)), 4,"
            f" {first_ms} + number * 600000 AS t, 'SUCCEEDED', 'GENERATE', concat('u{revision}-', toString(number)),"
            f" ['s3://pixelpipe/x'], '', 'tiny-sd', ['ramped'], [{arm}], [{revision}], {arm},"
            f" t - {latency} - cityHash64(number) % 200"
            " FROM numbers(1000)"
        )
    decisions = [_decision("ramped", 1, "START", 0, 10, "started"), _decision("ramped", 2, "ADVANCE", 10, 50, "ok")]
    chdb.insert("rollout_decisions", ROLLOUT_COLUMNS, [rollout_row(d) for d in decisions])
    return chdb


def test_a_ramped_experiment_is_analysed_within_one_allocation_not_pooled_across_them(ramped: ChdbClient):
    lift = {}
    for revision in (None, 1, 2):
        analysis = report.analyze(ramped, RAMPED, metrics=["latency_ms"], revision=revision)
        (row,) = analysis.results[analysis.results["segment"] == "all"].itertuples()
        lift[revision] = row
        assert not analysis.srm.flagged, (revision, analysis.srm_banner())
    # By default the latest allocation with results in both arms, said in the notes and the summary.
    assert "The window holds 2 allocations of ramped (revisions 1, 2)" in " ".join(
        report.analyze(ramped, RAMPED, metrics=["latency_ms"]).notes
    )
    assert lift[None].n_treatment == 500 and lift[1].n_treatment == 100 and lift[1].n_control == 900
    for row in lift.values():  # the treatment changes nothing, and no allocation shows otherwise
        assert row.abs_ci_low < 0 < row.abs_ci_high, row
    pooled = stats.mean_lift(*(stats.sufficient_stats_from_values(values) for values in _pooled_latencies(ramped)))
    assert pooled.rel_lift > 0.2  # what pooling both allocations would have claimed
    split = report.analyze(ramped, RAMPED, metrics=["latency_ms"], revision=1)
    assert "users assigned under revision 1" in split.summary() and "planned 90%/10% split" in split.srm_banner()
    with pytest.raises(report.AnalysisError, match="assigned under revision 7; revisions with results: 1, 2"):
        report.analyze(ramped, RAMPED, metrics=["latency_ms"], revision=7)


def _pooled_latencies(client: ChdbClient) -> list[list[float]]:
    rows = client.execute(
        "SELECT variant, groupArray(toFloat64(event_time_ms - request_created_at_ms)) FROM results_dedup"
        " WHERE has(experiment_keys, 'ramped') GROUP BY variant ORDER BY variant"
    )
    return [values for _, values in rows]  # control, treatment
