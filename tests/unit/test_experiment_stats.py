"""Experiment statistics: exactness against scipy on raw values, and coverage in vectorized simulations."""

import numpy as np
import pytest
from scipy import stats

from pixelpipe.analytics.stats import (
    InsufficientSampleError,
    MeanStats,
    benjamini_hochberg,
    cap_values,
    cuped_lift,
    holm,
    mean_lift,
    minimum_detectable_lift,
    one_sided_p,
    per_user_sd,
    quantile_lift,
    ratio_lift,
    ratio_stats_from_values,
    required_sample_size,
    sequential_interval,
    srm_check,
    sufficient_stats_from_values,
)


def batch_stats(values):
    """MeanStats of each row of a (simulations, users) array."""
    n = values.shape[1]
    return [MeanStats(n, s, ss) for s, ss in zip(values.sum(axis=1), (values**2).sum(axis=1), strict=True)]


def test_sufficient_stats_match_numpy():
    rng = np.random.default_rng(0)
    y = rng.normal(5, 2, size=500)
    s = sufficient_stats_from_values(y)
    assert s.n == 500
    assert s.mean == pytest.approx(y.mean(), rel=1e-12)
    assert s.variance == pytest.approx(y.var(ddof=1), rel=1e-10)
    assert not s.has_covariate
    assert sufficient_stats_from_values(y, pre_values=y).has_covariate


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mean_lift_equals_scipy_welch_on_raw_values(seed):
    rng = np.random.default_rng(seed)
    control = rng.normal(10.0, 3.0, size=800)
    treatment = rng.normal(10.4, 4.5, size=650)
    c_stats, t_stats = sufficient_stats_from_values(control), sufficient_stats_from_values(treatment)
    result = mean_lift(c_stats, t_stats, alpha=0.1)

    reference = stats.ttest_ind(treatment, control, equal_var=False)
    ci = reference.confidence_interval(confidence_level=0.9)
    assert result.abs_lift == pytest.approx(treatment.mean() - control.mean(), rel=1e-9)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert result.abs_ci_low == pytest.approx(ci.low, rel=1e-9)
    assert result.abs_ci_high == pytest.approx(ci.high, rel=1e-9)
    assert (result.n_control, result.n_treatment) == (800, 650)


def test_aa_welch_intervals_cover_zero_95_percent():
    rng = np.random.default_rng(11)
    # Skewed, like cost or latency per user: Welch must still hold at moderate n.
    control = batch_stats(rng.exponential(2.0, size=(1000, 200)))
    treatment = batch_stats(rng.exponential(2.0, size=(1000, 200)))
    results = [mean_lift(c, t) for c, t in zip(control, treatment, strict=True)]
    covered = [r.abs_ci_low <= 0 <= r.abs_ci_high for r in results]
    assert 0.93 <= np.mean(covered) <= 0.97


def test_planted_lift_is_recovered():
    rng = np.random.default_rng(12)
    control = sufficient_stats_from_values(rng.normal(10.0, 3.0, size=5000))
    treatment = sufficient_stats_from_values(rng.normal(10.3, 3.0, size=5000))
    result = mean_lift(control, treatment)
    assert result.abs_ci_low <= 0.3 <= result.abs_ci_high
    assert result.rel_ci_low <= 0.03 <= result.rel_ci_high
    assert result.p_value < 0.001


def cuped_data(rng, n, rho, lift):
    x = rng.normal(0.0, 1.0, size=n)
    y = 5.0 + lift + rho * x + np.sqrt(1 - rho**2) * rng.normal(0.0, 1.0, size=n)
    return y, x


