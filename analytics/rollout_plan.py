"""A rollout's plan: its steps (percent of users in the treatment, ending at 100), the users each arm needs before
a step may advance, the false roll-back rate it accepts, and its guardrails (each a metric ``rollout_data``
measures and the harm it tolerates, absolute or relative to the control's value).

```python
plan = make_plan({"model": "sdxl-2"}, "sdxl-1", parse_steps("1,5,25,50,100"),
                 guardrails=parse_guardrails("failure_rate:+0.01,latency_p95:+20%"))
```
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from pixelpipe.analytics.defaults import DEFAULT_MIN_USERS_PER_ARM
from pixelpipe.analytics.guardrails import DEFAULT_GUARDRAILS, Guardrail, StepData, decide
from pixelpipe.analytics.rollout_data import STEP_METRICS
from pixelpipe.core.events import GuardrailLimit, RolloutPlan, RolloutTreatment
from pixelpipe.core.experiments import OVERRIDE_TYPES

CONTROL, TREATMENT = "control", "treatment"  # the rollout experiment's variants
DEFAULT_STEPS = (1.0, 5.0, 25.0, 50.0, 100.0)
_TEMPLATES = {g.metric: g for g in DEFAULT_GUARDRAILS}  # each metric's kind, harm direction and quantile


class RolloutError(ValueError):
    """A rollout command that cannot be carried out; the message says why, and what to do instead."""


def parse_steps(text: str) -> list[float]:
    """``1,5,25,50,100``: percent of users in the treatment at each step."""
    try:
        steps = [float(part) for part in text.split(",")]
    except ValueError:
        raise RolloutError(f"steps {text!r}: expected percents separated by commas, like 1,5,25,50,100") from None
    check_steps(steps)
    return steps


def check_steps(steps: Sequence[float]) -> None:
    shown = ",".join(f"{s:g}" for s in steps)
    if not all(0 < s <= 100 for s in steps):
        raise RolloutError(f"steps {shown}: each is a percent of users above 0 and at most 100")
    if any(later <= earlier for earlier, later in itertools.pairwise(steps)):
        raise RolloutError(f"steps {shown}: each step must be larger than the one before")
    if len(steps) < 2 or steps[-1] != 100:
        raise RolloutError(
            f"steps {shown}: they end at 100, after at least one step below it (at 100 % no control is left to "
            "compare the treatment with)"
        )


def default_guardrails() -> list[GuardrailLimit]:
    return [GuardrailLimit(metric=g.metric, margin=g.margin, relative=g.relative) for g in DEFAULT_GUARDRAILS]


def parse_guardrails(text: str) -> list[GuardrailLimit]:
    """``failure_rate:+0.01,latency_p95:+20%``: each metric and the harm it tolerates, absolute in the metric's
    units or, with %, relative to the control's value."""
    limits = []
    for part in text.split(","):
        metric, colon, margin = (s.strip() for s in part.partition(":"))
        if not colon or not metric or not margin:
            raise RolloutError(
                f"guardrail {part!r}: expected METRIC:MARGIN, like failure_rate:+0.01 or latency_p95:+20%"
            )
        relative = margin.endswith("%")
        try:
            value = float(margin.removesuffix("%"))
        except ValueError:
            raise RolloutError(f"guardrail {part!r}: the margin {margin!r} is not a number (or a percent)") from None
        limits.append(GuardrailLimit(metric=metric, margin=value / 100 if relative else value, relative=relative))
    return limits


def guardrails_of(plan: RolloutPlan) -> list[Guardrail]:
    return [
        dataclasses.replace(_TEMPLATES[limit.metric], margin=limit.margin, relative=limit.relative)
        for limit in plan.guardrails
    ]


def make_plan(
    treatment: Mapping[str, Any],
    control_model: str = "",
    steps: Sequence[float] = DEFAULT_STEPS,
    min_users: int = DEFAULT_MIN_USERS_PER_ARM,
    alpha: float = 0.05,
    guardrails: Sequence[GuardrailLimit] | None = None,
) -> RolloutPlan:
    """A checked plan. ``treatment``: the overrides to roll out (model, steps, guidance, scheduler);
    ``control_model``: what runs today, recorded for people ('' for the requests' own model)."""
    if unknown := sorted(set(treatment) - set(OVERRIDE_TYPES)):
        raise RolloutError(f"a treatment overrides {', '.join(OVERRIDE_TYPES)}, not {', '.join(unknown)}")
    if not any(value is not None for value in treatment.values()):
        raise RolloutError("the treatment changes nothing: name the new model (or another override) to roll out")
    check_steps(steps)
    limits = list(default_guardrails() if guardrails is None else guardrails)
    if unknown := [g.metric for g in limits if g.metric not in STEP_METRICS]:
        raise RolloutError(
            f"unknown guardrail metric(s) {', '.join(unknown)}; a rollout measures {', '.join(STEP_METRICS)}"
        )
    plan = RolloutPlan(
        control_model=control_model,
        treatment=RolloutTreatment(name=TREATMENT, **treatment),
        steps=list(steps),
        min_users=min_users,
        alpha=alpha,
        guardrails=limits,
    )
    try:
        decide(StepData(), guardrails_of(plan), min_users, alpha)  # checks the settings as every look will
    except ValueError as e:
        raise RolloutError(str(e)) from e
    return plan


def overrides(treatment: RolloutTreatment) -> dict[str, object]:
    return {name: getattr(treatment, name) for name in OVERRIDE_TYPES if getattr(treatment, name) is not None}


def describe_plan(plan: RolloutPlan) -> str:
    change = ", ".join(f"{name} {value}" for name, value in overrides(plan.treatment).items())
    today = f" against {plan.control_model}" if plan.control_model else ""
    return f"guarded rollout of {change}{today} through {', '.join(f'{s:g}' for s in plan.steps)} %"
