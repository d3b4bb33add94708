"""A/B-test statistics from sufficient statistics.

ClickHouse reduces each arm to a handful of sums, so a report over millions of users never moves per-user rows
into Python::

    SELECT variant, count() AS n, sum(y) AS sum, sum(y * y) AS sum_sq,
           sum(x) AS pre_sum, sum(x * x) AS pre_sum_sq, sum(x * y) AS cross_sum
    FROM per_user_metric GROUP BY variant

One row per user (the unit of randomization) is assumed: sums over requests would understate the variance.
Only ``quantile_lift`` and ``cap_values`` need raw values, because a quantile has no sufficient statistic.
Sums of squares lose precision when the mean is huge next to the spread; aggregate in Float64, or centre the
metric first (for example subtract a round baseline), if that is a concern.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

MIN_USERS_FOR_VARIANCE = 2  # a sample variance divides by n - 1
POWER = 0.8  # the chance to detect the lift that an experiment is sized for, unless told otherwise


class InsufficientSampleError(ValueError):
    """An arm has too few users (or no denominator) to estimate its variance."""


@dataclass(frozen=True)
class MeanStats:
    """Per-arm sufficient statistics of a per-user metric y, optionally with a pre-period covariate x.

    The covariate sums run over the ``pre_n`` users that have a pre-period value (all ``n`` when ``pre_n`` is
    None), and ``pre_y_sum`` is the sum of y over those users; ``cuped_lift`` imputes x for the others.
    """

    n: int
    sum: float
    sum_sq: float
    pre_sum: float | None = None
    pre_sum_sq: float | None = None
    cross_sum: float | None = None  # sum of x * y
    pre_n: int | None = None
    pre_y_sum: float | None = None

    @property
    def mean(self) -> float:
        return self.sum / self.n

    @property
    def variance(self) -> float:
        # Rounding can push a true zero slightly negative.
        return max(_sample_cov(self.n, self.sum, self.sum, self.sum_sq), 0.0)

    @property
    def has_covariate(self) -> bool:
        return None not in (self.pre_sum, self.pre_sum_sq, self.cross_sum)

    @property
    def covered(self) -> int:
        """Users with a pre-period value."""
        return self.n if self.pre_n is None else self.pre_n


@dataclass(frozen=True)
class RatioStats:
    """Per-arm sufficient statistics of a ratio metric sum(num) / sum(den), e.g. cost per successful image."""

    n: int
    num_sum: float
    num_sum_sq: float
    den_sum: float
    den_sum_sq: float
    cross_sum: float  # sum of num * den

    @property
    def ratio(self) -> float:
        return self.num_sum / self.den_sum


@dataclass(frozen=True)
class LiftResult:
    """Treatment versus control. For ratio and quantile metrics the "means" are the ratios or quantiles."""

    control_mean: float
    treatment_mean: float
    abs_lift: float  # treatment - control
    abs_ci_low: float
    abs_ci_high: float
    rel_lift: float  # treatment / control - 1
    rel_ci_low: float
    rel_ci_high: float
    p_value: float
    std_error: float  # of abs_lift
    n_control: int
    n_treatment: int
    method: str = ""  # "Welch", "CUPED", "delta method" or "quantile (Deng et al.)"
    variance_reduction: float | None = None  # CUPED: 1 - Var(adjusted lift) / Var(unadjusted lift)
    pre_coverage: float | None = None  # CUPED: share of users with a pre-period value


@dataclass(frozen=True)
class SrmResult:
    """Chi-square sample-ratio check; ``flagged`` when p_value < threshold."""

    chi2: float
    p_value: float
    flagged: bool
    expected_counts: dict[str, float]


@dataclass(frozen=True)
class SequentialInterval:
    """Always-valid interval for treatment mean - control mean at one look."""

    abs_lift: float
    ci_low: float
    ci_high: float
    n_control: int
    n_treatment: int


def sufficient_stats_from_values(values: ArrayLike, pre_values: ArrayLike | None = None) -> MeanStats:
    """MeanStats of per-user values (and their pre-period values, for CUPED; NaN: the user has none)."""
    y = np.asarray(values, dtype=float)
    if pre_values is None:
        return MeanStats(y.size, float(y.sum()), float(y @ y))
    x = np.asarray(pre_values, dtype=float)
    has = ~np.isnan(x)
    x, y_cov = x[has], y[has]
    return MeanStats(
        y.size,
        float(y.sum()),
        float(y @ y),
        float(x.sum()),
        float(x @ x),
        float(x @ y_cov),
        int(has.sum()),
        float(y_cov.sum()),
    )


def ratio_stats_from_values(numerators: ArrayLike, denominators: ArrayLike) -> RatioStats:
    """RatioStats of per-user numerators and denominators."""
    num = np.asarray(numerators, dtype=float)
    den = np.asarray(denominators, dtype=float)
    return RatioStats(
        num.size, float(num.sum()), float(num @ num), float(den.sum()), float(den @ den), float(num @ den)
    )


def cap_values(values: ArrayLike, upper_quantile: float) -> np.ndarray:
    """Winsorize from above: values over the ``upper_quantile`` of ``values`` are set to it.

    A few extreme users can dominate the variance of a mean; capping trades a little bias for much less noise.
    Use one cap for both arms (cap the pooled values, then split them) or the cap itself differs between arms
    and biases the lift. In ClickHouse the same is ``least(y, cap)`` with ``cap`` from ``quantile(q)(y)``.
    """
    array = np.asarray(values, dtype=float)
    return np.minimum(array, np.quantile(array, upper_quantile))


def mean_lift(control: MeanStats, treatment: MeanStats, alpha: float = 0.05) -> LiftResult:
    """Welch t interval and p-value for the difference in means; delta-method interval for relative lift."""
    _check_users("control", control.n)
    _check_users("treatment", treatment.n)
    var_c = control.variance / control.n
    var_t = treatment.variance / treatment.n
    _check_spread(var_c, var_t)
    # Welch-Satterthwaite: with unequal variances the t statistic's df lies between min(n) - 1 and sum(n) - 2.
    df = (var_c + var_t) ** 2 / (var_c**2 / (control.n - 1) + var_t**2 / (treatment.n - 1))
    return _lift_result(control.mean, treatment.mean, var_c, var_t, df, control.n, treatment.n, alpha, "Welch")


def cuped_lift(control: MeanStats, treatment: MeanStats, alpha: float = 0.05) -> LiftResult:
    """CUPED: ``mean_lift`` on y - theta * (x - mean(x)), with x the pre-period covariate in both arms' stats.

    The adjustment removes the part of y that the pre-period predicts, so the variance of the lift drops by
    about (1 - rho^2), rho being corr(x, y); x predates the experiment, so the lift stays unbiased. The result's
    ``variance_reduction`` is 1 - Var(adjusted lift) / Var(unadjusted lift), which is rho^2 for the pooled theta.

    Users without a pre-period value (``pre_n`` < ``n``: new users, or no succeeded request to average) get the
    mean x of the users that have one, pooled over both arms. Every user stays in the comparison, so the lift
    estimates the same thing Welch's does, and it stays unbiased: the imputed value depends on pre-period data
    only, never on the arm's outcome. An imputed user's centred x is about 0, so it is left nearly unadjusted and
    theta is fitted on the covered users; the reduction shrinks towards coverage * rho^2 instead of being
    distorted, as writing 0 for "no value" would distort both theta and the reduction. ``pre_coverage`` reports
    the share of covered users.
    """
    for name, arm in (("control", control), ("treatment", treatment)):
        _check_users(name, arm.n)
        if not arm.has_covariate:
            raise ValueError(f"{name} stats lack pre_sum, pre_sum_sq or cross_sum; CUPED needs the covariate")
    covered = control.covered + treatment.covered
    if covered == 0:
        raise ValueError("no user has a pre-period value, so CUPED has no covariate; call mean_lift")
    fill = (control.pre_sum + treatment.pre_sum) / covered
    control, treatment = _impute(control, fill), _impute(treatment, fill)
    # Within-arm pooled moments: a treatment effect moves the arm means of y but not these.
    sxy = sum(a.cross_sum - a.sum * a.pre_sum / a.n for a in (control, treatment))
    sxx = sum(a.pre_sum_sq - a.pre_sum**2 / a.n for a in (control, treatment))
    if sxx <= 0:
        raise ValueError("the pre-period covariate is constant, so CUPED cannot use it; call mean_lift")
    theta = sxy / sxx
    # Centring on the pooled pre-period mean keeps the adjusted means on y's scale (needed for relative lift).
    pre_mean = (control.pre_sum + treatment.pre_sum) / (control.n + treatment.n)
    adjusted = mean_lift(_adjust(control, theta, pre_mean), _adjust(treatment, theta, pre_mean), alpha)
    plain = mean_lift(control, treatment, alpha)
    return dataclasses.replace(
        adjusted,
        method="CUPED",
        variance_reduction=1 - (adjusted.std_error / plain.std_error) ** 2,
        pre_coverage=covered / (control.n + treatment.n),
    )


def ratio_lift(control: RatioStats, treatment: RatioStats, alpha: float = 0.05) -> LiftResult:
    """Difference of sum(num) / sum(den) between arms; delta-method variances, normal interval.

    Numerator and denominator are correlated per user (users with more images cost more), which is why the
    ratio needs the cross-product sum and cannot be treated as a mean over requests.
    """
    c, var_c = _ratio_estimate("control", control)
    t, var_t = _ratio_estimate("treatment", treatment)
    _check_spread(var_c, var_t)
    return _lift_result(c, t, var_c, var_t, math.inf, control.n, treatment.n, alpha, "delta method")


def quantile_lift(control_values: ArrayLike, treatment_values: ArrayLike, q: float, alpha: float = 0.05) -> LiftResult:
    """Difference of the q-th quantiles (e.g. q=0.95 for p95 latency) with a normal interval.

    Takes raw per-user values because a quantile has no sufficient statistic (in ClickHouse, select the values
    or a uniform sample of them). Each arm's standard error comes from the order-statistic interval of Deng,
    Knoblich & Yu (2018), "Applying the Delta Method in Metric Analytics", section 4: the ranks
    n*q -/+ z*sqrt(n*q*(1-q)) bracket the quantile with probability 1 - alpha (binomial, normal
    approximation), and the values at those ranks span 2 * z standard errors. Values must be independent,
    one per user.
    """
    z = stats.norm.ppf(1 - alpha / 2)
    c_values = np.asarray(control_values, dtype=float)
    t_values = np.asarray(treatment_values, dtype=float)
    c, var_c = _quantile_estimate("control", c_values, q, z)
    t, var_t = _quantile_estimate("treatment", t_values, q, z)
    _check_spread(var_c, var_t)
    return _lift_result(c, t, var_c, var_t, math.inf, c_values.size, t_values.size, alpha, "quantile (Deng et al.)")


def sequential_interval(
    control: MeanStats, treatment: MeanStats, tau_sq: float, alpha: float = 0.05
) -> SequentialInterval:
    """Always-valid interval for treatment mean - control mean: safe to recompute after every batch of users.

    The chance that the interval misses the true difference at ANY look, however many there are, is at most
    alpha, so the experiment may be stopped as soon as the interval excludes zero. This is the mixture SPRT of
    Johari et al. (2017, "Peeking at A/B tests" / "Always valid inference"), equivalently the two-sided normal
    mixture boundary of Howard et al. (2021): with s^2 the variance of the difference at this look,

        |diff - true| <= sqrt(s^2 * (s^2 + tau_sq) / tau_sq * log((s^2 + tau_sq) / (s^2 * alpha^2)))

    ``tau_sq`` is the variance of the mixture over effects, in squared metric units: set it near the square of
    the effect you hope to detect. The interval is wider than the fixed-horizon one at every look; that is the
    price of peeking. Variances are estimated from the data, so validity is asymptotic (hundreds of users).
    """
    _check_users("control", control.n)
    _check_users("treatment", treatment.n)
    s_sq = control.variance / control.n + treatment.variance / treatment.n
    _check_spread(s_sq, 0.0)
    radius = math.sqrt(s_sq * (s_sq + tau_sq) / tau_sq * math.log((s_sq + tau_sq) / (s_sq * alpha**2)))
    diff = treatment.mean - control.mean
    return SequentialInterval(diff, diff - radius, diff + radius, control.n, treatment.n)


def srm_check(
    observed_counts: Mapping[str, int], expected_weights: Mapping[str, float], threshold: float = 0.001
) -> SrmResult:
    """Sample-ratio mismatch: chi-square goodness of fit of users per variant against the planned split.

    A flag means assignment or logging is broken (a variant crashes, drops events, or redirects users), and no
    lift from this experiment should be trusted until the cause is found. The strict default threshold keeps
    false alarms rare when many experiments are checked every day.
    """
    if observed_counts.keys() != expected_weights.keys():
        seen, planned = sorted(observed_counts), sorted(expected_weights)
        raise ValueError(f"variants differ: observed {seen}, expected {planned}")
    variants = sorted(observed_counts)
    observed = np.array([observed_counts[v] for v in variants], dtype=float)
    weights = np.array([expected_weights[v] for v in variants], dtype=float)
    if observed.sum() == 0:
        raise InsufficientSampleError("no users have been assigned yet; the SRM check needs at least 1")
    expected = observed.sum() * weights / weights.sum()
    chi2, p_value = stats.chisquare(observed, expected)
    expected_counts = dict(zip(variants, expected.tolist(), strict=True))
    return SrmResult(float(chi2), float(p_value), bool(p_value < threshold), expected_counts)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error rate), in input order. SciPy has no Holm; statsmodels'
    ``multipletests`` does, but would add a large dependency for these few lines."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    m = p.size
    # The k-th smallest p (k from 0) is tested at alpha / (m - k); a running max keeps the result monotone.
    adjusted = np.minimum(np.maximum.accumulate((m - np.arange(m)) * p[order]), 1.0)
    return _in_input_order(adjusted, order)


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg step-up adjusted p-values (false discovery rate), in input order: SciPy's."""
    if len(pvalues) == 0:
        return []
    return [float(q) for q in stats.false_discovery_control(np.asarray(pvalues, dtype=float), method="bh")]


