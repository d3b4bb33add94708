"""Per-arm sufficient statistics of experiment metrics, computed in ClickHouse.

Every query has the same three layers, so a reader can check one and trust the rest:

1. events: rows of ``results_dedup`` (and ``stage_metrics_dedup`` for cost) in the experiment window that carry
   the experiment key, plus every row of the same users in the pre-period (before the start, when requests
   carry no assignment yet: the CUPED covariate). The arm is ``experiment_variants[indexOf(experiment_keys, K)]``.
2. users: one row per user (and dimension value): counts and sums over that user's events.
3. arms: per arm (and dimension value) only counts, sums, sums of squares and cross products of the per-user
   values. Only this layer leaves ClickHouse, so no per-user row is ever transferred.

CUPED's covariate is the same per-user value over the pre-period. A user without one (no pre-period request, or
for latency no succeeded one) is not written as 0, which would look like a real, extreme value and weaken the
adjustment: the covariate sums (``__pre_sum``, ``__pre_sum_sq``, ``__cross_sum``) run over the users that
``Metric.pre_users`` says have a value, ``__pre_n`` counts them and ``__pre_y_sum`` sums their y. From these
``stats.cuped_lift`` imputes the covered users' mean for the rest exactly, without a second pass over the data.

The one exception is quantile metrics (``latency_p95``): a quantile has no sufficient statistic, so their query
returns, per arm, an array of per-user values (no user ids), capped at ``QUANTILE_SAMPLE_CAP`` users per arm.

The SQL sticks to what ClickHouse 18.16 (CI's server) and current engines (chDB) both accept: no JOIN (a
UNION ALL of both tables is grouped instead), no window functions, -If combinators, lambdas in arrayFilter.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from pixelpipe.analytics.stats import MeanStats, RatioStats
from pixelpipe.core.experiments import Experiment

QUANTILE_SAMPLE_CAP = 100_000  # users per arm whose values a quantile metric pulls


class Client(Protocol):
    def execute(self, sql: str) -> list[tuple[Any, ...]]: ...


@dataclass(frozen=True)
class Metric:
    """A metric defined over the per-user columns of ``_USER_COLUMNS``.

    ``users`` selects the users the metric is defined for (e.g. latency needs a succeeded request); ``value``
    (mean and quantile metrics) or ``num`` / ``den`` (ratio metrics) are per-user SQL expressions. ``better`` says
    which way is a win (a loss, for a guardrail: a breach). ``pre_users`` selects the users that have a
    pre-period value; the others get the covered users' mean (see the module's docstring).
    """

    name: str
    kind: Literal["mean", "ratio", "quantile"]
    description: str
    better: Literal["higher", "lower"]
    unit: Literal["", "ms", "USD", "share"] = ""  # "share" is shown as a percentage
    users: str = "1"
    value: str = ""
    pre_value: str = ""  # the same per-user value in the pre-period, for CUPED; mean metrics only
    pre_users: str = "1"
    num: str = ""
    den: str = ""
    q: float = 0.5
    guardrail: bool = False
    needs_stage_metrics: bool = False


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "latency_ms",
            "mean",
            "mean end-to-end latency of a user's succeeded requests (result time - request created), ms",
            "lower",
            "ms",
            users="successes > 0",
            value="latency_sum / successes",
            pre_value="pre_latency_sum / pre_successes",
            pre_users="pre_successes > 0",  # no succeeded request before: no latency to average
        ),
        Metric(
            "latency_p95",
            "quantile",
            "95th percentile over users of their mean latency, ms",
            "lower",
            "ms",
            users="successes > 0",
            value="latency_sum / successes",
            q=0.95,
        ),
        Metric(
            "requests_per_user",
            "mean",
            "requests (terminal results) per user",
            "higher",
            value="requests",
            pre_value="pre_requests",
            # A count: a user with no pre-period request made 0, a real value (new users send fewer), not a gap.
            pre_users="1",
        ),
        Metric(
            "cost_per_image",
            "ratio",
            "cost in USD over all stages per successfully generated image",
            "lower",
            "USD",
            num="cost",
            den="images",
            needs_stage_metrics=True,
        ),
        Metric(
            "rejection_rate",
            "ratio",
            "share of requests rejected by moderation",
            "lower",
            "share",
            users="requests > 0",
            num="rejected",
            den="requests",
            guardrail=True,
        ),
        Metric(
            "failure_rate",
            "ratio",
            "share of requests that failed",
            "lower",
            "share",
            users="requests > 0",
            num="failed",
            den="requests",
            guardrail=True,
        ),
    )
}

# Columns a result may be split by; stage_metrics has no kind, so cost cannot be split by kind.
DIMENSIONS: dict[str, dict[str, str | None]] = {
    "kind": {"results": "toString(kind)", "stage_metrics": None},
    "model": {"results": "model", "stage_metrics": "model"},
}

_NO_DIMENSION: dict[str, str | None] = {"results": "''", "stage_metrics": "''"}

# Per-user columns (layer 2) from the event columns (layer 1).
_USER_COLUMNS = {
    "requests": "sumIf(e_request, in_exp)",
    "successes": "sumIf(e_success, in_exp)",
    "rejected": "sumIf(e_rejected, in_exp)",
    "failed": "sumIf(e_failed, in_exp)",
    "latency_sum": "sumIf(e_latency, in_exp)",
    "images": "sumIf(e_images, in_exp)",
    "cost": "sumIf(e_cost, in_exp)",
    "pre_requests": "sumIf(e_request, in_pre)",
    "pre_successes": "sumIf(e_success, in_pre)",
    "pre_latency_sum": "sumIf(e_latency, in_pre)",
}


@dataclass(frozen=True)
class Window:
    """Experiment window [start, end) and pre-period [pre_start, start), in epoch milliseconds (UTC); with a
    ``revision``, only the events assigned under that revision of the experiment (one allocation)."""

    start_ms: int
    end_ms: int
    pre_start_ms: int
    revision: int | None = None

    @classmethod
    def of(cls, start: datetime.datetime, end: datetime.datetime, pre_days: int) -> Window:
        start_ms = _ms(start)
        return cls(start_ms, _ms(end), start_ms - pre_days * 86_400_000)


def unknown_metric_message(names: Sequence[str]) -> str | None:
    unknown = [n for n in names if n not in METRICS]
    if not unknown:
        return None
    return f"unknown metric(s) {', '.join(map(repr, unknown))}; metrics that exist: {', '.join(METRICS)}"


@dataclass(frozen=True)
class Query:
    sql: str
    columns: list[str]  # names of the returned columns, in order


def arm_stats_sql(key: str, window: Window, metrics: Sequence[Metric], dimension: str | None = None) -> Query:
    """One row per (arm, dim): users, users seen in several arms, and each metric's sufficient statistics."""
    aggregates = ["count() AS users", "countIf(arms_seen > 1) AS users_in_several_arms"]
    for m in metrics:
        aggregates += _metric_aggregates(m)
    dims = DIMENSIONS[dimension] if dimension else _NO_DIMENSION
    return _arm_query(key, window, metrics, dims, aggregates)