def test_cuped_variance_drops_by_one_minus_rho_squared():
    rng = np.random.default_rng(21)
    rho = 0.7
    y_c, x_c = cuped_data(rng, 20_000, rho, lift=0.0)
    y_t, x_t = cuped_data(rng, 20_000, rho, lift=0.05)
    control = sufficient_stats_from_values(y_c, pre_values=x_c)
    treatment = sufficient_stats_from_values(y_t, pre_values=x_t)

    plain = mean_lift(control, treatment)
    adjusted = cuped_lift(control, treatment)
    assert (adjusted.std_error / plain.std_error) ** 2 == pytest.approx(1 - rho**2, abs=0.02)
    assert adjusted.abs_ci_low <= 0.05 <= adjusted.abs_ci_high


def test_cuped_equals_welch_on_directly_adjusted_values():
    rng = np.random.default_rng(22)
    y_c, x_c = cuped_data(rng, 3000, 0.5, lift=0.0)
    y_t, x_t = cuped_data(rng, 2500, 0.5, lift=0.2)
    result = cuped_lift(
        sufficient_stats_from_values(y_c, pre_values=x_c), sufficient_stats_from_values(y_t, pre_values=x_t)
    )

    sxy = sum(((x - x.mean()) * (y - y.mean())).sum() for x, y in [(x_c, y_c), (x_t, y_t)])
    sxx = sum(((x - x.mean()) ** 2).sum() for x in [x_c, x_t])
    pre_mean = np.concatenate([x_c, x_t]).mean()
    adj_c = y_c - sxy / sxx * (x_c - pre_mean)
    adj_t = y_t - sxy / sxx * (x_t - pre_mean)
    reference = stats.ttest_ind(adj_t, adj_c, equal_var=False)
    ci = reference.confidence_interval(confidence_level=0.95)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert (result.abs_ci_low, result.abs_ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert result.control_mean == pytest.approx(adj_c.mean(), rel=1e-9)


def test_cuped_needs_the_covariate():
    s = MeanStats(10, 10.0, 20.0)
    with pytest.raises(ValueError, match="covariate"):
        cuped_lift(s, s)


def ratio_data(rng, n, cost_per_image):
    images = rng.poisson(3.0, size=n).astype(float)
    cost = images * rng.gamma(4.0, cost_per_image / 4.0, size=n) + rng.exponential(0.2, size=n)
    return cost, images


def test_ratio_delta_method_agrees_with_bootstrap():
    rng = np.random.default_rng(31)
    num_c, den_c = ratio_data(rng, 2000, 1.0)
    num_t, den_t = ratio_data(rng, 2000, 1.1)
    result = ratio_lift(ratio_stats_from_values(num_c, den_c), ratio_stats_from_values(num_t, den_t))
    assert result.control_mean == pytest.approx(num_c.sum() / den_c.sum(), rel=1e-12)

    boot = rng.integers(0, 2000, size=(2, 1000, 2000))
    ratio_c = num_c[boot[0]].sum(axis=1) / den_c[boot[0]].sum(axis=1)
    ratio_t = num_t[boot[1]].sum(axis=1) / den_t[boot[1]].sum(axis=1)
    assert result.std_error == pytest.approx(np.std(ratio_t - ratio_c), rel=0.1)
    # True ratios are (3 * cost_per_image + 0.2) / 3, so the true difference is 0.1.
    assert result.abs_ci_low <= 0.1 <= result.abs_ci_high


@pytest.mark.parametrize("q", [0.5, 0.95])
def test_quantile_interval_coverage(q):
    rng = np.random.default_rng(41)
    values = rng.lognormal(0.0, 1.0, size=(200, 2, 1000))
    covered = [(r := quantile_lift(c, t, q)).abs_ci_low <= 0 <= r.abs_ci_high for c, t in values]
    assert 0.9 <= np.mean(covered) <= 0.99


def test_srm_flags_52_48_split():
    result = srm_check({"control": 52_000, "treatment": 48_000}, {"control": 0.5, "treatment": 0.5})
    assert result.flagged
    assert result.expected_counts == {"control": 50_000.0, "treatment": 50_000.0}


def test_srm_rarely_flags_a_fair_split():
    rng = np.random.default_rng(51)
    control = rng.binomial(100_000, 0.5, size=1000)
    flagged = [srm_check({"a": int(c), "b": 100_000 - int(c)}, {"a": 1, "b": 1}).flagged for c in control]
    assert np.mean(flagged) <= 0.01


def test_srm_rejects_mismatched_variants():
    with pytest.raises(ValueError, match="variants differ"):
        srm_check({"a": 10, "b": 10}, {"a": 0.5, "c": 0.5})


def test_sequential_interval_survives_daily_peeking_where_fixed_interval_does_not():
    rng = np.random.default_rng(61)
    sims, days, per_day = 500, 30, 100
    shape = (sims, days, per_day)
    daily = [rng.normal(1.0, 1.0, size=shape) for _ in range(2)]  # A/A: the true difference is 0
    sums = [np.cumsum(d.sum(axis=2), axis=1) for d in daily]
    sums_sq = [np.cumsum((d**2).sum(axis=2), axis=1) for d in daily]

    sequential_ok = np.ones(sims, dtype=bool)
    fixed_ok = np.ones(sims, dtype=bool)
    for day in range(days):
        n = per_day * (day + 1)
        for sim in range(sims):
            control = MeanStats(n, sums[0][sim, day], sums_sq[0][sim, day])
            treatment = MeanStats(n, sums[1][sim, day], sums_sq[1][sim, day])
            seq = sequential_interval(control, treatment, tau_sq=0.01)
            fixed = mean_lift(control, treatment)
            sequential_ok[sim] &= seq.ci_low <= 0 <= seq.ci_high
            fixed_ok[sim] &= fixed.abs_ci_low <= 0 <= fixed.abs_ci_high
    assert sequential_ok.mean() >= 0.94
    assert fixed_ok.mean() < 0.85  # peeking at a fixed-horizon interval inflates the error rate


def test_holm_and_bh_hand_checked():
    p = [0.01, 0.04, 0.03, 0.005]
    # Sorted: 0.005, 0.01, 0.03, 0.04 -> Holm 4*0.005, 3*0.01, 2*0.03, max(0.06, 1*0.04).
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: 0.005*4/1, 0.01*4/2, 0.03*4/3, 0.04*4/4 = 0.02, 0.02, 0.04, 0.04 (already monotone).
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # Capped at 1; BH's step-up lowers 0.5*2/1 = 1.0 to the later 0.6*2/2 = 0.6.
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert benjamini_hochberg([0.5, 0.6]) == pytest.approx([0.6, 0.6])


def test_required_sample_size_gives_its_power():
    n = required_sample_size(baseline_mean=10.0, baseline_sd=10.0, mde_relative=0.1)
    assert n == 1570  # 2 * (1.95996 + 0.84162)^2 * (10 / 1)^2 = 1569.8
    rng = np.random.default_rng(71)
    control = batch_stats(rng.normal(10.0, 10.0, size=(1000, n)))
    treatment = batch_stats(rng.normal(11.0, 10.0, size=(1000, n)))
    power = np.mean([mean_lift(c, t).p_value < 0.05 for c, t in zip(control, treatment, strict=True)])
    assert 0.76 <= power <= 0.84


def test_cap_values_caps_only_the_tail():
    values = np.arange(1.0, 101.0)
    capped = cap_values(values, 0.9)
    cap = np.quantile(values, 0.9)
    assert capped.max() == cap
    np.testing.assert_array_equal(capped[values <= cap], values[values <= cap])


def test_insufficient_sample_error_says_how_many_users_are_needed():
    one_user = MeanStats(1, 3.0, 9.0)
    enough = MeanStats(10, 30.0, 100.0)
    message = r"control arm has 1 user\(s\); at least 2 per arm.*1 more"
    with pytest.raises(InsufficientSampleError, match=message):
        mean_lift(one_user, enough)
    with pytest.raises(InsufficientSampleError, match="treatment arm has 0 user"):
        sequential_interval(enough, MeanStats(0, 0.0, 0.0), tau_sq=0.01)
    with pytest.raises(InsufficientSampleError, match="control arm has 1 user"):
        quantile_lift([1.0], [1.0, 2.0, 3.0], q=0.5)
    no_successes = ratio_stats_from_values([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    with_successes = ratio_stats_from_values([1.0, 2.0, 3.0], [1.0, 1.0, 2.0])
    with pytest.raises(InsufficientSampleError, match="denominator sums to 0 over 3 users"):
        ratio_lift(no_successes, with_successes)


def test_constant_metric_is_a_clear_error():
    constant = MeanStats(5, 5.0, 5.0)
    with pytest.raises(ValueError, match="zero variance"):
        mean_lift(constant, constant)


@pytest.mark.parametrize("rho", [0.3, 0.7, 0.9])
def test_cuped_reports_a_variance_reduction_of_rho_squared(rho):
    rng = np.random.default_rng(23)
    y_c, x_c = cuped_data(rng, 20_000, rho, lift=0.0)
    y_t, x_t = cuped_data(rng, 20_000, rho, lift=0.05)
    result = cuped_lift(
        sufficient_stats_from_values(y_c, pre_values=x_c), sufficient_stats_from_values(y_t, pre_values=x_t)
    )
    # 1 - Var(adjusted) / Var(unadjusted): rho^2 removed, 1 - rho^2 left (rho = 0.7: 0.49 removed).
    assert result.variance_reduction == pytest.approx(rho**2, abs=0.02)
    assert 1 - result.variance_reduction == pytest.approx(1 - rho**2, abs=0.02)
    assert result.pre_coverage == 1.0 and result.method == "CUPED"


def partly_covered(rng, n, rho, lift, coverage, lean=True, pre_mean=10.0):
    """Users whose pre-period value (mean ``pre_mean``, like a latency) is missing (NaN) for about 1 - coverage
    of them; with ``lean`` more often for low-y users (new users differ), but never depending on the arm."""
    x = rng.normal(0.0, 1.0, size=n)
    y = 5.0 + lift + rho * x + np.sqrt(1 - rho**2) * rng.normal(0.0, 1.0, size=n)
    # Missingness depends on pre-treatment data only (x), so imputing stays unbiased.
    missing = rng.random(n) < (1 - coverage) * (2 * stats.norm.cdf(-x) if lean else 1.0)
    return y, np.where(missing, np.nan, x + pre_mean)


def test_cuped_imputes_the_covered_mean_for_users_without_a_pre_period_value():
    rng = np.random.default_rng(24)
    y_c, x_c = partly_covered(rng, 3000, 0.6, 0.0, 0.7)
    y_t, x_t = partly_covered(rng, 2500, 0.6, 0.2, 0.7)
    c, t = sufficient_stats_from_values(y_c, x_c), sufficient_stats_from_values(y_t, x_t)
    assert c.pre_n == np.isfinite(x_c).sum() < c.n
    result = cuped_lift(c, t)

    # The same by hand: fill with the pooled mean of covered users, then CUPED on complete data.
    fill = np.nanmean(np.concatenate([x_c, x_t]))
    filled_c, filled_t = np.nan_to_num(x_c, nan=fill), np.nan_to_num(x_t, nan=fill)
    reference = cuped_lift(sufficient_stats_from_values(y_c, filled_c), sufficient_stats_from_values(y_t, filled_t))
    assert result.p_value == pytest.approx(reference.p_value, rel=1e-9)
    assert (result.abs_ci_low, result.abs_ci_high) == pytest.approx((reference.abs_ci_low, reference.abs_ci_high))
    covered = np.isfinite(np.concatenate([x_c, x_t])).mean()
    assert result.pre_coverage == pytest.approx(covered, rel=1e-12)


def test_imputing_keeps_the_reduction_that_writing_zero_for_missing_loses():
    rng = np.random.default_rng(25)
    rho, coverage = 0.7, 0.7
    y_c, x_c = partly_covered(rng, 20_000, rho, 0.0, coverage, lean=False)
    y_t, x_t = partly_covered(rng, 20_000, rho, 0.0, coverage, lean=False)
    imputed = cuped_lift(sufficient_stats_from_values(y_c, x_c), sufficient_stats_from_values(y_t, x_t))
    zero = cuped_lift(
        sufficient_stats_from_values(y_c, np.nan_to_num(x_c)), sufficient_stats_from_values(y_t, np.nan_to_num(x_t))
    )
    # Missing at random: coverage * rho^2 is kept; a 0 next to values near 10 mostly encodes "missing" instead.
    assert imputed.variance_reduction == pytest.approx(coverage * rho**2, abs=0.03)
    assert zero.variance_reduction < 0.05


def test_cuped_with_imputed_users_keeps_its_coverage():
    rng = np.random.default_rng(26)
    covered = []
    for _ in range(800):
        y_c, x_c = partly_covered(rng, 400, 0.7, 0.0, 0.6)
        y_t, x_t = partly_covered(rng, 400, 0.7, 0.0, 0.6)
        r = cuped_lift(sufficient_stats_from_values(y_c, x_c), sufficient_stats_from_values(y_t, x_t))
        covered.append(r.abs_ci_low <= 0 <= r.abs_ci_high)
    assert 0.93 <= np.mean(covered) <= 0.97


def test_cuped_without_any_pre_period_value_says_so():
    s = sufficient_stats_from_values([1.0, 2.0, 4.0], [np.nan] * 3)
    with pytest.raises(ValueError, match="no user has a pre-period value"):
        cuped_lift(s, s)


def test_each_lift_names_its_method():
    rng = np.random.default_rng(27)
    a, b = rng.normal(size=200), rng.normal(size=200)
    means = sufficient_stats_from_values(a), sufficient_stats_from_values(b)
    ratios = ratio_stats_from_values(a + 5, b * 0 + 1), ratio_stats_from_values(b + 5, a * 0 + 1)
    assert mean_lift(*means).method == "Welch"
    assert cuped_lift(sufficient_stats_from_values(a, b), sufficient_stats_from_values(b, a)).method == "CUPED"
    assert ratio_lift(*ratios).method == "delta method"
    assert quantile_lift(a, b, 0.5).method == "quantile (Deng et al.)"


def test_one_sided_p_for_harm_equals_scipys_one_sided_welch():
    rng = np.random.default_rng(28)
    control, treatment = rng.normal(10.0, 3.0, size=500), rng.normal(10.3, 3.0, size=400)
    lift = mean_lift(sufficient_stats_from_values(control), sufficient_stats_from_values(treatment))
    up = stats.ttest_ind(treatment, control, equal_var=False, alternative="greater").pvalue
    assert one_sided_p(lift, +1) == pytest.approx(up, rel=1e-9)
    assert one_sided_p(lift, -1) == pytest.approx(1 - up, rel=1e-9)


def test_power_helpers_agree_with_required_sample_size():
    rng = np.random.default_rng(29)
    control, treatment = rng.normal(10.0, 4.0, size=3000), rng.normal(10.0, 4.0, size=3000)
    lift = mean_lift(sufficient_stats_from_values(control), sufficient_stats_from_values(treatment))
    sd = per_user_sd(lift.std_error, lift.n_control, lift.n_treatment)
    assert sd == pytest.approx(4.0, rel=0.05)
    # The lift detectable now, fed back, asks for about the users there are now.
    detectable = minimum_detectable_lift(lift.std_error) / lift.control_mean
    assert required_sample_size(lift.control_mean, sd, detectable) == pytest.approx(3000, abs=2)