def one_sided_p(lift: LiftResult, harmful_sign: int) -> float:
    """P-value of the one-sided test that the lift goes the harmful way (``harmful_sign`` +1: up, -1: down).

    Every interval here is symmetric (t or normal), so it is half the two-sided p when the estimate points the
    harmful way and 1 - half otherwise.
    """
    half = lift.p_value / 2
    if lift.abs_lift == 0:
        return 0.5
    return half if math.copysign(1, lift.abs_lift) == harmful_sign else 1 - half


def per_user_sd(std_error: float, n_control: int, n_treatment: int) -> float:
    """The per-user standard deviation implied by a lift's standard error, as if both arms shared it.

    It carries whatever the method removed or added (CUPED's reduction, the delta method's ratio variance, a
    quantile's order-statistic spread), so it sizes a future experiment measured the same way.
    """
    return std_error / math.sqrt(1 / n_control + 1 / n_treatment)


def minimum_detectable_lift(std_error: float, alpha: float = 0.05, power: float = POWER) -> float:
    """The smallest absolute lift that a comparison with this standard error detects with ``power`` (two-sided)."""
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * std_error)


def required_sample_size(
    baseline_mean: float, baseline_sd: float, mde_relative: float, alpha: float = 0.05, power: float = POWER
) -> int:
    """Users per arm (equal arms) for a two-sided test to detect a relative lift of ``mde_relative``."""
    effect = abs(mde_relative * baseline_mean)
    if effect == 0:
        raise ValueError("baseline_mean and mde_relative must both be nonzero")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return math.ceil(2 * (z * baseline_sd / effect) ** 2)


