"""Experiment analysis: sufficient statistics from ClickHouse, statistics from ``stats``, results as data frames.
``report_text`` words them and prints them as a plain-text table (``Analysis.table``, from its base ``ReportText``);
``report_html`` draws them as one self-contained HTML file.

```python
analysis = analyze(client, experiment)      # client: pixelpipe.core.clickhouse.connect(url)
analysis.results                             # one row per metric x treatment (x segment): lift, interval, p
print(analysis.table())
analysis.write_html("report.html")           # report_html.render_html(analysis), written to the file
```
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pixelpipe.analytics import stats
from pixelpipe.analytics import sufficient_stats as ss
from pixelpipe.analytics.defaults import DEFAULT_MIN_USERS_PER_ARM
from pixelpipe.analytics.report_text import ReportText
from pixelpipe.analytics.rollout_plan import CONTROL, TREATMENT
from pixelpipe.analytics.sequential import quantile_confidence_sequence
from pixelpipe.core.experiments import Experiment

DEFAULT_METRICS = ("latency_ms", "latency_p95", "cost_per_image", "requests_per_user", "rejection_rate", "failure_rate")
MAX_LOOKS = 60  # points on the over-time plots
RAMP_COLUMNS = ("time", "action", "percent_before", "percent_after", "revision", "reason")
DEFAULT_MDE = 0.05  # the relative lift the power note sizes the experiment for


class AnalysisError(ValueError):
    """The request cannot be analysed; the message says what exists instead."""


@dataclass
class Analysis(ReportText):
    experiment: Experiment
    start: datetime.datetime
    end: datetime.datetime
    metrics: list[str]
    # segment, metric, family, better, variant, method, status, control, treatment, lifts, p, p_holm, p_harm,
    # verdict, variance_reduction, pre_coverage, std_error, n, note
    results: pd.DataFrame
    arms: pd.DataFrame  # segment, variant, users (all users with events in the window)
    srm: stats.SrmResult
    users_over_time: pd.DataFrame  # time, variant, users (cumulative)
    sequential: pd.DataFrame  # time, variant, metric, abs_lift, ci_low, ci_high, n_control, n_treatment
    latency_values: dict[str, np.ndarray] = field(repr=False)  # per-user mean latency by variant (no user ids)
    notes: list[str] = field(default_factory=list)
    min_users_per_arm: int = DEFAULT_MIN_USERS_PER_ARM  # fewer users in an arm than this: no interval is shown
    alpha: float = 0.05
    # metric, variant, n_control, n_treatment, mde_now (relative), users_needed (per arm, for a lift of ``mde``)
    power: pd.DataFrame = field(default_factory=pd.DataFrame)
    mde: float = DEFAULT_MDE
    # time, action, percent_before, percent_after, revision, reason: the ramp of the experiment's guarded rollout
    ramp: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(RAMP_COLUMNS)))
    revision: int | None = None  # the one allocation analysed; None: every result in the window
    planned: dict[str, float] = field(default_factory=dict)  # the split the SRM check expects; {}: the weights

    def to_html(self) -> str:
        """The self-contained HTML report (see ``report_html``)."""
        from pixelpipe.analytics.report_html import render_html  # lazily: report_html imports this module

        return render_html(self)

    def write_html(self, path: str | Path) -> Path:
        out = Path(path)
        out.write_text(self.to_html())
        return out


def analyze(
    client: ss.Client,
    experiment: Experiment,
    start: datetime.datetime | None = None,
    end: datetime.datetime | None = None,
    metrics: Sequence[str] | None = None,
    dimension: str | None = None,
    pre_days: int = 14,
    alpha: float = 0.05,
    min_users_per_arm: int = DEFAULT_MIN_USERS_PER_ARM,
    now: datetime.datetime | None = None,
    mde: float = DEFAULT_MDE,
    revision: int | None = None,
) -> Analysis:
    """Every treatment against the control on each metric, from ClickHouse aggregates.

    Mean metrics use CUPED with the same metric over the ``pre_days`` before the start (Welch without it; users
    without a pre-period value get the covered users' mean, see ``stats.cuped_lift``); ratio metrics the delta
    method; quantile metrics the order-statistic interval of Deng et al. Each row's ``method`` names it.

    Goal metrics and guardrails (``Metric.guardrail``) are two families. Goal p-values are Holm-adjusted over the
    goal metrics x treatments of the overall segment, and a goal's verdict is win or loss (by ``Metric.better``)
    when p_holm < alpha, else inconclusive. A guardrail is breached when its one-sided p for harm (``p_harm``) is
    under alpha, unadjusted: guardrails guard against harm, so a false alarm (a second look) is cheaper than a
    missed harm, and adjusting would cut their power as guardrails are added. ``dimension`` (kind or model) adds
    per-segment rows: exploratory, unadjusted, without a verdict. ``power`` gives the users per arm that detect a
    relative lift of ``mde`` on each goal metric with 80% power at Holm's strictest level, alpha / tests.

    One allocation at a time: when the window's results were assigned under several revisions of a live experiment
    (a ramp), only those of ``revision`` count, by default the latest in which every arm has results. Arms pooled
    across allocations mix users enrolled at different shares and times, which can bias every lift, and no one
    planned split fits them for the SRM check. The split of a guarded rollout's step comes from its ramp.
    """
    names = list(metrics or DEFAULT_METRICS)
    if message := ss.unknown_metric_message(names):
        raise AnalysisError(message)
    chosen = [ss.METRICS[n] for n in names]
    _check_dimension(dimension, chosen)
    lo, hi = _window(experiment, start, end, now or datetime.datetime.now(datetime.UTC))
    key = experiment.key
    window = ss.Window.of(lo, hi, pre_days)
    revisions = ss.fetch_revisions(client, key, window)
    revision, notes = _allocation(experiment, revisions, revision)
    window = dataclasses.replace(window, revision=revision)
    ramp = _ramp(client, key)
    planned = _planned_split(experiment, ramp, revision)
    if revision is not None and planned == experiment.weights and revision < max(revisions):
        notes.append(
            f"The split of revision {revision} is not recorded (a guarded rollout's steps are), so the SRM check "
            "expects the experiment's weights now, which that revision may not have had."
        )

    overall = ss.fetch_arm_stats(client, key, window, chosen)
    _check_arms(client, experiment, overall, lo, hi)
    frames = [overall.assign(dim="all")]
    if dimension:
        frames.append(ss.fetch_arm_stats(client, key, window, chosen, dimension))
    arm_frame = pd.concat(frames, ignore_index=True).rename(columns={"dim": "segment", "arm": "variant"})

    users = {v: int(overall.loc[overall["arm"] == v, "users"].iloc[0]) for v in experiment.weights}
    srm = stats.srm_check(users, planned)  # its verdict has its own banner
    crossed = int(overall["users_in_several_arms"].sum())
    if crossed:
        notes.append(f"{crossed} user(s) appear in more than one arm; each is counted in one of them.")

    latency_values = ss.fetch_values(client, key, window, ss.METRICS["latency_p95"])
    rows = []
    for segment, seg_frame in arm_frame.groupby("segment", sort=False):
        by_arm = {row["variant"]: row for _, row in seg_frame.iterrows()}
        for metric in chosen:
            if metric.kind == "quantile" and segment != "all":
                continue  # per-user values are pulled for the overall segment only
            for variant in experiment.treatments:
                rows.append(
                    _compare(
                        metric, experiment.control, variant, by_arm, latency_values, pre_days, alpha, min_users_per_arm
                    )
                    | {"segment": segment}
                )
    columns = ["segment", "metric", "family", "better", "variant", "method", "status", "control", "treatment"]
    columns += ["abs_lift", "abs_ci_low", "abs_ci_high", "rel_lift", "rel_ci_low", "rel_ci_high", "p_value"]
    columns += ["p_holm", "p_harm", "verdict", "variance_reduction", "pre_coverage", "std_error", "n_control"]
    columns += ["n_treatment", "note", "method_note"]
    results = pd.DataFrame(rows).reindex(columns=columns)  # every column, even when no row has an interval
    goals = (results["segment"] == "all") & (results["family"] == "goal") & (results["status"] == "ok")
    if goals.any():  # guardrails are no part of the goal family: they would only dilute it
        results.loc[goals, "p_holm"] = stats.holm(results.loc[goals, "p_value"].tolist())
    results["verdict"] = [_verdict(r, alpha) for _, r in results.iterrows()]
    for column in ("note", "method_note"):  # text columns, where a row without one has ""
        results[column] = [v if isinstance(v, str) else "" for v in results[column]]

    over_time, sequential = _over_time(client, experiment, window, chosen, alpha, min_users_per_arm)
    return Analysis(
        experiment=experiment,
        start=lo,
        end=hi,
        metrics=names,
        results=results,
        arms=arm_frame[["segment", "variant", "users"]],
        srm=srm,
        users_over_time=over_time,
        sequential=sequential,
        latency_values=latency_values,
        notes=notes,
        min_users_per_arm=min_users_per_arm,
        alpha=alpha,
        power=_power(results[goals], alpha / max(int(goals.sum()), 1), mde),
        mde=mde,
        ramp=ramp,
        revision=revision,
        planned=planned,
    )


def _allocation(
    experiment: Experiment, revisions: Mapping[int, Mapping[str, int]], asked: int | None
) -> tuple[int | None, list[str]]:
    """The revision to analyse (None: the window holds one allocation, or none) and the note that says why."""
    key, shown = experiment.key, ", ".join(map(str, sorted(revisions)))
    if asked is not None:
        if asked not in revisions:
            raise AnalysisError(
                f"no result of {key!r} in the window was assigned under revision {asked}; revisions with results: "
                f"{shown or 'none'}"
            )
        return asked, []
    if len(revisions) <= 1:
        return None, []
    complete = [r for r, arms in revisions.items() if all(arms.get(v) for v in experiment.weights)]
    chosen = max(complete or revisions)
    return chosen, [
        f"The window holds {len(revisions)} allocations of {key} (revisions {shown}): arms pooled across them mix "
        "users enrolled at different shares and times, which can bias every lift, so this report keeps to revision "
        f"{chosen}, the latest with results in every arm. --revision N analyses another."
    ]


def _planned_split(experiment: Experiment, ramp: pd.DataFrame, revision: int | None) -> dict[str, float]:
    """The split the revision's users should show: a guarded rollout's step percent where the ramp has it, else
    the experiment's weights."""
    step = ramp[ramp["revision"] == revision] if revision is not None else ramp.iloc[0:0]
    if not step.empty and set(experiment.weights) == {CONTROL, TREATMENT}:
        percent = float(step["percent_after"].iloc[-1])
        return {CONTROL: 100.0 - percent, TREATMENT: percent}
    return dict(experiment.weights)


def _ramp(client: ss.Client, key: str) -> pd.DataFrame:
    """The decisions of the guarded rollout of experiment ``key`` that moved it (RAMP_COLUMNS; none without a
    rollout): every one but HOLD, whose allocation stays, and the latest decision whatever it is, so the ramp ends
    where the rollout stands now."""
    rows = client.execute(
        "SELECT event_time_ms, toString(action), percent_before, percent_after, revision_after, reason"
        f" FROM rollout_decisions_dedup WHERE rollout = {ss.quote(key)} ORDER BY sequence"
    )
    frame = pd.DataFrame(rows, columns=list(RAMP_COLUMNS))
    frame["time"] = pd.to_datetime(frame["time"], unit="ms", utc=True)
    moved = (frame["action"] != "HOLD") | (frame.index == len(frame) - 1)
    return frame[moved].reset_index(drop=True)


def _window(
    experiment: Experiment, start: datetime.datetime | None, end: datetime.datetime | None, now: datetime.datetime
) -> tuple[datetime.datetime, datetime.datetime]:
    lo = max(experiment.start, start) if start else experiment.start
    hi = min(experiment.end or now, end) if end else (experiment.end or now)
    if lo >= hi:
        runs = f"{experiment.start:%Y-%m-%d %H:%M} to {f'{experiment.end:%Y-%m-%d %H:%M}' if experiment.end else 'now'}"
        raise AnalysisError(
            f"empty date range: from {lo:%Y-%m-%d %H:%M} to {hi:%Y-%m-%d %H:%M} UTC; experiment "
            f"{experiment.key!r} runs from {runs} UTC"
        )
    return lo, hi


def _check_dimension(dimension: str | None, metrics: Sequence[ss.Metric]) -> None:
    if dimension is None:
        return
    if dimension not in ss.DIMENSIONS:
        raise AnalysisError(f"unknown dimension {dimension!r}; dimensions that exist: {', '.join(ss.DIMENSIONS)}")
    if ss.DIMENSIONS[dimension]["stage_metrics"] is None and any(m.needs_stage_metrics for m in metrics):
        costly = [m.name for m in metrics if m.needs_stage_metrics]
        raise AnalysisError(f"stage metrics have no {dimension}, so {', '.join(costly)} cannot be split by it")


def _check_arms(
    client: ss.Client, experiment: Experiment, overall: pd.DataFrame, lo: datetime.datetime, hi: datetime.datetime
) -> None:
    between = f"between {lo:%Y-%m-%d %H:%M} and {hi:%Y-%m-%d %H:%M} UTC"
    if overall.empty:
        count, first, last = ss.fetch_span(client, experiment.key)
        where = (
            f"its {count} results span {first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M} UTC"
            if count
            else "no result carries it at all"
        )
        raise AnalysisError(f"no users in experiment {experiment.key!r} {between}; {where}")
    seen = dict(zip(overall["arm"], overall["users"].astype(int), strict=True))
    counts = ", ".join(
        f"{v}={seen.get(v, 0)}" for v in [*experiment.weights, *sorted(set(seen) - set(experiment.weights))]
    )
    if extra := sorted(set(seen) - set(experiment.weights)):
        raise AnalysisError(
            f"the data has variant(s) {extra} that the experiments file does not define for {experiment.key!r}; "
            f"users per variant: {counts}"
        )
    if empty := [v for v in experiment.weights if v not in seen]:
        raise AnalysisError(
            f"variant(s) {empty} of {experiment.key!r} have no users {between}; users per variant: {counts}"
        )


def _compare(
    metric: ss.Metric,
    control: str,
    variant: str,
    by_arm: dict[str, pd.Series],
    values: dict[str, np.ndarray],
    pre_days: int,
    alpha: float,
    min_users: int,
) -> dict:
    c_row, t_row = by_arm.get(control), by_arm.get(variant)
    n_c = int(c_row[f"{metric.name}__n"]) if c_row is not None else 0
    n_t = int(t_row[f"{metric.name}__n"]) if t_row is not None else 0
    cuped = pre_days > 0 and bool(metric.pre_value)
    planned = {"mean": "CUPED" if cuped else "Welch", "ratio": "delta method", "quantile": "quantile (Deng et al.)"}
    base = {
        "metric": metric.name,
        "family": "guardrail" if metric.guardrail else "goal",
        "better": metric.better,
        "variant": variant,
        "method": planned[metric.kind],  # the one it would use, also where the sample is too small
        "n_control": n_c,
        "n_treatment": n_t,
        "note": "",
    }
    if min(n_c, n_t) < min_users:
        # An interval from a handful of users looks precise and is not; say what is needed instead.
        short = ", ".join(
            f"{arm} needs {min_users - n} more" for arm, n in ((control, n_c), (variant, n_t)) if n < min_users
        )
        return base | {"status": "too small", "note": f"too few users: need {min_users} per arm ({short})"}
    method_note = ""
    try:
        if metric.kind == "mean":
            lift, method_note = _mean_lift(metric, c_row, t_row, pre_days, alpha)
        elif metric.kind == "ratio":
            lift = stats.ratio_lift(ss.ratio_stats(c_row, metric.name), ss.ratio_stats(t_row, metric.name), alpha)
        else:
            lift = stats.quantile_lift(values[control], values[variant], metric.q, alpha)
    except ValueError as e:  # InsufficientSampleError included: zero denominators, constant values
        return base | {"status": "n/a", "note": str(e)}
    harmful = 1 if metric.better == "lower" else -1
    return base | {
        "method": lift.method,
        "method_note": method_note,
        "variance_reduction": lift.variance_reduction,
        "pre_coverage": lift.pre_coverage,
        "std_error": lift.std_error,
        "p_harm": stats.one_sided_p(lift, harmful) if metric.guardrail else math.nan,
        "status": "ok",
        "control": lift.control_mean,
        "treatment": lift.treatment_mean,
        "abs_lift": lift.abs_lift,
        "abs_ci_low": lift.abs_ci_low,
        "abs_ci_high": lift.abs_ci_high,
        "rel_lift": lift.rel_lift,
        "rel_ci_low": lift.rel_ci_low,
        "rel_ci_high": lift.rel_ci_high,
        "p_value": lift.p_value,
    }


def _over_time(
    client: ss.Client,
    experiment: Experiment,
    window: ss.Window,
    metrics: Sequence[ss.Metric],
    alpha: float,
    min_users: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cumulative users per arm, and the always-valid intervals of the first mean metric and of every quantile
    metric, at up to MAX_LOOKS looks."""
    primary = next((m for m in metrics if m.kind == "mean"), ss.METRICS["latency_ms"])
    span = window.end_ms - window.start_ms
    step = max(86_400_000, math.ceil(span / MAX_LOOKS))  # daily looks, fewer for long experiments
    cutoffs = sorted({*range(window.start_ms + step, window.end_ms, step), window.end_ms})
    frame = ss.fetch_cumulative(client, experiment.key, window, primary, cutoffs)
    frame["time"] = pd.to_datetime(frame["cutoff_ms"], unit="ms", utc=True)
    users = frame[["time", "arm", "users"]].rename(columns={"arm": "variant"})
    final = frame[frame["cutoff_ms"] == frame["cutoff_ms"].max()].set_index("arm")
    rows = []
    if experiment.control in final.index:
        # tau^2 near the squared effect worth detecting: 5% of the control mean at the last look.
        tau_sq = (0.05 * ss.mean_stats(final.loc[experiment.control], primary.name, False).mean) ** 2 or 1.0
        for cutoff, look in frame.groupby("cutoff_ms"):
            arms = look.set_index("arm")
            for variant in experiment.treatments:
                if experiment.control not in arms.index or variant not in arms.index:
                    continue
                c, t = (ss.mean_stats(arms.loc[v], primary.name, False) for v in (experiment.control, variant))
                row = {"time": pd.to_datetime(cutoff, unit="ms", utc=True), "variant": variant, "metric": primary.name}
                row |= {"n_control": c.n, "n_treatment": t.n}
                if min(c.n, t.n) >= min_users:
                    try:
                        interval = stats.sequential_interval(c, t, tau_sq, alpha)
                        row |= {"abs_lift": interval.abs_lift, "ci_low": interval.ci_low, "ci_high": interval.ci_high}
                    except ValueError:
                        pass  # zero variance at this look: no interval to draw
                rows.append(row)
    rows += _quantile_looks(client, experiment, window, metrics, cutoffs, alpha, min_users)
    sequential = pd.DataFrame(
        rows, columns=["time", "variant", "metric", "n_control", "n_treatment", "abs_lift", "ci_low", "ci_high"]
    )
    return users, sequential


def _mean_lift(
    metric: ss.Metric, c_row: pd.Series, t_row: pd.Series, pre_days: int, alpha: float
) -> tuple[stats.LiftResult, str]:
    """CUPED where there is a pre-period covariate to use, else Welch and why not CUPED ("" if by design)."""
    plain = [ss.mean_stats(r, metric.name, False) for r in (c_row, t_row)]
    if not metric.pre_value:
        return stats.mean_lift(*plain, alpha), ""
    if pre_days == 0:
        return stats.mean_lift(*plain, alpha), "no pre-period (--pre-days 0)"
    try:
        return stats.cuped_lift(*(ss.mean_stats(r, metric.name, True) for r in (c_row, t_row)), alpha), ""
    except ValueError as e:  # no user with a pre-period value, or a constant one: nothing to adjust with
        # Welch's own errors (zero variance) propagate; the advice to call mean_lift is for library users.
        return stats.mean_lift(*plain, alpha), str(e).split("; call mean_lift")[0]


def _verdict(row: pd.Series, alpha: float) -> str:
    """Win, loss or inconclusive for a goal; guardrail breached or ok for a guardrail; none for a segment."""
    if row["status"] != "ok":
        return "too few users" if row["status"] == "too small" else "n/a"
    if row["segment"] != "all":
        return ""  # exploratory: an unadjusted p-value over many segments is no basis for a verdict
    if row["family"] == "guardrail":
        return "guardrail breached" if row["p_harm"] < alpha else "ok"
    if not row["p_holm"] < alpha:
        return "inconclusive"
    return "win" if (row["abs_lift"] < 0) == (row["better"] == "lower") else "loss"


def _power(goals: pd.DataFrame, alpha: float, mde: float) -> pd.DataFrame:
    """Per goal row: the relative lift its standard error detects now, and the users per arm for ``mde``."""
    rows = []
    for r in goals.itertuples():
        sd = stats.per_user_sd(r.std_error, r.n_control, r.n_treatment)
        try:
            needed = stats.required_sample_size(r.control, sd, mde, alpha, stats.POWER)
        except ValueError:  # a zero control mean: no relative lift to size for
            needed = math.nan
        detectable = (
            stats.minimum_detectable_lift(r.std_error, alpha, stats.POWER) / abs(r.control) if r.control else math.nan
        )
        rows.append(
            {
                "metric": r.metric,
                "variant": r.variant,
                "n_control": r.n_control,
                "n_treatment": r.n_treatment,
                "mde_now": detectable,
                "users_needed": needed,
            }
        )
    return pd.DataFrame(rows, columns=["metric", "variant", "n_control", "n_treatment", "mde_now", "users_needed"])


# --- Quantile metrics over time: always-valid intervals from analytics/sequential.py ---


def _quantile_looks(
    client: ss.Client,
    experiment: Experiment,
    window: ss.Window,
    metrics: Sequence[ss.Metric],
    cutoffs: Sequence[int],
    alpha: float,
    min_users: int,
) -> list[dict]:
    """Rows of the sequential frame for each quantile metric: at each cutoff, the values of the users enrolled
    before it over their events before it (what a look then would have seen), and the confidence sequence of
    ``sequential.quantile_confidence_sequence``. Calibrated for continuous monitoring (max_looks=None), like the
    mean metric's interval, since the report cannot know how often it is read; tightest at the last look's users.
    Looks where an arm has more than QUANTILE_SAMPLE_CAP users use a capped sample, which the guarantee ignores."""
    rows: list[dict] = []
    dim = f"arrayJoin(arrayFilter(c -> c > event_time_ms, [{', '.join(str(int(c)) for c in cutoffs)}]))"
    for metric in (m for m in metrics if m.kind == "quantile"):
        aggregate = f"groupArray({ss.QUANTILE_SAMPLE_CAP})(toFloat64({metric.value})) AS values"
        # ss has no public query for per-cutoff values yet; this is cumulative_sql's shape with values_sql's array.
        query = ss._arm_query(
            experiment.key, window, [metric], {"results": dim, "stage_metrics": dim}, [aggregate], metric.users
        )
        values = {(str(arm), int(cut)): np.asarray(v, dtype=float) for arm, cut, v in client.execute(query.sql)}
        for variant in experiment.treatments:
            planned = sum(values.get((arm, max(cutoffs)), np.empty(0)).size for arm in (experiment.control, variant))
            for cutoff in cutoffs:
                c, t = values.get((experiment.control, cutoff)), values.get((variant, cutoff))
                if c is None or t is None:
                    continue
                row = {"time": pd.to_datetime(cutoff, unit="ms", utc=True), "variant": variant, "metric": metric.name}
                row |= {"n_control": c.size, "n_treatment": t.size}
                if min(c.size, t.size) >= min_users:
                    cs = quantile_confidence_sequence(c, t, metric.q, alpha, planned_users=max(planned, 1))
                    if math.isfinite(cs.ci_low):  # else too few users or tied values at this look: nothing to draw
                        row |= {"abs_lift": cs.estimate, "ci_low": cs.ci_low, "ci_high": cs.ci_high}
                rows.append(row)
    return rows