def cumulative_sql(key: str, window: Window, metric: Metric, cutoffs_ms: Sequence[int]) -> Query:
    """Per (arm, cutoff): the users enrolled before the cutoff and ``metric``'s statistics over their events
    before it, which is exactly what a look at that moment would have seen."""
    cutoffs = ", ".join(str(int(c)) for c in cutoffs_ms)
    # Each event counts toward every later cutoff; the dimension column carries the cutoff.
    dim = f"arrayJoin(arrayFilter(c -> c > event_time_ms, [{cutoffs}]))"
    aggregates = ["count() AS users", *(_metric_aggregates(metric) if metric.kind == "mean" else [])]
    return _arm_query(key, window, [metric], {"results": dim, "stage_metrics": dim}, aggregates)


def values_sql(key: str, window: Window, metric: Metric, cap: int = QUANTILE_SAMPLE_CAP) -> Query:
    """Per arm, an array of the metric's per-user values (no user ids), for quantiles and distributions."""
    aggregate = f"groupArray({int(cap)})(toFloat64({metric.value})) AS values"
    return _arm_query(key, window, [metric], _NO_DIMENSION, [aggregate], user_filter=metric.users)


def revisions_sql(key: str, window: Window) -> str:
    """Per revision of the experiment that the window's results were assigned under, and arm: how many results
    (0 is a file's experiment, or a result written before revisions were recorded)."""
    k = quote(key)
    return (
        f"SELECT experiment_revisions[indexOf(experiment_keys, {k})] AS revision,"
        f" experiment_variants[indexOf(experiment_keys, {k})] AS arm, count() AS results FROM results_dedup"
        f" WHERE has(experiment_keys, {k}) AND event_time_ms >= {window.start_ms} AND event_time_ms < {window.end_ms}"
        " GROUP BY revision, arm ORDER BY revision, arm"
    )


