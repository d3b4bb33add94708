"""The per-arm sufficient statistics ClickHouse computes equal those computed in Python from the raw rows, on the
CI server (18.16) and on chDB's current engine; redelivered rows are counted once."""

from __future__ import annotations

import dataclasses
import datetime

import numpy as np
import pandas as pd
import pytest

from pixelpipe.analytics import report
from pixelpipe.analytics import sufficient_stats as ss
from pixelpipe.analytics.stats import ratio_stats_from_values, sufficient_stats_from_values
from pixelpipe.core.clickhouse import ChdbClient, ClickHouseClient, ServerClient
from pixelpipe.core.experiments import Experiment, Variant
from pixelpipe.sinks.clickhouse.migrate import apply_migrations

pytestmark = pytest.mark.integration

EXPERIMENT = Experiment(
    "steps-test",
    (Variant("control"), Variant("fast", 1.0, {"steps": 4})),
    datetime.datetime(2025, 1, 6, tzinfo=datetime.UTC),
    datetime.datetime(2025, 1, 20, tzinfo=datetime.UTC),
)
# A window inside the experiment, so rows on both sides of its edges are left out.
WINDOW = ss.Window.of(EXPERIMENT.start + datetime.timedelta(days=1), EXPERIMENT.start + datetime.timedelta(days=12), 7)


def _seed(client: ClickHouseClient) -> None:
    apply_migrations(client)
    ss.seed_synthetic(client, EXPERIMENT, users=300)
    ss.seed_synthetic(client, EXPERIMENT, users=300)  # every event redelivered: the dedup views must drop them


def _raw(client: ClickHouseClient) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The raw tables, deduplicated here by event_id, with each row's arm and period."""
    results = pd.DataFrame(
        client.execute(
            "SELECT event_id, user_id, event_time_ms, toString(status), request_created_at_ms, image_count,"
            " experiment_keys, experiment_variants, toString(kind) FROM results"
        ),
        columns=["event_id", "user_id", "t", "status", "created", "images", "keys", "variants", "kind"],
    )
    metrics = pd.DataFrame(
        client.execute(
            "SELECT event_id, user_id, event_time_ms, cost_usd, experiment_keys, experiment_variants FROM stage_metrics"
        ),
        columns=["event_id", "user_id", "t", "cost", "keys", "variants"],
    )
    assert len(results) == 2 * results["event_id"].nunique()  # the redelivery really is in the raw table
    frames = []
    for frame in (results, metrics):
        frame = frame.drop_duplicates("event_id").copy()
        frame["t"] = frame["t"].astype("int64")
        has_key = frame["keys"].map(lambda keys: EXPERIMENT.key in list(keys))
        frame["arm"] = [
            list(v)[list(k).index(EXPERIMENT.key)] if h else ""
            for k, v, h in zip(frame["keys"], frame["variants"], has_key, strict=True)
        ]
        frame["in_exp"] = has_key & (frame["t"] >= WINDOW.start_ms) & (frame["t"] < WINDOW.end_ms)
        frame["in_pre"] = (frame["t"] >= WINDOW.pre_start_ms) & (frame["t"] < WINDOW.start_ms)
        frames.append(frame)
    return frames[0], frames[1]


