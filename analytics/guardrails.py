"""The guardrails of a rollout and the decision the rollout controller takes on them at each look: ROLLBACK,
ADVANCE or HOLD. Pure: per-arm data of the current step in, a ``Verdict`` out; no ClickHouse, no Kafka.

```python
verdict = decide(StepData(control={"failure_rate": MeanStats(...), "latency_p95": values}, treatment={...}))
verdict.decision, verdict.reason, verdict.figures   # Decision.HOLD, "...", {"failure_rate.ci_low": ..., ...}
```

Each guardrail is a one-sided question about harm, treatment - control, signed so that positive is worse:

* ROLLBACK when some guardrail's always-valid interval lies wholly above its margin (harm beyond the tolerated
  margin, with confidence), whatever the number of users;
* ADVANCE when both arms have ``min_users`` for every guardrail and every interval lies at or below its margin
  (non-inferiority shown for all of them);
* HOLD otherwise, with the reason in words; and HOLD instead of ADVANCE when the step's users are not split between
  the arms as allocated (a sample-ratio mismatch, ``stats.srm_check`` at p < ``SRM_THRESHOLD``): an arm then loses
  results or users (it crashes, drops events, redirects), and its figures cannot be trusted to advance on. It never
  stops a roll-back. The check repeats at every look, so a chance flag now and then only delays a step; results in
  flight on a slower arm are a bias that shrinks as the step's users grow.

Only the current step's data may be passed (rows whose experiment revision is the step's): within one revision
the allocation is constant, so the arms are comparable; earlier steps had other allocations, and pooling them
would mix users enrolled at different shares and times.

The intervals. Every guardrail's interval is the two-sided normal-mixture boundary in standard errors,
``estimate +/- sequential.mixture_shape(f, alpha_g) * se``, the asymptotic confidence sequence of Waudby-Smith et
al. that ``sequential`` builds for quantiles: ``stats.sequential_interval``'s boundary (Howard et al. 2021) with
the mixture variance in standard errors rather than metric units, because a rollout's guardrails mix shares,
dollars and milliseconds whose variances nobody knows in advance. It is tuned to be tightest when the smaller arm
reaches ``min_users`` (f = its users / ``min_users``), where decisions start: a grossly harmful candidate is rolled
back within a few dozen of its users, and showing non-inferiority later costs about a fifth more users than a
boundary tuned for it. The interval is recomputed at every look and stays valid however often the controller looks.

* ``share`` and ``mean`` guardrails take ``stats.MeanStats`` of a per-user value (the share of a user's requests
  that failed; the user's mean cost per image). Each arm's variance is at least what it would be with two
  pseudo-users more: a share's at 0 and 1 (Laplace's rule: one success and one failure), so an arm with no
  failure yet has the binomial variance of about one in n, not 0, and cannot show non-inferiority from a handful
  of users; an amount's at the pooled mean +/- the pooled standard deviation, so two arms that are each constant
  but differ are not taken for certain. The pseudo-users widen the interval only; the estimate is the plain one.
  Two arms identical and constant (the same fixed price) give a zero-width interval: that difference is exact.
* ``quantile`` guardrails take each arm's per-user values (a capped sample, ``sufficient_stats.QUANTILE_SAMPLE_CAP``)
  and use ``sequential.asymptotic_bounds``; the p95's density estimate needs 77 users per arm, before which its
  interval is unbounded.

A relative margin r is judged exactly for means: treatment - (1 + r) * control against 0, the control's variance
scaled by (1 + r)^2; for quantiles on the relative interval of ``sequential`` (log scale). The figures show it in
metric units, as r times the control's estimate, with the interval shifted by the same amount, so that
``ci_low > margin`` is the roll-back rule and ``ci_high <= margin`` the advance rule in every row. Relative margins
are for positive metrics.

Alpha spending: Bonferroni. Each of the k guardrails' two-sided intervals has level alpha / k, so the chance
that any interval ever misses its true harm, at any look, is at most alpha. That bounds the false roll-back rate
(a candidate within every margin rolled back) and the false advance rate (one beyond a margin advanced) at once.
The report leaves its guardrails unadjusted because a person reads their alarms; here an alarm rolls back by
itself. ``rollout_simulation`` measures the false roll-backs: none in 4000 A/A rollouts, 1 % for a candidate
worse by exactly every margin, at alpha = 0.05.

Validity is asymptotic (the variances are estimated), which the simulation checks at the sample sizes a rollout
sees: looks every 50 users from the first users of a step on.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from pixelpipe.analytics.defaults import DEFAULT_MIN_USERS_PER_ARM
from pixelpipe.analytics.sequential import asymptotic_bounds, min_users_for_quantile, mixture_shape
from pixelpipe.analytics.stats import MIN_USERS_FOR_VARIANCE, MeanStats, srm_check

Kind = Literal["share", "mean", "quantile"]
KINDS: tuple[Kind, ...] = ("share", "mean", "quantile")
SRM_THRESHOLD = 0.001  # stats.srm_check's own: rare false alarms, though the controller checks at every look

ArmData = Mapping[str, MeanStats | ArrayLike]  # metric -> MeanStats (share, mean) or per-user values (quantile)


class Decision(enum.StrEnum):
    ROLLBACK = "ROLLBACK"
    ADVANCE = "ADVANCE"
    HOLD = "HOLD"


_CODES = {0: Decision.HOLD, 1: Decision.ADVANCE, 2: Decision.ROLLBACK}


@dataclass(frozen=True)
class Guardrail:
    """A metric the treatment must not worsen by more than ``margin``.

    ``kind``: ``share`` (per-user mean of a 0/1 per-request value), ``mean`` (per-user mean of a per-request amount)
    or ``quantile`` (the ``q`` quantile of per-user values). ``margin`` is absolute, in the metric's units, or
    relative to the control's value (0.2: +20 %) when ``relative``. ``harm`` is the direction that is worse.
    """

    metric: str
    kind: Kind
    margin: float
    relative: bool = False
    harm: Literal["up", "down"] = "up"
    q: float = 0.95

    def __post_init__(self) -> None:
        if not self.metric:
            raise ValueError("a guardrail needs a metric name")
        if self.kind not in KINDS:
            raise ValueError(f"guardrail {self.metric}: unknown kind {self.kind!r}; kinds: {', '.join(KINDS)}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(
                f"guardrail {self.metric}: the margin is the harm tolerated, a finite number >= 0, not {self.margin}"
            )
        if self.harm not in ("up", "down"):
            raise ValueError(
                f"guardrail {self.metric}: harm is 'up' or 'down' (the worse direction), not {self.harm!r}"
            )
        if self.kind == "quantile" and not 0 < self.q < 1:
            raise ValueError(
                f"guardrail {self.metric}: q must be strictly between 0 and 1 (0.95 for p95), not {self.q}"
            )

    @property
    def sign(self) -> int:
        """+1 when a rise is harm, -1 when a fall is."""
        return 1 if self.harm == "up" else -1


DEFAULT_GUARDRAILS: tuple[Guardrail, ...] = (
    # Absolute margins for rates: the baselines are a few percent, where a relative margin would swing with the
    # control's noise; one point more is one more user in a hundred who gets no image. Halving a margin costs four
    # times the users to advance (the interval narrows as 1 / sqrt(n)), which is why it is not tighter.
    Guardrail("failure_rate", "share", 0.01),
    Guardrail("moderation_rejection_rate", "share", 0.01),
    # Latency scales with the model (a slower model is slower by a factor), so its margin is relative: +20 %.
    Guardrail("latency_p95", "quantile", 0.20, relative=True, q=0.95),
    # Cost per image is nearly a price (device seconds x price), so a tight relative margin costs few users.
    Guardrail("cost_per_image", "mean", 0.10, relative=True),
)


@dataclass(frozen=True)
class StepData:
    """Per-arm data of the current step only (see the module docstring); an arm without users yet is None."""

    control: ArmData | None = None
    treatment: ArmData | None = None


@dataclass(frozen=True)
class Sums:
    """Sufficient statistics of a mean metric for many rows at once (one entry per simulated or real rollout)."""

    n: np.ndarray
    sum: np.ndarray
    sum_sq: np.ndarray

    @classmethod
    def of(cls, stats: MeanStats) -> Sums:
        return cls(np.array([stats.n]), np.array([stats.sum], dtype=float), np.array([stats.sum_sq], dtype=float))


@dataclass(frozen=True)
class Judgement:
    """One guardrail on many rows: the arms' estimates, the harm (treatment - control, positive is worse), its
    interval and the margin, in metric units. Unbounded rows (too few users) have -inf/+inf bounds."""

    control: np.ndarray
    treatment: np.ndarray
    harm: np.ndarray
    low: np.ndarray
    high: np.ndarray
    margin: np.ndarray
    n_control: np.ndarray
    n_treatment: np.ndarray

    @property
    def breached(self) -> np.ndarray:
        return self.low > self.margin

    def within(self, min_users: int) -> np.ndarray:
        enough = (self.n_control >= min_users) & (self.n_treatment >= min_users)
        return enough & (self.high <= self.margin)


@dataclass(frozen=True)
class GuardrailResult:
    guardrail: Guardrail
    status: Literal["breached", "within margin", "inconclusive", "too few users"]
    control: float
    treatment: float
    harm: float  # treatment - control, signed so that positive is worse
    ci_low: float
    ci_high: float
    margin: float  # in metric units (a relative margin times the control's estimate)
    n_control: int
    n_treatment: int


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str
    figures: dict[str, float]  # flat, for the decision event; non-finite values are left out
    results: tuple[GuardrailResult, ...]


def decide(
    step: StepData,
    guardrails: Sequence[Guardrail] = DEFAULT_GUARDRAILS,
    min_users: int = DEFAULT_MIN_USERS_PER_ARM,
    alpha: float = 0.05,
    treatment_share: float | None = None,
) -> Verdict:
    """ROLLBACK, ADVANCE or HOLD for the current step (see the module docstring), with the reason and the figures.

    Each arm maps every guardrail's metric to its data: ``MeanStats`` for share and mean guardrails, the per-user
    values for quantile guardrails. A metric an arm lacks counts as no users yet. ``treatment_share``, the step's
    allocation (0.1 at 10 %), turns on the sample-ratio check.
    """
    _check_settings(guardrails, min_users, alpha)
    alpha_each = alpha / len(guardrails)
    judgements = [
        judge(
            g, _arm_rows(g, "control", step.control), _arm_rows(g, "treatment", step.treatment), alpha_each, min_users
        )
        for g in guardrails
    ]
    decision = _CODES[int(decisions(judgements, min_users)[0])]
    results = tuple(_result(g, j, min_users) for g, j in zip(guardrails, judgements, strict=True))
    figures = {"alpha": alpha, "alpha_per_guardrail": alpha_each, "min_users": float(min_users)}
    for r in results:
        name = r.guardrail.metric
        values = {"estimate": r.harm, "ci_low": r.ci_low, "ci_high": r.ci_high, "margin": r.margin}
        values |= {"control": r.control, "treatment": r.treatment}
        values |= {"n_control": float(r.n_control), "n_treatment": float(r.n_treatment)}
        figures |= {f"{name}.{key}": value for key, value in values.items() if math.isfinite(value)}
    reason = _reason(decision, results, step, min_users)
    if treatment_share is not None and decision != Decision.ROLLBACK:
        mismatch, figures["srm.p_value"] = _sample_ratio(step, treatment_share)
        if mismatch:
            decision, reason = Decision.HOLD, f"holding: {mismatch}; {reason.removeprefix('holding: ')}"
    return Verdict(decision, reason, figures, results)


def _sample_ratio(step: StepData, treatment_share: float) -> tuple[str | None, float]:
    """Why the step's users are not split between the arms as allocated (None when they are), and the p-value.
    An arm's users are the most any of its share or mean metrics counts (every user has a failure rate)."""
    users = {arm: _users(data) for arm, data in (("control", step.control), ("treatment", step.treatment))}
    total = sum(users.values())
    if total == 0 or not 0 < treatment_share < 1:
        return None, 1.0
    srm = srm_check(users, {"control": 1 - treatment_share, "treatment": treatment_share}, SRM_THRESHOLD)
    if not srm.flagged:
        return None, srm.p_value
    return (
        f"sample ratio mismatch: {users['treatment']} of {total} users in the treatment where "
        f"{100 * treatment_share:g} % were allocated (p = {srm.p_value:.2g}); an arm loses results or users, so "
        f"the figures are not advanced on until the cause is found",
        srm.p_value,
    )


