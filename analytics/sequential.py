"""Always-valid (sequential) confidence intervals for the difference of a quantile (p50, p95 latency) between
two arms, safe to recompute at every look, and the simulation that shows it.

Construction (the default, ``method="asymptotic"``)
----------------------------------------------------
An asymptotic confidence sequence (Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas 2021, "Time-uniform central
limit theory and asymptotic confidence sequences", arXiv:2103.06476) applied to the quantile's influence
function. The sample q-quantile is asymptotically linear (Bahadur 1966):

    xi_hat - xi = mean_i (q - 1{X_i <= xi}) / f(xi) + O(n^-3/4 log n)   almost surely,

so it behaves like a running mean of i.i.d. terms with variance q(1-q)/f(xi)^2, and the remainder is smaller than
the width of any confidence sequence (~ sqrt(log n / n)), which is the condition of Waudby-Smith et al.'s
theorem. With users randomized one by one, the treatment-minus-control difference is a mean over all t enrolled
users of inverse-probability-weighted influence terms, whose variance divided by t is

    s^2 = se_c^2 + se_t^2,   se_arm^2 = q(1-q) / (n_arm f_arm(xi_arm)^2),

and each arm's 1/f(xi) is Siddiqui's (1960) difference quotient of order statistics, (X_(hi) - X_(lo)) / ((hi - lo) / n)
at ranks n*(q -/+ h), with Hall & Sheather's (1988) bandwidth h ~ n^(-1/3), the default of Koenker's quantreg
(Koenker 2005, "Quantile Regression", ch. 3). ``stats.quantile_lift``'s bracket (Deng, Knoblich & Yu 2018:
ranks n*q -/+ 1.96*sqrt(n*q*(1-q)), h ~ n^(-1/2)) spans so few order statistics that its standard error is
noisy, and a noisy standard error under-covers: 94.4 % for p50 at 30 looks (4000 simulated experiments),
against 95.0 % with Hall & Sheather's. The interval is the two-sided Robbins normal-mixture boundary on that
running mean,

    |diff - true| <= scale * s * sqrt((x + 1) / x * log((x + 1) / alpha^2)),   x = c(alpha) * t / t_planned,

the same boundary as ``stats.sequential_interval`` (the two-sided normal mixture of Howard, Ramdas, McAuliffe &
Sekhon 2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences"), with the mixture variance that
makes it tightest at ``planned_users``, c(alpha) = -2 log alpha + log(1 - 2 log alpha) (7.94 for alpha = 0.05),
as they recommend for a target sample size. The relative lift uses the same boundary on log(xi_t) - log(xi_c) (delta
method: se_log = se / xi), mapped back with exp(.) - 1, so it is asymmetric and never crosses -100 %.

Two calibrations of ``scale``:

* ``max_looks=None``: scale = 1. By Ville's inequality the interval misses the true difference at ANY time
  with probability <= alpha, under continuous monitoring and for any number of looks. With only 30 looks it
  is conservative: 98-99 % simultaneous coverage (Brownian motion between the looks could have crossed).
* ``max_looks=K``: scale < 1 is solved so that the chance of missing at any of K looks spread evenly up to
  ``planned_users`` is exactly alpha in the Gaussian limit (recursive numerical integration of Brownian
  motion over the looks, Armitage, McPherson & Rowe 1969). These are "repeated confidence intervals"
  (Jennison & Turnbull 1989; 2000, ch. 9) with the mixture's shape: stop at any of the K looks for any
  reason, but take no more than K. Coverage at 30 daily looks is 94-96 %, within the 93-97 % asked for, also
  with uneven daily traffic (weekends at 40 %; see ``benchmarks/sequential_coverage.py``).

Validity is asymptotic in both: the density estimate needs a minimum of users per arm (13 for p50, 77 for p95:
``min_users_for_quantile``; below it the interval is infinite and ``reason`` says why), and the data must be
continuous (heavy ties at the quantile make its density, hence its standard error, meaningless).

``method="distribution_free"`` is the finite-sample alternative: each arm's quantile gets the confidence
sequence of Howard & Ramdas (2022, "Sequential estimation of quantiles with applications to A/B-testing and
best-arm identification", Bernoulli; their bound for one fixed quantile): the count #{X_i <= xi_q} is
Binomial(n, q) at the true quantile, a beta-binomial mixture martingale bounds it at all n by Ville's
inequality, and the count bounds become order statistics. The two arms are combined by a union bound (alpha/2
each) into [lo_t - hi_c, hi_t - lo_c]. It needs no density and no asymptotics, and is valid for any
distribution and any number of looks, but the union bound and interval arithmetic make it wide (1.8 times the
calibrated interval; over 99.9 % coverage at 30 looks), so it is not the default.

CUPED for quantiles: not implemented, deliberately
--------------------------------------------------
It can be justified in theory: the quantile is asymptotically linear, so it can be augmented like a mean
(Deng et al. 2023, "From Augmentation to Decomposition: A New Look at CUPED"): subtract
theta * (mean pre-period covariate, treatment - control) with theta = cov(IF, Z) / var(Z), where
cov(IF, Z) = -cov(1{X <= xi}, Z) / f(xi), and the variance shrinks by 1 - corr(1{X <= xi}, Z)^2. It is not
done here because (1) the pipeline has nothing to feed it: quantile metrics have no pre-period value
(``sufficient_stats.Metric.pre_value`` is for mean metrics) and ``fetch_values`` returns values without the
user's pre-period value, so it would be a statistic without data; (2) the gain is modest: being below the
quantile correlates less with last period's latency than the latency itself does (lognormal latency whose logs
correlate 0.7 between periods: corr(1{X <= xi}, Z) = 0.50 at p50 and 0.42 at p95, so 25 % and 18 % less
variance, against 44 % for the mean), and (3) it adds a
second estimated nuisance (theta, through the same density estimate) to an interval whose early looks are
already the weak point of the asymptotics. Worth doing once per-user pre-period values are pulled with the
quantile values.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special, stats

Method = Literal["asymptotic", "distribution_free"]

Z_975 = float(stats.norm.ppf(0.975))  # Hall & Sheather's bandwidth is for 95 % intervals; it is a smoothing choice
MAX_CALIBRATED_LOOKS = 100  # beyond this, max_looks=None is within a point of the calibrated interval anyway


@dataclass(frozen=True)
class SequentialQuantileInterval:
    """Always-valid interval for treatment q-quantile - control q-quantile at one look.

    ``ci_low``/``ci_high`` are -inf/+inf, and the relative fields NaN, when the look cannot bound the
    difference; ``reason`` says why (empty when both intervals are finite).
    """

    q: float
    control: float  # the arms' sample quantiles (numpy's linear interpolation, as ``quantile_lift``)
    treatment: float
    estimate: float  # treatment - control
    ci_low: float
    ci_high: float
    rel_estimate: float  # treatment / control - 1
    rel_ci_low: float
    rel_ci_high: float
    n_control: int
    n_treatment: int
    reason: str = ""


@dataclass(frozen=True)
class CoverageResult:
    """Share of simulated experiments whose interval covered the true difference at every look at once, and
    the intervals' mean width at the last look in units of the naive (fixed-horizon) interval's width."""

    q: float
    experiments: int
    looks: int
    users_per_arm: int  # at the last look
    calibrated: float  # asymptotic, max_looks=looks: the default for a planned number of looks
    calibrated_relative: float  # the same for the relative lift (a look without a relative bound counts as covered)
    continuous: float  # asymptotic, max_looks=None: valid under continuous monitoring
    distribution_free: float
    naive: float  # ``stats.quantile_lift``'s fixed-horizon interval recomputed at every look
    naive_last_look: float  # the same interval at the last look only: what it is designed for
    width_calibrated: float
    width_continuous: float
    width_distribution_free: float


@functools.lru_cache(maxsize=64)  # a search over n, asked at every look of a rollout
def min_users_for_quantile(q: float) -> int:
    """Users an arm needs before its quantile's standard error can be estimated: the ranks n*(q -/+ h) of the
    density estimate must fall inside 1..n."""
    _check_q(q)
    n = 2
    while _sparsity_ranks(n, q) is None:
        n += 1
    return n


def quantile_confidence_sequence(
    control_values: ArrayLike,
    treatment_values: ArrayLike,
    q: float,
    alpha: float = 0.05,
    *,
    planned_users: int,
    max_looks: int | None = None,
    method: Method = "asymptotic",
) -> SequentialQuantileInterval:
    """Always-valid interval for the difference (and relative lift) of the q-quantile, treatment - control.

    Pass every user seen so far (one value per user, e.g. mean latency) and the SAME ``planned_users`` (total
    users, both arms, that the experiment is planned to reach) and ``max_looks`` at every look; changing them
    between looks voids the guarantee. ``max_looks=None`` stays valid however often you look; ``max_looks=K``
    is tighter and valid for up to K looks spread over the plan (see the module docstring).
    """
    c_values, t_values = _values("control", control_values), _values("treatment", treatment_values)
    (interval,) = quantile_sequence_at_looks(
        c_values,
        t_values,
        q,
        [(c_values.size, t_values.size)],
        alpha,
        planned_users=planned_users,
        max_looks=max_looks,
        method=method,
    )
    return interval


def quantile_sequence_at_looks(
    control_values: ArrayLike,
    treatment_values: ArrayLike,
    q: float,
    looks: Sequence[int] | Sequence[tuple[int, int]],
    alpha: float = 0.05,
    *,
    planned_users: int | None = None,
    max_looks: int | None = None,
    method: Method = "asymptotic",
) -> list[SequentialQuantileInterval]:
    """The confidence sequence at each look, from values in arrival order.

    A look is the number of users seen so far in each arm: an int (both arms) or (n_control, n_treatment);
    the look sees the first users of each array. ``planned_users`` defaults to the total at the last look.
    """
    _check_q(q)
    _check_alpha(alpha)
    if method not in ("asymptotic", "distribution_free"):
        raise ValueError(f"unknown method {method!r}; methods: asymptotic, distribution_free")
    c_values, t_values = _values("control", control_values), _values("treatment", treatment_values)
    sizes = [(look, look) if isinstance(look, int | np.integer) else tuple(look) for look in looks]
    for n_c, n_t in sizes:
        if not (0 <= n_c <= c_values.size and 0 <= n_t <= t_values.size):
            raise ValueError(f"look ({n_c}, {n_t}) asks for more users than given ({c_values.size}, {t_values.size})")
    if planned_users is None:
        planned_users = max((sum(s) for s in sizes), default=0)
    if planned_users < 1:
        raise ValueError(f"planned_users must be at least 1, not {planned_users}")
    scale = 1.0 if max_looks is None else calibrated_scale(max_looks, alpha)
    out = []
    for n_c, n_t in sizes:
        c = np.sort(c_values[:n_c])[None, :]
        t = np.sort(t_values[:n_t])[None, :]
        if method == "asymptotic":
            bounds = asymptotic_bounds(c, t, q, alpha, scale, (n_c + n_t) / planned_users)
        else:
            bounds = _distribution_free(c, t, q, alpha, planned_users)
        out.append(_interval(q, bounds, n_c, n_t))
    return out


@functools.lru_cache(maxsize=128)
def calibrated_scale(max_looks: int, alpha: float = 0.05) -> float:
    """Factor on the normal-mixture boundary that makes P(miss at any of ``max_looks`` evenly spread looks)
    = alpha for Brownian motion (1 means the continuous-monitoring boundary)."""
    _check_alpha(alpha)
    if not 1 <= max_looks <= MAX_CALIBRATED_LOOKS:
        raise ValueError(
            f"max_looks must be 1..{MAX_CALIBRATED_LOOKS}, not {max_looks}; for more looks use max_looks=None"
        )
    info = np.arange(1, max_looks + 1) / max_looks
    shape = mixture_shape(info, alpha)
    # Scale 1 is Ville's bound, which never misses more than alpha; a tiny scale misses almost surely.
    return float(optimize.brentq(lambda c: 1 - _stay_probability(info, c * shape) - alpha, 0.05, 1.0, xtol=1e-7))


def coverage_simulation(
    q: float,
    experiments: int = 2000,
    looks: int = 30,
    users_per_look: int | Sequence[int] = 200,
    alpha: float = 0.05,
    effect: float = -0.05,
    sigma: float = 0.6,
    seed: int = 0,
    chunk: int = 250,
) -> CoverageResult:
    """Simulated experiments with lognormal per-user latency (median 800 ms, log-sd ``sigma``); treatment is
    control * (1 + ``effect``), so the true difference is effect * the control quantile (effect=0: an A/A test).
    Each look adds ``users_per_look`` users to each arm (one number, or one per look for uneven traffic); the
    planned users are those of the last look. Every interval is computed on the same samples."""
    _check_q(q)
    _check_alpha(alpha)
    sizes = np.cumsum(np.broadcast_to(np.asarray(users_per_look, dtype=int), (looks,)))
    planned = 2 * int(sizes[-1])
    scale = calibrated_scale(looks, alpha)
    z = float(stats.norm.ppf(1 - alpha / 2))
    true_diff = effect * 800.0 * math.exp(sigma * float(stats.norm.ppf(q)))
    rng = np.random.default_rng(seed)
    names = ("calibrated", "calibrated_relative", "continuous", "distribution_free", "naive")
    hits = dict.fromkeys((*names, "naive_last_look"), 0)
    widths = dict.fromkeys(("calibrated", "continuous", "distribution_free"), 0.0)
    for start in range(0, experiments, chunk):
        rows = min(chunk, experiments - start)
        c_all = 800.0 * np.exp(sigma * rng.standard_normal((rows, int(sizes[-1]))))
        t_all = (1 + effect) * 800.0 * np.exp(sigma * rng.standard_normal((rows, int(sizes[-1]))))
        ok = {name: np.ones(rows, dtype=bool) for name in names}
        for n in sizes:
            c, t = np.sort(c_all[:, :n], axis=1), np.sort(t_all[:, :n], axis=1)
            fraction = 2 * int(n) / planned
            found = {
                "calibrated": asymptotic_bounds(c, t, q, alpha, scale, fraction),
                "continuous": asymptotic_bounds(c, t, q, alpha, 1.0, fraction),
                "distribution_free": _distribution_free(c, t, q, alpha, planned),
                "naive": _naive(c, t, q, z),
            }
            for name, (lo, hi, *_) in found.items():
                ok[name] &= (lo <= true_diff) & (true_diff <= hi)
            rel_lo, rel_hi = found["calibrated"][2:4]
            ok["calibrated_relative"] &= np.isnan(rel_lo) | ((rel_lo <= effect) & (effect <= rel_hi))
        naive_lo, naive_hi = found["naive"][:2]
        hits["naive_last_look"] += int(np.sum((naive_lo <= true_diff) & (true_diff <= naive_hi)))
        for name in widths:
            lo, hi = found[name][:2]
            widths[name] += float(np.sum((hi - lo) / (naive_hi - naive_lo)))
        for name in names:
            hits[name] += int(ok[name].sum())
    return CoverageResult(
        q=q,
        experiments=experiments,
        looks=looks,
        users_per_arm=int(sizes[-1]),
        **{name: count / experiments for name, count in hits.items()},
        **{f"width_{name}": total / experiments for name, total in widths.items()},
    )


# --- the statistics, vectorized over rows: each row of ``c``/``t`` is one experiment's sorted values ---

Bounds = tuple[np.ndarray, ...]  # lo, hi, rel_lo, rel_hi, control, treatment, reason code per row


def asymptotic_bounds(c: np.ndarray, t: np.ndarray, q: float, alpha: float, scale: float, fraction: float) -> Bounds:
    """Each row's asymptotic sequence: lo, hi (+/-inf if unbounded), rel_lo, rel_hi (NaN), quantiles, reason code."""
    xc, se_c, bad_c = _arm_estimate(c, q)
    xt, se_t, bad_t = _arm_estimate(t, q)
    width = scale * mixture_shape(np.asarray(fraction), alpha)
    radius = width * np.sqrt(se_c**2 + se_t**2)
    diff = xt - xc
    bad = np.maximum(bad_c, bad_t)
    lo, hi = np.where(bad > 0, -np.inf, diff - radius), np.where(bad > 0, np.inf, diff + radius)
    with np.errstate(divide="ignore", invalid="ignore"):
        positive = (xc > 0) & (xt > 0)
        log_diff = np.log(np.where(positive, xt, 1.0)) - np.log(np.where(positive, xc, 1.0))
        log_radius = width * np.sqrt((se_c / xc) ** 2 + (se_t / xt) ** 2)
    rel_ok = positive & (bad == 0)
    rel_lo = np.where(rel_ok, np.expm1(log_diff - log_radius), np.nan)
    rel_hi = np.where(rel_ok, np.expm1(log_diff + log_radius), np.nan)
    code = np.where(bad > 0, bad, np.where(rel_ok, 0, _NOT_POSITIVE))
    return lo, hi, rel_lo, rel_hi, xc, xt, code


