"""Simulated rollouts judged by ``guardrails``, thousands at once: the false roll-back rate of a harmless candidate
(an A/A rollout) and the power against harmful ones. ``benchmarks/rollout_simulation.py`` prints the table and
``tests/unit/test_guardrails.py`` runs smaller ones.

A rollout goes through its steps (treatment share 1, 5, 25 and 50 %: at 100 % no control is left to compare). Each
step starts afresh, since the analysis sees the current step only, and is looked at every ``users_per_look`` users
until the decision is ROLLBACK (the rollout ends there), ADVANCE (on to the next step), or the step has had
``users_per_step`` users. A rollout still holding then moves on all the same, so that every rollout is looked at in
every step: more looks than a controller that keeps holding would take, so the false roll-backs counted are an
upper bound. The decisions are those of ``guardrails.decisions`` on ``guardrails.judge``: the engine the controller
calls through ``decide``, one row at a time, runs here on all rollouts at once.

Each user sends one request, so a user's failure and rejection shares are 0 or 1 and its cost and latency are those
of its one request, drawn independently: failures ``Arm.failure_rate``, rejections ``Arm.rejection_rate``, latency
lognormal (median 800 ms, log-sd 0.6: p95 2147 ms), cost lognormal around 0.002 USD with a log-sd of 0.05 (nearly
a price). Assignment is exact: of a step's first N users, floor(w N) are in the treatment (the hash's split without
its noise), so every rollout has the same arm sizes at a look and the quantile arrays stay rectangular.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from pixelpipe.analytics.guardrails import DEFAULT_GUARDRAILS, Guardrail, Sums, decisions, judge
from pixelpipe.analytics.sequential import min_users_for_quantile

DEFAULT_STEPS = (0.01, 0.05, 0.25, 0.5)
SIMULATED_METRICS = ("failure_rate", "moderation_rejection_rate", "latency_p95", "cost_per_image")
_ROLLBACK, _ADVANCE = 2, 1


@dataclass(frozen=True)
class Arm:
    """A simulated arm's per-user distributions."""

    failure_rate: float = 0.02
    rejection_rate: float = 0.01
    latency_median_ms: float = 800.0
    latency_sigma: float = 0.6  # log-sd
    cost_usd: float = 0.002
    cost_sigma: float = 0.05  # log-sd

    def scaled(self, latency: float = 1.0, cost: float = 1.0) -> Arm:
        """This arm with latency and cost multiplied (a slower or dearer candidate)."""
        return dataclasses.replace(
            self, latency_median_ms=self.latency_median_ms * latency, cost_usd=self.cost_usd * cost
        )


@dataclass(frozen=True)
class SimulationResult:
    rollouts: int
    rolled_back: int
    rate: float  # share of rollouts rolled back at some look of some step
    rate_low: float  # its 95 % Wilson interval
    rate_high: float
    rolled_back_at: tuple[int, ...]  # per step
    advanced_from: tuple[int, ...]  # per step: rollouts that showed ADVANCE there
    breached_by: dict[str, int]  # rolled-back rollouts with this guardrail breached (several can be at once)
    treatment_users_to_rollback: np.ndarray  # per rolled-back rollout: its treatment users over all steps so far
    treatment_users_to_advance: np.ndarray  # per ADVANCE: the treatment users of that step when it showed

    @property
    def median_treatment_users(self) -> float:
        """Median treatment users until roll-back, over the rollouts rolled back (NaN when none was)."""
        users = self.treatment_users_to_rollback
        return float(np.median(users)) if users.size else math.nan


def simulate_rollouts(
    treatment: Arm,
    control: Arm | None = None,
    rollouts: int = 2000,
    steps: Sequence[float] = DEFAULT_STEPS,
    users_per_step: int = 4000,
    users_per_look: int = 50,
    guardrails: Sequence[Guardrail] = DEFAULT_GUARDRAILS,
    min_users: int = 100,
    alpha: float = 0.05,
    seed: int = 0,
    chunk: int = 250,
) -> SimulationResult:
    """``rollouts`` rollouts of ``treatment`` against ``control`` (the default ``Arm``; pass the same for A/A)."""
    control = control or Arm()
    _check(rollouts, steps, users_per_step, users_per_look, guardrails)
    rng = np.random.default_rng(seed)
    alpha_each = alpha / len(guardrails)
    rolled_back_at = np.zeros(len(steps), dtype=int)
    advanced_from = np.zeros(len(steps), dtype=int)
    breached_by = dict.fromkeys((g.metric for g in guardrails), 0)
    users_to_rollback: list[np.ndarray] = []
    users_to_advance: list[np.ndarray] = []
    for start in range(0, rollouts, chunk):
        rows = min(chunk, rollouts - start)
        alive = np.ones(rows, dtype=bool)
        exposed = np.zeros(rows, dtype=int)  # treatment users so far, over the steps
        for index, share in enumerate(steps):
            looking = alive.copy()
            step_exposed = np.full(rows, math.floor(share * users_per_step))
            step = _Step(rng, rows, share, users_per_step, control, treatment)
            for users in range(users_per_look, users_per_step + 1, users_per_look):
                if not looking.any():
                    break
                judgements = [judge(g, *step.arms(g, users, min_users), alpha_each, min_users) for g in guardrails]
                codes = decisions(judgements, min_users)
                n_t = step.treatment_users(users)
                back = looking & (codes == _ROLLBACK)
                onward = looking & (codes == _ADVANCE)
                rolled_back_at[index] += int(back.sum())
                advanced_from[index] += int(onward.sum())
                for g, j in zip(guardrails, judgements, strict=True):
                    breached_by[g.metric] += int((back & j.breached).sum())
                users_to_rollback.append(exposed[back] + n_t)
                users_to_advance.append(np.full(int(onward.sum()), n_t))
                step_exposed[onward] = n_t
                alive &= ~back
                looking &= ~(back | onward)
            exposed += step_exposed
    total = int(rolled_back_at.sum())
    interval = stats.binomtest(total, rollouts).proportion_ci(confidence_level=0.95, method="wilson")
    return SimulationResult(
        rollouts=rollouts,
        rolled_back=total,
        rate=total / rollouts,
        rate_low=float(interval.low),
        rate_high=float(interval.high),
        rolled_back_at=tuple(int(x) for x in rolled_back_at),
        advanced_from=tuple(int(x) for x in advanced_from),
        breached_by=breached_by,
        treatment_users_to_rollback=np.concatenate([np.empty(0, dtype=int), *users_to_rollback]),
        treatment_users_to_advance=np.concatenate([np.empty(0, dtype=int), *users_to_advance]),
    )