def _users(arm: ArmData | None) -> int:
    return max((int(v.n) for v in (arm or {}).values() if isinstance(v, MeanStats)), default=0)


def judge(
    guardrail: Guardrail, control: Sums | np.ndarray, treatment: Sums | np.ndarray, alpha: float, min_users: int
) -> Judgement:
    """The guardrail on every row at level ``alpha`` (already this guardrail's share): ``Sums`` for share and mean
    guardrails, 2-D arrays of each row's sorted values (one row per rollout) for quantile ones."""
    if guardrail.kind == "quantile":
        if not (isinstance(control, np.ndarray) and isinstance(treatment, np.ndarray)):
            raise TypeError(f"guardrail {guardrail.metric} is a quantile: pass each row's sorted values")
        return _judge_quantile(guardrail, control, treatment, alpha, min_users)
    if not (isinstance(control, Sums) and isinstance(treatment, Sums)):
        raise TypeError(f"guardrail {guardrail.metric} is a {guardrail.kind}: pass Sums")
    return _judge_mean(guardrail, control, treatment, alpha, min_users)


def decisions(judgements: Sequence[Judgement], min_users: int) -> np.ndarray:
    """Per row: 2 ROLLBACK (some guardrail breached), 1 ADVANCE (every guardrail within its margin with enough
    users), else 0 HOLD."""
    breached = np.logical_or.reduce([j.breached for j in judgements])
    within = np.logical_and.reduce([j.within(min_users) for j in judgements])
    return np.where(breached, 2, np.where(within, 1, 0))