def _sample_cov(n: int, sum_a: float, sum_b: float, sum_ab: float) -> float:
    return (sum_ab - sum_a * sum_b / n) / (n - 1)


def _ratio_var(a: float, b: float, var_a: float, var_b: float, cov_ab: float) -> float:
    """Delta method: variance of a / b from the variances and covariance of the estimates a and b."""
    r = a / b
    return (var_a - 2 * r * cov_ab + r**2 * var_b) / b**2


def _check_users(arm: str, n: int) -> None:
    if n < MIN_USERS_FOR_VARIANCE:
        raise InsufficientSampleError(
            f"the {arm} arm has {n} user(s); at least {MIN_USERS_FOR_VARIANCE} per arm are needed to estimate a "
            f"variance ({MIN_USERS_FOR_VARIANCE - n} more). Wait for more traffic before reading this experiment."
        )


def _check_spread(var_c: float, var_t: float) -> None:
    if var_c + var_t <= 0:
        raise ValueError("both arms have zero variance (constant or fully tied values); nothing to test")


def _impute(arm: MeanStats, fill: float) -> MeanStats:
    """``arm`` with x = ``fill`` for its users without a pre-period value, expanded algebraically from the sums."""
    missing = arm.n - arm.covered
    if missing == 0:
        return arm
    if arm.pre_y_sum is None:
        raise ValueError("pre_n < n needs pre_y_sum, the sum of y over the users with a pre-period value")
    y_sum_missing = arm.sum - arm.pre_y_sum
    return MeanStats(
        n=arm.n,
        sum=arm.sum,
        sum_sq=arm.sum_sq,
        pre_sum=arm.pre_sum + missing * fill,
        pre_sum_sq=arm.pre_sum_sq + missing * fill**2,
        cross_sum=arm.cross_sum + fill * y_sum_missing,
    )