def _distribution_free(c: np.ndarray, t: np.ndarray, q: float, alpha: float, planned_users: int) -> Bounds:
    # Each arm is planned to reach about half of planned_users.
    lo_c, hi_c = _arm_quantile_cs(c, q, alpha / 2, planned_users / 2)
    lo_t, hi_t = _arm_quantile_cs(t, q, alpha / 2, planned_users / 2)
    xc, xt = _sample_quantile(c, q), _sample_quantile(t, q)
    lo, hi = lo_t - hi_c, hi_t - lo_c
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_ok = (lo_c > 0) & (lo_t >= 0) & np.isfinite(hi_c) & np.isfinite(hi_t)
        rel_lo = np.where(rel_ok, lo_t / np.where(rel_ok, hi_c, 1.0) - 1, np.nan)
        rel_hi = np.where(rel_ok, hi_t / np.where(rel_ok, lo_c, 1.0) - 1, np.nan)
    finite = np.isfinite(lo) & np.isfinite(hi)
    empty = np.array([c.shape[1] == 0 or t.shape[1] == 0])
    code = np.where(empty, _NO_USERS, np.where(~finite, _TOO_FEW_FREE, np.where(rel_ok, 0, _NOT_POSITIVE)))
    return lo, hi, rel_lo, rel_hi, xc, xt, code