def _judge_mean(guardrail: Guardrail, c: Sums, t: Sums, alpha: float, min_users: int) -> Judgement:
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_c, mean_t = c.sum / c.n, t.sum / t.n
        if guardrail.kind == "share":
            low_high = (np.zeros_like(mean_c), np.ones_like(mean_c))
        else:
            n = c.n + t.n
            pooled_mean = (c.sum + t.sum) / n
            pooled_sd = np.sqrt(np.maximum((c.sum_sq + t.sum_sq - n * pooled_mean**2) / (n - 1), 0.0))
            low_high = (pooled_mean - pooled_sd, pooled_mean + pooled_sd)
        var_c, var_t = _floored_variance(c, *low_high), _floored_variance(t, *low_high)
        s, r = guardrail.sign, guardrail.margin
        # harm - margin = s * t - (s + r) * c for a relative margin; its control coefficient scales the variance.
        margin = r * mean_c if guardrail.relative else np.full_like(mean_c, r)
        control_weight = (s + r) ** 2 if guardrail.relative else 1.0
        se = np.sqrt(var_t / t.n + control_weight * var_c / c.n)
        harm = s * (mean_t - mean_c)
        radius = mixture_shape(np.minimum(c.n, t.n) / min_users, alpha) * se
    bounded = (c.n >= MIN_USERS_FOR_VARIANCE) & (t.n >= MIN_USERS_FOR_VARIANCE)
    low = np.where(bounded, harm - radius, -np.inf)
    high = np.where(bounded, harm + radius, np.inf)
    return Judgement(mean_c, mean_t, harm, low, high, margin, c.n, t.n)