def _adjust(arm: MeanStats, theta: float, pre_mean: float) -> MeanStats:
    """MeanStats of y' = y - theta * (x - pre_mean), expanded algebraically from the sums."""
    centred_sum = arm.pre_sum - arm.n * pre_mean
    centred_sum_sq = arm.pre_sum_sq - 2 * pre_mean * arm.pre_sum + arm.n * pre_mean**2
    centred_cross = arm.cross_sum - pre_mean * arm.sum
    return MeanStats(
        n=arm.n,
        sum=arm.sum - theta * centred_sum,
        sum_sq=arm.sum_sq - 2 * theta * centred_cross + theta**2 * centred_sum_sq,
    )


def _ratio_estimate(name: str, arm: RatioStats) -> tuple[float, float]:
    _check_users(name, arm.n)
    if arm.den_sum == 0:
        raise InsufficientSampleError(
            f"the {name} arm's denominator sums to 0 over {arm.n} users; the ratio needs at least one user "
            "with a nonzero denominator (e.g. one successful image)."
        )
    n = arm.n
    var_num = _sample_cov(n, arm.num_sum, arm.num_sum, arm.num_sum_sq) / n
    var_den = _sample_cov(n, arm.den_sum, arm.den_sum, arm.den_sum_sq) / n
    cov = _sample_cov(n, arm.num_sum, arm.den_sum, arm.cross_sum) / n
    return arm.ratio, _ratio_var(arm.num_sum / n, arm.den_sum / n, var_num, var_den, cov)