class _Step:
    """One step's simulated users for ``rows`` rollouts, as running sums (means) and sorted values (latency)."""

    def __init__(
        self, rng: np.random.Generator, rows: int, share: float, users: int, control: Arm, treatment: Arm
    ) -> None:
        self.share = share
        n_t = math.floor(share * users)
        self._draws = {
            "control": _ArmDraws(rng, rows, users - n_t, control),
            "treatment": _ArmDraws(rng, rows, n_t, treatment),
        }

    def treatment_users(self, users: int) -> int:
        return math.floor(self.share * users)

    def arms(self, guardrail: Guardrail, users: int, min_users: int) -> tuple[Sums | np.ndarray, Sums | np.ndarray]:
        """Both arms' data for ``judge`` after the step's first ``users`` users."""
        n_t = self.treatment_users(users)
        counts = {"control": users - n_t, "treatment": n_t}
        if guardrail.kind == "quantile":
            # Below the quantile's own minimum its interval is unbounded whatever the values: skip the sorting.
            enough = min(counts.values()) >= min_users_for_quantile(guardrail.q)
            if not enough:
                rows = self._draws["control"].rows
                return np.empty((rows, 0)), np.empty((rows, 0))
            c, t = (self._draws[arm].sorted_latency(n) for arm, n in counts.items())
            return c, t
        c, t = (self._draws[arm].sums(guardrail.metric, n) for arm, n in counts.items())
        return c, t


class _ArmDraws:
    """An arm's users in one step: cumulative sums of each mean metric, and latency in sorted order."""

    def __init__(self, rng: np.random.Generator, rows: int, users: int, arm: Arm) -> None:
        self.rows = rows
        failed = rng.random((rows, users)) < arm.failure_rate
        rejected = rng.random((rows, users)) < arm.rejection_rate
        cost = arm.cost_usd * np.exp(arm.cost_sigma * rng.standard_normal((rows, users)))
        latency = arm.latency_median_ms * np.exp(arm.latency_sigma * rng.standard_normal((rows, users)))
        # A share's values are 0 or 1, so its sum of squares is its sum.
        failures, rejections = np.cumsum(failed, axis=1), np.cumsum(rejected, axis=1)
        self._cumulative = {
            "failure_rate": (failures, failures),
            "moderation_rejection_rate": (rejections, rejections),
            "cost_per_image": (np.cumsum(cost, axis=1), np.cumsum(cost**2, axis=1)),
        }
        self._order = np.argsort(latency, axis=1)
        self._sorted = np.take_along_axis(latency, self._order, axis=1)

    def sums(self, metric: str, n: int) -> Sums:
        total, total_sq = self._cumulative[metric]
        if n == 0:
            return Sums(np.zeros(self.rows, dtype=int), np.zeros(self.rows), np.zeros(self.rows))
        return Sums(np.full(self.rows, n), total[:, n - 1].astype(float), total_sq[:, n - 1].astype(float))

    def sorted_latency(self, n: int) -> np.ndarray:
        """Each row's first ``n`` users' latencies, sorted: the full sort filtered to them keeps its order."""
        return self._sorted[self._order < n].reshape(self.rows, n)


def _check(
    rollouts: int, steps: Sequence[float], users_per_step: int, users_per_look: int, guardrails: Sequence[Guardrail]
) -> None:
    if rollouts < 1:
        raise ValueError(f"rollouts must be at least 1, not {rollouts}")
    if not steps or not all(0 < s < 1 for s in steps):
        raise ValueError(f"steps are treatment shares strictly between 0 and 1 (100 % has no control), not {steps}")
    if not 1 <= users_per_look <= users_per_step:
        raise ValueError(f"users_per_look must be 1..users_per_step ({users_per_step}), not {users_per_look}")
    if unknown := [g.metric for g in guardrails if g.metric not in SIMULATED_METRICS]:
        raise ValueError(f"the simulation draws {', '.join(SIMULATED_METRICS)} only, not {', '.join(unknown)}")
    if any(g.metric == "latency_p95" and g.kind != "quantile" for g in guardrails) or any(
        g.metric != "latency_p95" and g.kind == "quantile" for g in guardrails
    ):
        raise ValueError("the simulation draws latency_p95 as a quantile and the other metrics as means")