def fetch_revisions(client: Client, key: str, window: Window) -> dict[int, dict[str, int]]:
    """Results per arm, by the revision they were assigned under, in the window (``revisions_sql``)."""
    revisions: dict[int, dict[str, int]] = {}
    for revision, arm, results in client.execute(revisions_sql(key, window)):
        revisions.setdefault(int(revision), {})[str(arm)] = int(results)
    return revisions


def span_sql(key: str) -> str:
    """Results carrying the experiment: how many, first and last event time (ms)."""
    return (
        "SELECT count() AS results, min(event_time_ms) AS first_ms, max(event_time_ms) AS last_ms"
        f" FROM results_dedup WHERE has(experiment_keys, {quote(key)})"
    )


def fetch_arm_stats(
    client: Client, key: str, window: Window, metrics: Sequence[Metric], dimension: str | None = None
) -> pd.DataFrame:
    return _frame(client, arm_stats_sql(key, window, metrics, dimension))


def fetch_cumulative(
    client: Client, key: str, window: Window, metric: Metric, cutoffs_ms: Sequence[int]
) -> pd.DataFrame:
    frame = _frame(client, cumulative_sql(key, window, metric, cutoffs_ms))
    return frame.rename(columns={"dim": "cutoff_ms"}).astype({"cutoff_ms": "int64"})


def fetch_values(client: Client, key: str, window: Window, metric: Metric) -> dict[str, np.ndarray]:
    rows = client.execute(values_sql(key, window, metric).sql)
    return {str(arm): np.asarray(values, dtype=float) for arm, _, values in rows}


def fetch_span(client: Client, key: str) -> tuple[int, datetime.datetime | None, datetime.datetime | None]:
    count, first_ms, last_ms = client.execute(span_sql(key))[0]
    if not count:
        return 0, None, None
    return int(count), _from_ms(int(first_ms)), _from_ms(int(last_ms))


def mean_stats(row: Mapping[str, Any], metric: str, with_covariate: bool) -> MeanStats:
    n, s, ss = int(row[f"{metric}__n"]), float(row[f"{metric}__sum"]), float(row[f"{metric}__sum_sq"])
    if not with_covariate:
        return MeanStats(n, s, ss)
    return MeanStats(
        n,
        s,
        ss,
        float(row[f"{metric}__pre_sum"]),
        float(row[f"{metric}__pre_sum_sq"]),
        float(row[f"{metric}__cross_sum"]),
        int(row[f"{metric}__pre_n"]),
        float(row[f"{metric}__pre_y_sum"]),
    )