def _floored_variance(arm: Sums, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The arm's sample variance, at least that of the arm with two pseudo-users at ``low`` and ``high``."""
    sample = (arm.sum_sq - arm.sum**2 / arm.n) / (arm.n - 1)
    total = arm.sum + low + high
    augmented = (arm.sum_sq + low**2 + high**2 - total**2 / (arm.n + 2)) / (arm.n + 1)
    return np.maximum(np.maximum(sample, augmented), 0.0)  # rounding can push a true zero slightly negative


def _judge_quantile(guardrail: Guardrail, c: np.ndarray, t: np.ndarray, alpha: float, min_users: int) -> Judgement:
    n_c, n_t = c.shape[1], t.shape[1]
    rows = max(c.shape[0], t.shape[0])
    fraction = max(min(n_c, n_t), 1) / min_users
    lo, hi, rel_lo, rel_hi, xc, xt, _ = asymptotic_bounds(c, t, guardrail.q, alpha, 1.0, fraction)
    s = guardrail.sign
    harm = s * (xt - xc)
    if guardrail.relative:
        margin = guardrail.margin * xc
        low, high = (rel_lo, rel_hi) if s > 0 else (-rel_hi, -rel_lo)
        low, high = np.nan_to_num(low * xc, nan=-np.inf), np.nan_to_num(high * xc, nan=np.inf)
    else:
        margin = np.full(rows, guardrail.margin)
        low, high = (lo, hi) if s > 0 else (-hi, -lo)
    counts = (np.full(rows, n_c), np.full(rows, n_t))
    return Judgement(xc, xt, harm, low, high, margin, *counts)


def _arm_rows(guardrail: Guardrail, arm: str, data: ArmData | None) -> Sums | np.ndarray:
    """One row of the arm's data for ``judge``; none yet is an arm without users."""
    value = None if data is None else data.get(guardrail.metric)
    if guardrail.kind == "quantile":
        values = np.empty(0) if value is None or isinstance(value, MeanStats) else np.asarray(value, dtype=float)
        if isinstance(value, MeanStats) or values.ndim != 1 or not np.all(np.isfinite(values)):
            raise ValueError(
                f"guardrail {guardrail.metric} is a quantile: the {arm} arm needs its per-user values, a 1-D array "
                "of finite numbers"
            )
        return np.sort(values)[None, :]
    if value is None:
        return Sums.of(MeanStats(0, 0.0, 0.0))
    if not isinstance(value, MeanStats):
        raise ValueError(
            f"guardrail {guardrail.metric} is a {guardrail.kind}: the {arm} arm needs stats.MeanStats of the "
            f"per-user values, not {type(value).__name__}"
        )
    if guardrail.kind == "share" and value.n > 0 and not 0 <= value.mean <= 1:
        raise ValueError(
            f"guardrail {guardrail.metric} is a share: per-user values lie in 0..1, but the {arm} arm's mean is "
            f"{value.mean:g}"
        )
    return Sums.of(value)


def _check_settings(guardrails: Sequence[Guardrail], min_users: int, alpha: float) -> None:
    if not guardrails:
        raise ValueError("no guardrails: a rollout needs at least one (DEFAULT_GUARDRAILS has four)")
    names = [g.metric for g in guardrails]
    if doubled := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"guardrails named twice: {', '.join(doubled)}; each metric has one margin")
    if min_users < MIN_USERS_FOR_VARIANCE:
        raise ValueError(f"min_users must be at least {MIN_USERS_FOR_VARIANCE} (a variance needs two), not {min_users}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be strictly between 0 and 1, not {alpha}")