def _naive(c: np.ndarray, t: np.ndarray, q: float, z: float) -> Bounds:
    """``stats.quantile_lift``'s fixed-horizon interval, vectorized (ranks clipped into 1..n as it does)."""
    n_c, n_t = c.shape[1], t.shape[1]
    se = [_dky_se(v, n, q, z) for v, n in ((c, n_c), (t, n_t))]
    diff = _sample_quantile(t, q) - _sample_quantile(c, q)
    half = z * np.sqrt(se[0] ** 2 + se[1] ** 2)
    return diff - half, diff + half


def _arm_estimate(values: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample quantile, its standard error and a reason code (0 = fine) for each row."""
    rows, n = values.shape
    if n == 0:
        nan = np.full(rows, np.nan)
        return nan, nan, np.full(rows, _NO_USERS)
    ranks = _sparsity_ranks(n, q)
    if ranks is None:
        return _sample_quantile(values, q), np.full(rows, np.nan), np.full(rows, _TOO_FEW)
    low, high = ranks
    sparsity = (values[:, high - 1] - values[:, low - 1]) / ((high - low) / n)  # 1 / f(xi), Siddiqui
    se = sparsity * math.sqrt(q * (1 - q) / n)
    return _sample_quantile(values, q), se, np.where(se > 0, 0, _TIED)


def _sparsity_ranks(n: int, q: float) -> tuple[int, int] | None:
    """1-based ranks n*(q -/+ h) for Hall & Sheather's bandwidth h, or None where they leave 1..n."""
    x = float(stats.norm.ppf(q))
    h = n ** (-1 / 3) * Z_975 ** (2 / 3) * (1.5 * float(stats.norm.pdf(x)) ** 2 / (2 * x**2 + 1)) ** (1 / 3)
    low, high = math.floor(n * (q - h)), math.ceil(n * (q + h))
    return (low, high) if n >= 2 and low >= 1 and high <= n else None


def _dky_se(values: np.ndarray, n: int, q: float, z: float) -> np.ndarray:
    """``stats.quantile_lift``'s standard error: the spread of the order statistics at ranks
    n*q -/+ z*sqrt(n*q*(1-q)), rounded outwards and clipped into 1..n, over 2 * z."""
    half = z * math.sqrt(n * q * (1 - q))
    low, high = max(math.floor(n * q - half), 1), min(math.ceil(n * q + half), n)
    return (values[:, high - 1] - values[:, low - 1]) / (2 * z)


def _sample_quantile(values: np.ndarray, q: float) -> np.ndarray:
    """numpy's default (linear) quantile of each sorted row, without re-sorting."""
    n = values.shape[1]
    if n == 0:
        return np.full(values.shape[0], np.nan)
    pos = (n - 1) * q
    below = math.floor(pos)
    above = min(below + 1, n - 1)
    return values[:, below] + (pos - below) * (values[:, above] - values[:, below])


def mixture_shape(fraction: np.ndarray, alpha: float) -> np.ndarray:
    """Normal-mixture boundary in standard errors at ``fraction`` of the planned sample (Howard et al. 2021)."""
    x = _tuning(alpha) * np.asarray(fraction, dtype=float)
    return np.sqrt((x + 1) / x * np.log((x + 1) / alpha**2))


def _tuning(alpha: float) -> float:
    """Mixture precision, times the planned sample, that minimizes the boundary there (Howard et al. eq. (15))."""
    return -2 * math.log(alpha) + math.log(1 - 2 * math.log(alpha))


def _stay_probability(info: np.ndarray, z_bounds: np.ndarray) -> float:
    """P(|W(I_k)| / sqrt(I_k) < z_k at every k) for Brownian motion W, by recursive numerical integration on
    a grid of the continuation region (midpoint rule; the grid is much finer than one look's step)."""
    bounds = z_bounds * np.sqrt(info)
    steps = np.diff(info, prepend=0.0)
    points = max(200, math.ceil(12 * bounds.max() / math.sqrt(steps.min())))
    mass: np.ndarray | None = None
    grid_prev = np.zeros(1)
    for b, step in zip(bounds, steps, strict=True):
        grid = (np.arange(points) + 0.5) / points * 2 * b - b
        gap = grid[:, None] - grid_prev[None, :]
        kernel = np.exp(-(gap**2) / (2 * step)) * (2 * b / points / math.sqrt(2 * math.pi * step))
        mass = kernel[:, 0] if mass is None else kernel @ mass
        grid_prev = grid
    return float(mass.sum()) if mass is not None else 1.0


def _arm_quantile_cs(values: np.ndarray, q: float, alpha: float, planned: float) -> tuple[np.ndarray, np.ndarray]:
    """Howard & Ramdas's fixed-quantile confidence sequence for each sorted row: with S = #{X <= xi_q}, the
    beta-binomial mixture martingale M(S) = B(a + S, b + n - S) / B(a, b) / (q^S (1-q)^(n-S)) stays below
    1/alpha at all n with probability >= 1 - alpha; {S : M(S) < 1/alpha} = [l, h] (log M is convex in S), so
    xi_q lies in [X_(l), X_(h+1)]."""
    rows, n = values.shape
    if n == 0:
        return np.full(rows, -np.inf), np.full(rows, np.inf)
    # Beta prior with mean q and the spread of the normal mixture tuned at the planned sample (see _tuning).
    strength = max(planned / _tuning(alpha) - 1, 2.0)
    a, b = q * strength, (1 - q) * strength
    threshold = math.log(1 / alpha)

    def log_m(s: float) -> float:
        return special.betaln(a + s, b + n - s) - special.betaln(a, b) - s * math.log(q) - (n - s) * math.log(1 - q)

    centre = n * q  # log M is near its minimum (below 0) here
    low = 0 if log_m(0) < threshold else math.ceil(_root(log_m, 0.0, centre, threshold))
    high = n if log_m(n) < threshold else math.floor(_root(log_m, float(n), centre, threshold))
    lo = values[:, low - 1] if low >= 1 else np.full(rows, -np.inf)
    hi = values[:, high] if high + 1 <= n else np.full(rows, np.inf)
    return lo, hi


def _root(f: Callable[[float], float], outside: float, inside: float, level: float) -> float:
    """Where f crosses ``level`` between ``outside`` (f >= level) and ``inside`` (f < level), by bisection."""
    for _ in range(60):
        mid = (outside + inside) / 2
        if f(mid) >= level:
            outside = mid
        else:
            inside = mid
    return inside


_NO_USERS, _TOO_FEW, _TIED, _NOT_POSITIVE, _TOO_FEW_FREE = 1, 2, 3, 4, 5


def _interval(q: float, bounds: Bounds, n_c: int, n_t: int) -> SequentialQuantileInterval:
    lo, hi, rel_lo, rel_hi, xc, xt, code = (float(b[0]) for b in bounds)
    reasons = {
        0: "",
        _NO_USERS: "an arm has no users yet",
        _TOO_FEW: (
            f"too few users for the p{q * 100:g} standard error: each arm needs {min_users_for_quantile(q)} "
            f"(control has {n_c}, treatment {n_t}) so that users fall on both sides of the quantile"
        ),
        _TIED: "values are tied around the quantile, so its density (and standard error) cannot be estimated",
        _NOT_POSITIVE: "a quantile (or its lower bound) is not positive, so the relative lift is undefined",
        _TOO_FEW_FREE: f"too few users for a finite distribution-free bound on the p{q * 100:g} (control has "
        f"{n_c}, treatment {n_t})",
    }
    rel = xt / xc - 1 if xc > 0 and not math.isnan(xt) else math.nan
    return SequentialQuantileInterval(
        q=q,
        control=xc,
        treatment=xt,
        estimate=xt - xc,
        ci_low=lo,
        ci_high=hi,
        rel_estimate=rel,
        rel_ci_low=rel_lo,
        rel_ci_high=rel_hi,
        n_control=n_c,
        n_treatment=n_t,
        reason=reasons[int(code)],
    )


def _values(arm: str, values: ArrayLike) -> np.ndarray:
    out = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(out)):
        raise ValueError(f"the {arm} values contain NaN or infinite entries")
    return out


def _check_q(q: float) -> None:
    if not 0 < q < 1:
        raise ValueError(f"q must be strictly between 0 and 1 (e.g. 0.95 for p95), not {q}")


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be strictly between 0 and 1, not {alpha}")