def ratio_stats(row: Mapping[str, Any], metric: str) -> RatioStats:
    n, *sums = (row[f"{metric}__{f}"] for f in _RATIO_FIELDS)
    return RatioStats(int(n), *(float(s) for s in sums))


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def seed_synthetic(
    client: Client,
    experiment: Experiment,
    users: int = 400,
    days: int = 14,
    pre_days: int = 14,
    latency_effect_ms: float = -150.0,
    cost_effect: float = -0.2,
) -> None:
    """Synthetic results and stage metrics with a planted effect, for trying the report without a pipeline.

    ``users`` users named ``user-0``..., each assigned with ``experiment.assign``, send 1 to 6 requests over
    ``days`` days from the experiment's start and about as many in the ``pre_days`` before it. Every
    treatment arm's latency moves by ``latency_effect_ms`` and its cost by the relative ``cost_effect``.
    Values come from hashes of the row number, so the same call writes the same rows.
    """
    arms = "[" + ", ".join(quote(experiment.assign(f"user-{u}")) for u in range(users)) + "]"
    treated = "[" + ", ".join(quote(v) for v in experiment.treatments) + "]"
    start_ms = _ms(experiment.start)
    for period, first_ms, span_ms in (("exp", start_ms, days), ("pre", start_ms - pre_days * 86_400_000, pre_days)):
        in_exp = period == "exp"
        keys = f"[{quote(experiment.key)}]" if in_exp else "emptyArrayString()"
        arm_array = "[arm]" if in_exp else "emptyArrayString()"
        effect = f"has({treated}, arm)" if in_exp else "0"
        # u: user, j: the user's request number; users send 1 + hash % 6 requests.
        rows = f"""
            SELECT number, number % {users} AS u, intDiv(number, {users}) AS j,
                   arrayElement({arms}, u + 1) AS arm,
                   (cityHash64(number, '{period}', 'h') % 10000) / 10000 AS h,
                   (cityHash64(number, '{period}', 's') % 10000) / 10000 AS hs,
                   1500 + 1.5 * (cityHash64(u, 'user') % 1000) + 400 * h + {latency_effect_ms} * {effect} AS lat,
                   toUInt64({first_ms} + cityHash64(number, '{period}', 't') % {span_ms * 86_400_000}) AS t,
                   multiIf(hs < 0.05, 'REJECTED', hs < 0.08, 'FAILED', 'SUCCEEDED') AS st,
                   if(st = 'SUCCEEDED', 1 + cityHash64(number, '{period}', 'i') % 4, 0) AS imgs,
                   concat('{period}-', toString(number)) AS rid
            FROM numbers({users * 6})
            WHERE j < 1 + cityHash64(u, 'n') % 4 + cityHash64(u, '{period}', 'n') % 3"""
        client.execute(
            "INSERT INTO results (event_id, request_id, schema_version, event_time_ms, status, kind, user_id,"
            " image_uris, moderation_stage, model, experiment_keys, experiment_variants, variant,"
            " request_created_at_ms)"
            " SELECT concat('res-', rid), rid, 1, t, st, if(h < 0.3, 'EDIT', 'GENERATE'),"
            " concat('user-', toString(u)),"
            " arrayMap(i -> concat('s3://pixelpipe/', rid, '/', toString(i)), range(imgs)), '', 'tiny-sd',"
            f" {keys}, {arm_array}, {'arm' if in_exp else 'NULL'}, t - toUInt64(lat)"
            f" FROM ({rows})"
        )
        client.execute(
            "INSERT INTO stage_metrics (event_id, request_id, schema_version, event_time_ms, stage, outcome,"
            " queue_ms, compute_ms, batch_size, device, device_seconds, cost_usd, worker_id, user_id, model,"
            " experiment_keys, experiment_variants, variant)"
            " SELECT concat('met-', rid), rid, 1, t, 'GENERATE', if(st = 'SUCCEEDED', 'OK', 'FAILED'),"
            " 10 * h, lat - 10 * h, 1, 'cpu', lat / 1000, 0.001 * (1 + imgs) * (1 + h)"
            f" * (1 + {cost_effect} * {effect}), 'worker-1', concat('user-', toString(u)), 'tiny-sd',"
            f" {keys}, {arm_array}, {'arm' if in_exp else 'NULL'}"
            f" FROM ({rows})"
        )


_RATIO_FIELDS = ("n", "num_sum", "num_sum_sq", "den_sum", "den_sum_sq", "cross_sum")