def _per_user(results: pd.DataFrame, metrics: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Per-user values computed in pandas, as the SQL's users layer should."""
    results = results.assign(
        ok=results["status"] == "SUCCEEDED",
        latency=lambda r: np.where(r["status"] == "SUCCEEDED", r["t"] - r["created"].astype("int64"), 0.0),
    )
    keys = ["user_id", by] if by else ["user_id"]
    exp, pre = results[results["in_exp"]], results[results["in_pre"]]
    users = (
        pd.concat([exp[["user_id", *([by] if by else []), "arm"]], metrics[metrics["in_exp"]][["user_id", "arm"]]])
        .drop_duplicates(keys)
        .set_index(keys)
    )
    g = exp.groupby(keys)
    users["requests"] = g.size()
    users["successes"] = g["ok"].sum()
    users["rejected"] = g["status"].apply(lambda s: (s == "REJECTED").sum())
    users["failed"] = g["status"].apply(lambda s: (s == "FAILED").sum())
    users["latency_sum"] = g["latency"].sum()
    users["images"] = exp[exp["ok"]].groupby(keys)["images"].sum()
    users["cost"] = metrics[metrics["in_exp"]].groupby("user_id")["cost"].sum() if not by else 0.0
    pg = pre.groupby(keys)
    users["pre_requests"], users["pre_successes"], users["pre_latency_sum"] = (
        pg.size(),
        pg["ok"].sum(),
        pg["latency"].sum(),
    )
    return users.fillna(0.0).astype({c: float for c in users.columns if c != "arm"})


def _same(got: object, expected: object) -> None:
    """Equal statistics, to rounding: ClickHouse and numpy sum in different orders."""
    pairs = zip(dataclasses.astuple(got), dataclasses.astuple(expected), strict=True)
    assert all(b is None if a is None else a == pytest.approx(b, rel=1e-9) for a, b in pairs), (got, expected)


def _check_arm_stats(sql_row: pd.Series, users: pd.DataFrame) -> None:
    """Each metric's statistics from SQL equal stats.py's own from the per-user values."""
    assert int(sql_row["users"]) == len(users)
    ok = users[users["successes"] > 0]
    latency = ok["latency_sum"] / ok["successes"]
    # No succeeded pre-period request: no pre-period value (NaN), left out of the covariate's sums.
    pre_latency = np.where(ok["pre_successes"] > 0, ok["pre_latency_sum"] / ok["pre_successes"].clip(lower=1), np.nan)
    expected_mean = {
        "latency_ms": sufficient_stats_from_values(latency, pre_latency),
        "requests_per_user": sufficient_stats_from_values(users["requests"], users["pre_requests"]),
    }
    for name, expected in expected_mean.items():
        _same(ss.mean_stats(sql_row, name, True), expected)
    active = users[users["requests"] > 0]
    expected_ratio = {
        "cost_per_image": ratio_stats_from_values(users["cost"], users["images"]),
        "rejection_rate": ratio_stats_from_values(active["rejected"], active["requests"]),
        "failure_rate": ratio_stats_from_values(active["failed"], active["requests"]),
    }
    for name, expected in expected_ratio.items():
        _same(ss.ratio_stats(sql_row, name), expected)


def _check_against_python(client: ClickHouseClient) -> None:
    _seed(client)
    results, metrics = _raw(client)
    users = _per_user(results, metrics)

    overall = ss.fetch_arm_stats(client, EXPERIMENT.key, WINDOW, list(ss.METRICS.values()))
    assert list(overall["arm"]) == ["control", "fast"]
    for _, row in overall.iterrows():
        _check_arm_stats(row, users[users["arm"] == row["arm"]])

    # Per dimension value: users are split by the kind of their requests.
    by_kind = _per_user(results, metrics, by="kind")
    results_metrics = [m for m in ss.METRICS.values() if not m.needs_stage_metrics]
    split = ss.fetch_arm_stats(client, EXPERIMENT.key, WINDOW, results_metrics, "kind")
    assert len(split) == 4
    for _, row in split.iterrows():
        part = by_kind.xs(row["dim"], level="kind")
        part = part[part["arm"] == row["arm"]]
        assert int(row["users"]) == len(part)
        expected = sufficient_stats_from_values(part.query("successes > 0").eval("latency_sum / successes"))
        _same(ss.mean_stats(row, "latency_ms", False), expected)

    # A look part-way through sees only the users and events before it.
    cutoff = WINDOW.start_ms + 5 * 86_400_000
    looks = ss.fetch_cumulative(client, EXPERIMENT.key, WINDOW, ss.METRICS["latency_ms"], [cutoff, WINDOW.end_ms])
    early = _per_user(results[results["t"] < cutoff], metrics[metrics["t"] < cutoff])
    for _, row in looks[looks["cutoff_ms"] == cutoff].iterrows():
        arm = early[(early["arm"] == row["arm"]) & (early["requests"] > 0)]
        ok = arm[arm["successes"] > 0]
        assert int(row["users"]) == len(arm)
        expected = sufficient_stats_from_values(ok["latency_sum"] / ok["successes"])
        _same(ss.mean_stats(row, "latency_ms", False), expected)

    # The quantile metric's values: each user's mean latency, no user ids.
    values = ss.fetch_values(client, EXPERIMENT.key, WINDOW, ss.METRICS["latency_p95"])
    for arm, got in values.items():
        ok = users[(users["arm"] == arm) & (users["successes"] > 0)]
        np.testing.assert_allclose(np.sort(got), np.sort(ok["latency_sum"] / ok["successes"]), rtol=1e-12)

    analysis = report.analyze(client, EXPERIMENT, min_users_per_arm=50)
    latency = analysis.results.set_index("metric").loc["latency_ms"]
    assert latency["abs_ci_high"] < 0  # the planted 150 ms speed-up


def test_sufficient_stats_on_the_ci_server(server_client: ServerClient) -> None:
    _check_against_python(server_client)


def test_sufficient_stats_on_chdb(chdb_client: ChdbClient) -> None:
    _check_against_python(chdb_client)
