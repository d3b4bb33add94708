"""Experiment analysis: sufficient statistics from ClickHouse, statistics from ``stats``, results as data frames
and as a plain-text table. ``report_html`` draws the same results as one self-contained HTML file.

```python
analysis = analyze(client, experiment)      # client: pixelpipe.core.clickhouse.connect(url)
analysis.results                             # one row per metric x treatment (x segment): lift, interval, p
print(analysis.table())
analysis.write_html("report.html")           # report_html.render_html(analysis), written to the file
```
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pixelpipe.analytics import stats
from pixelpipe.analytics import sufficient_stats as ss
from pixelpipe.analytics.defaults import DEFAULT_MIN_USERS_PER_ARM
from pixelpipe.core.experiments import Experiment

DEFAULT_METRICS = ("latency_ms", "latency_p95", "cost_per_image", "requests_per_user", "rejection_rate", "failure_rate")
MAX_LOOKS = 60  # points on the over-time plots


class AnalysisError(ValueError):
    """The request cannot be analysed; the message says what exists instead."""


@dataclass
class Analysis:
    experiment: Experiment
    start: datetime.datetime
    end: datetime.datetime
    metrics: list[str]
    results: pd.DataFrame  # segment, metric, variant, method, status, control, treatment, lifts, p, p_holm, n, note
    arms: pd.DataFrame  # segment, variant, users (all users with events in the window)
    srm: stats.SrmResult
    users_over_time: pd.DataFrame  # time, variant, users (cumulative)
    sequential: pd.DataFrame  # time, variant, metric, abs_lift, ci_low, ci_high, n_control, n_treatment
    latency_values: dict[str, np.ndarray] = field(repr=False)  # per-user mean latency by variant (no user ids)
    notes: list[str] = field(default_factory=list)
    min_users_per_arm: int = DEFAULT_MIN_USERS_PER_ARM  # fewer users in an arm than this: no interval is shown

    def table(self) -> str:
        """The results as a plain-text table, as the CLI prints it."""
        rows = []
        for r in self.results.itertuples():
            if r.status == "ok":
                lift = f"{r.rel_lift:+.1%} [{r.rel_ci_low:+.1%}, {r.rel_ci_high:+.1%}]"
                p, p_holm = f"{r.p_value:.3g}", f"{r.p_holm:.3g}" if not math.isnan(r.p_holm) else ""
            else:
                lift, p, p_holm = r.note, "", ""
            rows.append(
                {
                    "segment": r.segment,
                    "metric": r.metric,
                    "variant": r.variant,
                    "control": _fmt(r.control),
                    "treatment": _fmt(r.treatment),
                    "rel. lift [95% CI]": lift,
                    "p": p,
                    "p (Holm)": p_holm,
                    "users c/t": f"{r.n_control}/{r.n_treatment}",
                }
            )
        frame = pd.DataFrame(rows)
        if set(frame["segment"]) == {"all"}:
            frame = frame.drop(columns="segment")
        srm = (
            "SRM: "
            + ("MISMATCH (do not trust these results) " if self.srm.flagged else "ok ")
            + (f"p={self.srm.p_value:.3g}, users " + ", ".join(f"{v}={n}" for v, n in self.users_per_arm().items()))
        )
        return "\n".join([frame.to_string(index=False), srm, *self.notes])

    def to_html(self) -> str:
        """The self-contained HTML report (see ``report_html``)."""
        from pixelpipe.analytics.report_html import render_html  # lazily: report_html imports this module

        return render_html(self)

    def write_html(self, path: str | Path) -> Path:
        out = Path(path)
        out.write_text(self.to_html())
        return out

    def users_per_arm(self) -> dict[str, int]:
        """Users of each variant in the window, over all segments."""
        overall = self.arms[self.arms["segment"] == "all"]
        return dict(zip(overall["variant"], overall["users"].astype(int), strict=True))


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
) -> Analysis:
    """Every treatment against the control on each metric, from ClickHouse aggregates.

    Mean metrics use CUPED with the same metric over the ``pre_days`` before the start (Welch without it);
    ratio metrics the delta method; quantile metrics the order-statistic interval of Deng et al. P-values are
    Holm-adjusted over all metrics and treatments of the overall segment. ``dimension`` (kind or model) adds
    per-segment rows.
    """
    names = list(metrics or DEFAULT_METRICS)
    if message := ss.unknown_metric_message(names):
        raise AnalysisError(message)
    chosen = [ss.METRICS[n] for n in names]
    _check_dimension(dimension, chosen)
    lo, hi = _window(experiment, start, end, now or datetime.datetime.now(datetime.UTC))
    window = ss.Window.of(lo, hi, pre_days)
    key = experiment.key

    overall = ss.fetch_arm_stats(client, key, window, chosen)
    _check_arms(client, experiment, overall, lo, hi)
    frames = [overall.assign(dim="all")]
    if dimension:
        frames.append(ss.fetch_arm_stats(client, key, window, chosen, dimension))
    arm_frame = pd.concat(frames, ignore_index=True).rename(columns={"dim": "segment", "arm": "variant"})

    users = {v: int(overall.loc[overall["arm"] == v, "users"].iloc[0]) for v in experiment.weights}
    srm = stats.srm_check(users, experiment.weights)
    notes = []
    if srm.flagged:
        notes.append(f"Sample-ratio mismatch (p={srm.p_value:.2g}): assignment or logging is broken; find why first.")
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
    results = pd.DataFrame(rows)
    ok = (results["segment"] == "all") & (results["status"] == "ok")
    results["p_holm"] = math.nan
    if ok.any():
        results.loc[ok, "p_holm"] = stats.holm(results.loc[ok, "p_value"].tolist())
    columns = ["segment", "metric", "variant", "method", "status", "control", "treatment", "abs_lift", "abs_ci_low"]
    columns += ["abs_ci_high", "rel_lift", "rel_ci_low", "rel_ci_high", "p_value", "p_holm", "n_control"]
    columns += ["n_treatment", "note"]

    over_time, sequential = _over_time(client, experiment, window, chosen, alpha, min_users_per_arm)
    return Analysis(
        experiment=experiment,
        start=lo,
        end=hi,
        metrics=names,
        results=results.reindex(columns=columns),  # every column, even when no row has an interval
        arms=arm_frame[["segment", "variant", "users"]],
        srm=srm,
        users_over_time=over_time,
        sequential=sequential,
        latency_values=latency_values,
        notes=notes,
        min_users_per_arm=min_users_per_arm,
    )


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
    base = {"metric": metric.name, "variant": variant, "n_control": n_c, "n_treatment": n_t, "note": ""}
    if min(n_c, n_t) < min_users:
        # An interval from a handful of users looks precise and is not; say what is needed instead.
        short = ", ".join(
            f"{arm} needs {min_users - n} more" for arm, n in ((control, n_c), (variant, n_t)) if n < min_users
        )
        return base | {"status": "too small", "note": f"too few users: need {min_users} per arm ({short})"}
    try:
        if metric.kind == "mean":
            method = "cuped" if pre_days > 0 else "welch"
            c, t = (ss.mean_stats(r, metric.name, pre_days > 0) for r in (c_row, t_row))
            try:
                lift = stats.cuped_lift(c, t, alpha) if pre_days > 0 else stats.mean_lift(c, t, alpha)
            except ValueError:  # constant pre-period covariate: nothing for CUPED to use
                method = "welch"
                lift = stats.mean_lift(
                    ss.mean_stats(c_row, metric.name, False), ss.mean_stats(t_row, metric.name, False), alpha
                )
        elif metric.kind == "ratio":
            method = "delta"
            lift = stats.ratio_lift(ss.ratio_stats(c_row, metric.name), ss.ratio_stats(t_row, metric.name), alpha)
        else:
            method = "quantile (DKY)"
            lift = stats.quantile_lift(values[control], values[variant], metric.q, alpha)
    except ValueError as e:  # InsufficientSampleError included: zero denominators, constant values
        return base | {"status": "n/a", "note": str(e)}
    return base | {
        "method": method,
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
    """Cumulative users per arm and the always-valid interval of the first mean metric, at up to MAX_LOOKS looks."""
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
    sequential = pd.DataFrame(
        rows, columns=["time", "variant", "metric", "n_control", "n_treatment", "abs_lift", "ci_low", "ci_high"]
    )
    return users, sequential


def _fmt(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"