def _metric_aggregates(m: Metric) -> list[str]:
    p, ok = m.name, m.users
    if m.kind == "mean":
        y, x = f"({m.value})", f"({m.pre_value})"
        moments = [
            f"countIf({ok}) AS {p}__n",
            f"sumIf({y}, {ok}) AS {p}__sum",
            f"sumIf({y} * {y}, {ok}) AS {p}__sum_sq",
        ]
        if not m.pre_value:
            return moments
        cov = f"({ok}) AND ({m.pre_users})"  # the covariate's sums skip users without a pre-period value
        return [
            *moments,
            f"countIf({cov}) AS {p}__pre_n",
            f"sumIf({y}, {cov}) AS {p}__pre_y_sum",
            f"sumIf({x}, {cov}) AS {p}__pre_sum",
            f"sumIf({x} * {x}, {cov}) AS {p}__pre_sum_sq",
            f"sumIf({x} * {y}, {cov}) AS {p}__cross_sum",
        ]
    if m.kind == "ratio":
        a, b = f"({m.num})", f"({m.den})"
        return [
            f"countIf({ok}) AS {p}__n",
            f"sumIf({a}, {ok}) AS {p}__num_sum",
            f"sumIf({a} * {a}, {ok}) AS {p}__num_sum_sq",
            f"sumIf({b}, {ok}) AS {p}__den_sum",
            f"sumIf({b} * {b}, {ok}) AS {p}__den_sum_sq",
            f"sumIf({a} * {b}, {ok}) AS {p}__cross_sum",
        ]
    return [f"countIf({ok}) AS {p}__n"]  # quantiles: values come from values_sql


def _arm_query(
    key: str,
    window: Window,
    metrics: Sequence[Metric],
    dims: Mapping[str, str | None],
    aggregates: Sequence[str],
    user_filter: str = "1",
) -> Query:
    k = quote(key)
    in_exp = f"has(experiment_keys, {k}) AND event_time_ms >= {window.start_ms} AND event_time_ms < {window.end_ms}"
    if window.revision is not None:
        in_exp += f" AND experiment_revisions[indexOf(experiment_keys, {k})] = {int(window.revision)}"
    in_pre = f"event_time_ms >= {window.pre_start_ms} AND event_time_ms < {window.start_ms}"
    common = (
        f"user_id, experiment_variants[indexOf(experiment_keys, {k})] AS exp_arm,"
        f" toUInt8({in_exp}) AS in_exp, toUInt8({in_pre}) AS in_pre"
    )
    where = f"WHERE ({in_exp}) OR ({in_pre})"
    branches = [
        f"SELECT {common}, toString({dims['results']}) AS dim, toFloat64(1) AS e_request,"
        " toFloat64(status = 'SUCCEEDED') AS e_success, toFloat64(status = 'REJECTED') AS e_rejected,"
        " toFloat64(status = 'FAILED') AS e_failed,"
        " if(status = 'SUCCEEDED', toFloat64(event_time_ms) - toFloat64(request_created_at_ms), 0) AS e_latency,"
        " toFloat64(if(status = 'SUCCEEDED', image_count, 0)) AS e_images, toFloat64(0) AS e_cost"
        f" FROM results_dedup {where}"
    ]
    if any(m.needs_stage_metrics for m in metrics):
        branches.append(
            f"SELECT {common}, toString({dims['stage_metrics']}) AS dim, toFloat64(0) AS e_request,"
            " toFloat64(0) AS e_success, toFloat64(0) AS e_rejected, toFloat64(0) AS e_failed,"
            " toFloat64(0) AS e_latency, toFloat64(0) AS e_images, toFloat64(cost_usd) AS e_cost"
            f" FROM stage_metrics_dedup {where}"
        )
    user_columns = ",\n        ".join(f"{expr} AS {name}" for name, expr in _USER_COLUMNS.items())
    events = "\n        UNION ALL\n        ".join(branches)
    aggregate_list = ",\n    ".join(aggregates)
    sql = f"""SELECT arm, dim,
    {aggregate_list}
FROM (
    SELECT user_id, dim, anyIf(exp_arm, in_exp) AS arm, uniqExactIf(exp_arm, in_exp) AS arms_seen,
        {user_columns}
    FROM (
        {events}
    )
    GROUP BY user_id, dim
    HAVING sum(in_exp) > 0
)
WHERE {user_filter}
GROUP BY arm, dim
ORDER BY arm, dim"""
    return Query(sql, ["arm", "dim", *(a.rsplit(" AS ", 1)[1] for a in aggregates)])


def _frame(client: Client, query: Query) -> pd.DataFrame:
    # Both clients return bare tuples.
    return pd.DataFrame(client.execute(query.sql), columns=query.columns)


def _ms(t: datetime.datetime) -> int:
    return math.floor(t.timestamp() * 1000)


def _from_ms(ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
