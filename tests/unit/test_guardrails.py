"""The rollout controller's decision engine: what ROLLBACK, ADVANCE and HOLD take, the edge cases (no failures at
all, constant costs, too few users, a missing arm), bad inputs, that ``decide`` is the engine the simulation runs,
and the simulation itself: the false roll-back rate stays under alpha, and a harmful candidate is rolled back within
a few dozen of its users."""

import math

import numpy as np
import pytest

from pixelpipe.analytics import guardrails as gr
from pixelpipe.analytics.guardrails import DEFAULT_GUARDRAILS, Decision, Guardrail, StepData, decide
from pixelpipe.analytics.rollout_simulation import Arm, simulate_rollouts
from pixelpipe.analytics.stats import MeanStats, sufficient_stats_from_values

FAILURES = Guardrail("failure_rate", "share", 0.01)
COST = Guardrail("cost_per_image", "mean", 0.10, relative=True)
LATENCY = Guardrail("latency_p95", "quantile", 0.20, relative=True)


def share(n: int, events: int) -> MeanStats:
    """A per-user share with one request per user: ``events`` users at 1, the rest at 0."""
    return MeanStats(n, float(events), float(events))


def arm(rng: np.random.Generator, n: int, failure_rate: float = 0.02, slower: float = 1.0, dearer: float = 1.0) -> dict:
    """One arm's data for the four default guardrails, one request per user."""
    return {
        "failure_rate": sufficient_stats_from_values(rng.random(n) < failure_rate),
        "moderation_rejection_rate": sufficient_stats_from_values(rng.random(n) < 0.01),
        "latency_p95": slower * 800 * np.exp(0.6 * rng.standard_normal(n)),
        "cost_per_image": sufficient_stats_from_values(dearer * 0.002 * np.exp(0.05 * rng.standard_normal(n))),
    }


def test_a_candidate_failing_a_fifth_of_its_requests_is_rolled_back_on_failures_alone():
    verdict = decide(StepData({"failure_rate": share(900, 18)}, {"failure_rate": share(100, 20)}), [FAILURES])
    assert verdict.decision == Decision.ROLLBACK
    assert verdict.reason.startswith("harm beyond the margin: failure_rate +0.18 ")
    f = verdict.figures
    assert f["failure_rate.estimate"] == pytest.approx(0.18)
    assert f["failure_rate.margin"] < f["failure_rate.ci_low"] < 0.18 < f["failure_rate.ci_high"]
    assert (f["failure_rate.n_control"], f["failure_rate.n_treatment"]) == (900, 100)
    assert f["alpha"] == f["alpha_per_guardrail"] == 0.05


def test_a_harmless_candidate_holds_while_uncertain_then_advances_on_every_guardrail():
    rng = np.random.default_rng(3)
    early = decide(StepData(arm(rng, 900), arm(rng, 100)))
    assert early.decision == Decision.HOLD
    assert early.reason.startswith("holding: harm not yet shown to be within the margin: failure_rate ")
    late = decide(StepData(arm(rng, 20_000), arm(rng, 20_000)))
    assert late.decision == Decision.ADVANCE, late.reason
    assert {r.status for r in late.results} == {"within margin"}
    for g in DEFAULT_GUARDRAILS:
        assert late.figures[f"{g.metric}.ci_high"] <= late.figures[f"{g.metric}.margin"]
    assert late.figures["alpha_per_guardrail"] == pytest.approx(0.05 / 4)  # Bonferroni over the four