def _result(guardrail: Guardrail, j: Judgement, min_users: int) -> GuardrailResult:
    if bool(j.breached[0]):
        status = "breached"
    elif bool(j.within(min_users)[0]):
        status = "within margin"
    elif min(int(j.n_control[0]), int(j.n_treatment[0])) < _users_needed(guardrail, min_users):
        status = "too few users"
    else:
        status = "inconclusive"
    return GuardrailResult(
        guardrail=guardrail,
        status=status,
        control=float(j.control[0]),
        treatment=float(j.treatment[0]),
        harm=float(j.harm[0]),
        ci_low=float(j.low[0]),
        ci_high=float(j.high[0]),
        margin=float(j.margin[0]),
        n_control=int(j.n_control[0]),
        n_treatment=int(j.n_treatment[0]),
    )


def _users_needed(guardrail: Guardrail, min_users: int) -> int:
    """Users per arm before the guardrail can show non-inferiority: ``min_users``, and a quantile's own minimum."""
    return max(min_users, min_users_for_quantile(guardrail.q)) if guardrail.kind == "quantile" else min_users


def _reason(decision: Decision, results: Sequence[GuardrailResult], step: StepData, min_users: int) -> str:
    if decision == Decision.ROLLBACK:
        breached = [_describe(r) for r in results if r.status == "breached"]
        return "harm beyond the margin: " + "; ".join(breached)
    if decision == Decision.ADVANCE:
        return f"every guardrail is within its margin with at least {min_users} users per arm: " + "; ".join(
            _describe(r) for r in results
        )
    missing = [arm for arm, data in (("control", step.control), ("treatment", step.treatment)) if data is None]
    if missing:
        return f"holding: no {' or '.join(missing)} users in this step yet"
    parts = []
    if short := [r for r in results if r.status == "too few users"]:
        parts.append("too few users: " + "; ".join(_shortfall(r, min_users) for r in short))
    if open_ := [r for r in results if r.status == "inconclusive"]:
        parts.append("harm not yet shown to be within the margin: " + "; ".join(_describe(r) for r in open_))
    return "holding: " + "; ".join(parts)


def _describe(r: GuardrailResult) -> str:
    interval = f"[{r.ci_low:+.4g}, {r.ci_high:+.4g}]" if math.isfinite(r.ci_low) else "[unbounded]"
    return (
        f"{r.guardrail.metric} {r.harm:+.4g} {interval} against margin {r.margin:+.4g} (control {r.control:.4g}, "
        f"treatment {r.treatment:.4g}; {r.n_control}/{r.n_treatment} users)"
    )


def _shortfall(r: GuardrailResult, min_users: int) -> str:
    need = _users_needed(r.guardrail, min_users)
    arms = [f"{arm} has {n}" for arm, n in (("control", r.n_control), ("treatment", r.n_treatment)) if n < need]
    return f"{r.guardrail.metric} needs {need} per arm ({', '.join(arms)})"