def _quantile_estimate(name: str, values: np.ndarray, q: float, z: float) -> tuple[float, float]:
    n = values.size
    _check_users(name, n)
    ordered = np.sort(values)
    half_width = z * math.sqrt(n * q * (1 - q))
    # 1-based ranks, rounded outwards so the interval is never narrower than its normal approximation.
    low_rank = max(math.floor(n * q - half_width), 1)
    high_rank = min(math.ceil(n * q + half_width), n)
    std_error = (ordered[high_rank - 1] - ordered[low_rank - 1]) / (2 * z)
    return float(np.quantile(ordered, q)), float(std_error**2)


def _lift_result(
    c: float, t: float, var_c: float, var_t: float, df: float, n_c: int, n_t: int, alpha: float, method: str
) -> LiftResult:
    """Interval and p-value for t - c from the variances of the arm estimates; df=inf: normal interval."""
    se = math.sqrt(var_c + var_t)
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    diff = t - c
    p_value = float(2 * stats.t.sf(abs(diff) / se, df))
    if c == 0:
        rel = rel_low = rel_high = math.nan  # a relative lift over zero is undefined
    else:
        # Relative lift t / c - 1 by the delta method; the arms are independent, so their covariance is 0.
        rel = t / c - 1
        rel_half = float(stats.norm.ppf(1 - alpha / 2)) * math.sqrt(_ratio_var(t, c, var_t, var_c, 0.0))
        rel_low, rel_high = rel - rel_half, rel + rel_half
    return LiftResult(
        control_mean=c,
        treatment_mean=t,
        abs_lift=diff,
        abs_ci_low=diff - crit * se,
        abs_ci_high=diff + crit * se,
        rel_lift=rel,
        rel_ci_low=rel_low,
        rel_ci_high=rel_high,
        p_value=p_value,
        std_error=se,
        n_control=n_c,
        n_treatment=n_t,
        method=method,
    )


def _in_input_order(sorted_values: np.ndarray, order: np.ndarray) -> list[float]:
    out = np.empty_like(sorted_values)
    out[order] = sorted_values
    return out.tolist()