def test_users_not_split_as_allocated_hold_a_harmless_candidate_but_never_stop_a_roll_back():
    rng = np.random.default_rng(3)
    # At a 50 % step a harmless candidate advances; the same users taken for a 10 % step are far from its split.
    harmless = StepData(arm(rng, 20_000), arm(rng, 20_000))
    at_half = decide(harmless, treatment_share=0.5)
    assert at_half.decision == Decision.ADVANCE and at_half.figures["srm.p_value"] > gr.SRM_THRESHOLD
    at_tenth = decide(harmless, treatment_share=0.1)
    assert at_tenth.decision == Decision.HOLD
    assert at_tenth.reason.startswith(
        "holding: sample ratio mismatch: 20000 of 40000 users in the treatment where 10 % were allocated"
    )
    assert at_tenth.figures["srm.p_value"] < gr.SRM_THRESHOLD
    assert at_tenth.results == at_half.results  # the guardrails' figures are the same; only the decision waits
    failing = StepData({"failure_rate": share(500, 10)}, {"failure_rate": share(500, 100)})
    assert decide(failing, [FAILURES], treatment_share=0.1).decision == Decision.ROLLBACK


@pytest.mark.parametrize(("slower", "dearer", "breached"), [(3.0, 1.0, "latency_p95"), (1.0, 3.0, "cost_per_image")])
def test_a_slower_or_dearer_candidate_is_rolled_back_on_that_guardrail(slower, dearer, breached):
    rng = np.random.default_rng(5)
    verdict = decide(StepData(arm(rng, 900), arm(rng, 100, slower=slower, dearer=dearer)))
    assert verdict.decision == Decision.ROLLBACK
    assert [r.guardrail.metric for r in verdict.results if r.status == "breached"] == [breached]


def test_no_failure_in_either_arm_is_not_certainty():
    # Sample variance 0 in both arms: without the pseudo-counts the interval would be [0, 0] and advance at once.
    few = decide(StepData({"failure_rate": share(50, 0)}, {"failure_rate": share(50, 0)}), [FAILURES], min_users=20)
    assert few.decision == Decision.HOLD
    assert few.figures["failure_rate.ci_high"] > 0.05  # about one failure in 50 is still plausible
    many = decide(StepData({"failure_rate": share(5000, 0)}, {"failure_rate": share(5000, 0)}), [FAILURES])
    assert many.decision == Decision.ADVANCE
    assert 0 < many.figures["failure_rate.ci_high"] < 0.01


def test_constant_costs_are_exact_when_equal_and_uncertain_when_they_differ():
    def constant(n: int, cost: float) -> dict:
        return {"cost_per_image": MeanStats(n, n * cost, n * cost**2)}

    tie = decide(StepData(constant(200, 0.002), constant(200, 0.002)), [COST])
    assert tie.decision == Decision.ADVANCE
    assert tie.figures["cost_per_image.ci_low"] == pytest.approx(tie.figures["cost_per_image.ci_high"], abs=1e-12)
    apart = decide(StepData(constant(5, 0.002), constant(5, 0.006)), [COST])
    low, high = apart.figures["cost_per_image.ci_low"], apart.figures["cost_per_image.ci_high"]
    assert low < 0.004 < high  # two constant arms of five users are not taken for certain


def test_too_few_users_never_advance_however_good_the_candidate_looks():
    rng = np.random.default_rng(7)
    verdict = decide(StepData(arm(rng, 5000), arm(rng, 60, failure_rate=0.0, dearer=0.5)))
    assert verdict.decision == Decision.HOLD
    assert "latency_p95 needs 100 per arm (treatment has 60)" in verdict.reason
    assert "failure_rate needs 100 per arm (treatment has 60)" in verdict.reason
    # The p95's own minimum (77 users per arm) applies where min_users is lower.
    low = decide(StepData(arm(rng, 5000), arm(rng, 60)), min_users=50)
    assert "latency_p95 needs 77 per arm (treatment has 60)" in low.reason
    assert "latency_p95.ci_low" not in low.figures  # unbounded: left out of the flat figures


def test_a_missing_arm_or_metric_holds():
    rng = np.random.default_rng(9)
    verdict = decide(StepData(arm(rng, 500), None))
    assert verdict.decision == Decision.HOLD
    assert verdict.reason == "holding: no treatment users in this step yet"
    assert verdict.figures["failure_rate.n_treatment"] == 0
    no_cost = {k: v for k, v in arm(rng, 500).items() if k != "cost_per_image"}
    partial = decide(StepData(arm(rng, 500), no_cost))
    assert partial.decision == Decision.HOLD
    assert "cost_per_image needs 100 per arm (treatment has 0)" in partial.reason


