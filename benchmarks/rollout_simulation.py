"""The rollout guardrails on simulated rollouts: false roll-backs of harmless candidates and power against harmful ones.

    python benchmarks/rollout_simulation.py [--rollouts 4000] [--users-per-step 4000] [--alpha 0.05] [--seed 31]

Each rollout goes through the 1/5/25/50 % steps, each step looked at every 50 users (``analytics/rollout_simulation.py``
says how users are drawn; control: 2 % failures, 1 % rejections, lognormal latency with median 800 ms, cost about
0.002 USD). Scenarios:

  A/A              the treatment identical to the control
  at the margins   the treatment worse by exactly every tolerated margin at once (+1 point of failures and of
                   rejections, p95 latency +20 %, cost +10 %): the hardest case that must not be rolled back
  failures 20 %    the treatment fails 20 % of its requests
  latency x3       every latency three times as long
  cost x3          every image three times as dear
  20 % at 10 req/s one 10 % step, 10 requests/s with one request per user (1 treatment user/s), looked at every
                   second for 3 minutes: the median treatment users to roll-back are its seconds
  A/A to advance   one 50 % step of 20,000 users looked at every 200: the users a harmless candidate needs to ADVANCE

Columns: rolled back (share of rollouts, with its 95 % Wilson interval), where (rollouts rolled back at each step),
the median treatment users (over all steps so far) at roll-back, how many times a rollout showed ADVANCE and the
median treatment users of that step when it did, and which guardrails were breached (rollouts).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pixelpipe.analytics.rollout_simulation import Arm, SimulationResult, simulate_rollouts

HARMLESS_AT_MARGINS = Arm(failure_rate=0.03, rejection_rate=0.02).scaled(latency=1.2, cost=1.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rollouts", type=int, default=4000)
    parser.add_argument("--users-per-step", type=int, default=4000)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=31)
    args = parser.parse_args()
    ramp = {"rollouts": args.rollouts, "users_per_step": args.users_per_step, "alpha": args.alpha}
    power = ramp | {"rollouts": min(args.rollouts, 1000)}
    scenarios = {
        "A/A": (Arm(), ramp),
        "at the margins": (HARMLESS_AT_MARGINS, ramp),
        "failures 20 %": (Arm(failure_rate=0.2), power),
        "latency x3": (Arm().scaled(latency=3), power),
        "cost x3": (Arm().scaled(cost=3), power),
        "20 % at 10 req/s": (
            Arm(failure_rate=0.2),
            power | {"steps": (0.1,), "users_per_step": 1800, "users_per_look": 10},
        ),
        "A/A to advance": (
            Arm(),
            ramp
            | {"rollouts": min(args.rollouts, 500), "steps": (0.5,), "users_per_step": 20_000, "users_per_look": 200},
        ),
    }
    print(
        f"min_users 100 per arm, alpha {args.alpha} (Bonferroni: {args.alpha / 4:g} per guardrail), looks every 50 "
        f"users, {args.users_per_step} users a step through 1/5/25/50 % unless said"
    )
    print(
        f"{'scenario':<17} {'rollouts':>8}  {'rolled back [95 % CI]':<27} {'where':<12} {'users to':>8}  "
        f"{'advanced':>8} {'users to':>8}  {'seconds':>7}  breached by"
    )
    print(f"{'':<17} {'':>8}  {'':<27} {'1/5/25/50 %':<12} {'rollback':>8}  {'':>8} {'advance':>8}")
    for i, (name, (treatment, settings)) in enumerate(scenarios.items()):
        started = time.perf_counter()
        # Fewer rollouts at once where a step has many users, to bound the memory of the drawn users.
        chunk = 250 if settings["users_per_step"] <= 5000 else 100
        result = simulate_rollouts(treatment, seed=args.seed + i, chunk=chunk, **settings)
        print(_row(name, result, time.perf_counter() - started))


def _row(name: str, r: SimulationResult, seconds: float) -> str:
    rate = f"{r.rate:.2%} [{r.rate_low:.2%}, {r.rate_high:.2%}]"
    where = "/".join(str(n) for n in r.rolled_back_at)
    advance = r.treatment_users_to_advance
    to_advance = f"{np.median(advance):.0f}" if advance.size else "-"
    to_rollback = f"{r.median_treatment_users:.0f}" if r.rolled_back else "-"
    breached = ", ".join(f"{metric} {n}" for metric, n in r.breached_by.items() if n) or "-"
    return (
        f"{name:<17} {r.rollouts:>8}  {rate:<27} {where:<12} {to_rollback:>8}  "
        f"{advance.size:>8} {to_advance:>8}  {seconds:>7.1f}  {breached}"
    )


if __name__ == "__main__":
    main()