@pytest.mark.parametrize(
    ("factor", "decision"), [(1.3, Decision.ROLLBACK), (1.1, Decision.HOLD), (0.9, Decision.ADVANCE)]
)
def test_a_relative_margin_is_judged_against_the_control(factor, decision):
    rng = np.random.default_rng(11)
    n = 50_000
    values = 0.002 * np.exp(0.05 * rng.standard_normal(2 * n))
    c = sufficient_stats_from_values(values[:n])
    t = sufficient_stats_from_values(factor * values[n:])
    verdict = decide(StepData({"cost_per_image": c}, {"cost_per_image": t}), [COST])
    assert verdict.decision == decision  # exactly at +10 %, the interval straddles the margin
    assert verdict.figures["cost_per_image.margin"] == pytest.approx(0.1 * c.mean)


def test_harm_can_be_a_fall():
    quality = Guardrail("quality", "mean", 0.05, harm="down")
    rng = np.random.default_rng(13)
    c = sufficient_stats_from_values(rng.normal(1.0, 0.1, 2000))
    fall = decide(
        StepData({"quality": c}, {"quality": sufficient_stats_from_values(rng.normal(0.8, 0.1, 500))}), [quality]
    )
    rise = decide(
        StepData({"quality": c}, {"quality": sufficient_stats_from_values(rng.normal(1.2, 0.1, 500))}), [quality]
    )
    assert fall.decision == Decision.ROLLBACK
    assert fall.figures["quality.estimate"] == pytest.approx(0.2, abs=0.02)  # harm: positive is worse
    assert rise.decision == Decision.ADVANCE


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Guardrail("x", "share", -0.01), "a finite number >= 0"),
        (lambda: Guardrail("x", "ratio", 0.01), "unknown kind 'ratio'"),
        (lambda: Guardrail("x", "quantile", 0.2, q=95), "strictly between 0 and 1"),
        (lambda: Guardrail("x", "mean", 0.2, harm="worse"), "harm is 'up' or 'down'"),
        (lambda: decide(StepData(), alpha=1.0), "alpha must be strictly between 0 and 1"),
        (lambda: decide(StepData(), min_users=1), "min_users must be at least 2"),
        (lambda: decide(StepData(), []), "no guardrails"),
        (lambda: decide(StepData(), [FAILURES, FAILURES]), "guardrails named twice: failure_rate"),
        (
            lambda: decide(StepData({"latency_p95": MeanStats(9, 1.0, 1.0)}), [LATENCY]),
            "the control arm needs its per-user values",
        ),
        (
            lambda: decide(StepData(treatment={"latency_p95": [1.0, math.nan]}), [LATENCY]),
            "the treatment arm needs its per-user values, a 1-D array of finite numbers",
        ),
        (
            lambda: decide(StepData({"failure_rate": [0.0, 1.0]}), [FAILURES]),
            "needs stats.MeanStats of the per-user values, not list",
        ),
        (
            lambda: decide(StepData({"failure_rate": MeanStats(10, 20.0, 40.0)}), [FAILURES]),
            "per-user values lie in 0..1, but the control arm's mean is 2",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_decide_is_the_engine_the_simulation_runs():
    # The simulation judges many rollouts at once with judge() and decisions(); decide() must give the same
    # decision for each of them one at a time.
    rng = np.random.default_rng(17)
    rows, n_c, n_t = 40, 600, 90
    failed_c, failed_t = rng.random((rows, n_c)) < 0.02, rng.random((rows, n_t)) < rng.choice([0.02, 0.2], (rows, 1))
    lat_c = 800 * np.exp(0.6 * rng.standard_normal((rows, n_c)))
    lat_t = rng.choice([1.0, 3.0], (rows, 1)) * 800 * np.exp(0.6 * rng.standard_normal((rows, n_t)))
    guardrails = [FAILURES, LATENCY]

    def sums(failed: np.ndarray) -> gr.Sums:
        return gr.Sums(np.full(rows, failed.shape[1]), failed.sum(axis=1) * 1.0, failed.sum(axis=1) * 1.0)

    judgements = [
        gr.judge(FAILURES, sums(failed_c), sums(failed_t), 0.025, 100),
        gr.judge(LATENCY, np.sort(lat_c, axis=1), np.sort(lat_t, axis=1), 0.025, 100),
    ]
    together = gr.decisions(judgements, 100)
    one_by_one = [
        decide(
            StepData(
                {"failure_rate": sufficient_stats_from_values(failed_c[i]), "latency_p95": lat_c[i]},
                {"failure_rate": sufficient_stats_from_values(failed_t[i]), "latency_p95": lat_t[i]},
            ),
            guardrails,
        ).decision
        for i in range(rows)
    ]
    assert [{2: Decision.ROLLBACK, 1: Decision.ADVANCE, 0: Decision.HOLD}[int(c)] for c in together] == one_by_one
    assert {Decision.ROLLBACK, Decision.HOLD} <= set(one_by_one)  # the sample exercises more than one outcome


def test_a_harmless_candidate_is_seldom_rolled_back_even_at_every_margin_at_once():
    # A/A: identical arms. At the margins: the treatment worse by exactly each tolerated margin, the hardest
    # harmless case (a roll-back needs harm beyond a margin). 1000 seeded rollouts through the 1/5/25/50 % steps,
    # looked at every 50 users, 2000 users a step.
    settings = {"rollouts": 1000, "users_per_step": 2000, "alpha": 0.05, "seed": 21}
    same = simulate_rollouts(Arm(), **settings)
    at_margins = simulate_rollouts(
        Arm(failure_rate=0.03, rejection_rate=0.02).scaled(latency=1.2, cost=1.1), **settings
    )
    print(
        f"\nfalse roll-backs: A/A {same.rate:.1%} [{same.rate_low:.1%}, {same.rate_high:.1%}], at the margins "
        f"{at_margins.rate:.1%} [{at_margins.rate_low:.1%}, {at_margins.rate_high:.1%}]"
    )
    for result in (same, at_margins):
        assert result.rate <= 0.05
        assert result.rate_high <= 0.05  # the Wilson interval's upper bound
    assert at_margins.rolled_back > 0  # the check has something to count: at the margins, some misses do happen


def test_a_candidate_failing_a_fifth_of_its_requests_is_rolled_back_within_a_minute_and_a_half():
    # 10 requests/s, one request per user, 10 % of users in the treatment: 1 treatment user a second. Looked at
    # every second for 3 minutes.
    result = simulate_rollouts(
        Arm(failure_rate=0.2), rollouts=200, steps=(0.1,), users_per_step=1800, users_per_look=10, seed=23
    )
    users = result.treatment_users_to_rollback
    print(
        f"\n20 % failing candidate: median {result.median_treatment_users:.0f} treatment users (seconds) to roll-back, "
        f"95th percentile {np.percentile(users, 95):.0f}, at most {users.max()}"
    )
    assert result.rate == 1.0  # every one of them within the 3 minutes
    assert result.median_treatment_users <= 90  # half of the 3 minutes
    assert result.breached_by["failure_rate"] == 200


@pytest.mark.parametrize(
    ("treatment", "breached"), [(Arm().scaled(latency=3), "latency_p95"), (Arm().scaled(cost=3), "cost_per_image")]
)
def test_a_much_slower_or_dearer_candidate_is_rolled_back_in_the_ramp(treatment, breached):
    result = simulate_rollouts(treatment, rollouts=200, users_per_step=2000, seed=29)
    assert result.rate == 1.0
    assert result.breached_by[breached] == 200
