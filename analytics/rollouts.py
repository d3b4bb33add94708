"""Guarded rollouts: a new model (or setting) ramped through steps of a live experiment, each step judged on its
own data by ``guardrails`` and advanced, held or rolled back by the controller.

A rollout of KEY is the experiment KEY with two variants, ``control`` (what runs today: no overrides) and
``treatment`` (the new overrides, e.g. the model), and its decisions: ``RolloutDecision`` events keyed KEY on the
rollouts topic. The decisions are the rollout's whole state (the plan on START, then each step's percent and
experiment revision), so the controller keeps nothing of its own: every round it rebuilds each rollout from the
topic, read from the start, and a controller restarted anywhere carries on at the step the topic says, neither
skipping one nor repeating one. A key holds one rollout; another attempt takes a new key (users are bucketed
afresh under it).

The order of a change. A decision that changes the allocation is published first, naming the revision the
experiment is about to have (``revision_after``); the experiment is published after it. A crash between the two
leaves a decision whose experiment is behind, and every round begins by bringing each rollout's experiment to what
its last decision says (``reconcile``): the change is made late, but once, and never lost. A decision's event id
derives from its rollout, sequence number and action, so one published twice is one. Two writers racing for one
sequence number (the controller's look and a person's pause) both land: the first on the topic is the decision,
every reader ignores the other, and its writer sees that it lost (a person's command tries again).

The decisions:

* START: the experiment at the first step's percent; the decision carries the plan.
* HOLD: the step goes on. Recorded only when its reason changes (its words; the numbers change at every look) or
  ``HOLD_REPEAT_S`` after the last decision, so the topic is not flooded.
* ADVANCE: every guardrail within its margin with ``min_users`` per arm: the next step, a new revision.
* COMPLETE: ADVANCE onto the last step, 100 %, where no control is left to compare with, so the rollout ends. The
  experiment stays RUNNING with every user in the treatment: that is what "the new setting is the default" means
  here. The registry, the pools and the requests' own model stay as they were; an operator makes the new setting
  the requests' own, then stops the experiment (``pixelpipe experiments stop KEY``): stopping it first would bring
  the old setting back.
* ROLLBACK: a guardrail breached: the treatment's weight 0 at once; the rollout ends. The experiment stays RUNNING
  with every user in control, and the treatment variant stays defined, so the requests assigned to it before (in
  flight) still render with its overrides and get their results.
* PAUSE, RESUME: a person's. Paused, the controller still looks and rolls a harmful treatment back, but neither
  advances nor records a HOLD.
* ABORT: a person's: the treatment's weight 0 and the experiment stopped (no one is assigned any more). It ends a
  rollout, and may follow a COMPLETE (to undo it) or a ROLLBACK (to stop the experiment).

The controller never advances without data: a step's data comes from ClickHouse, and without an answer there is
no decision. Without Kafka nothing is read or published, and the next round tries again. Stopped, it leaves every
allocation as it is.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from pixelpipe.analytics.guardrails import Decision, StepData, Verdict, decide
from pixelpipe.analytics.rollout_data import fetch_arms
from pixelpipe.analytics.rollout_plan import CONTROL, TREATMENT, RolloutError, describe_plan, guardrails_of, overrides
from pixelpipe.analytics.sufficient_stats import Client
from pixelpipe.core.clock import utc_now
from pixelpipe.core.events import RolloutAction, RolloutDecision, RolloutPlan
from pixelpipe.core.experiments import Experiment, Variant
from pixelpipe.core.ids import derived_event_id

log = logging.getLogger(__name__)

HOLD_REPEAT_S = 300.0  # a HOLD with an unchanged reason is recorded this long after the last decision
_ENDED: dict[str, str] = {"COMPLETE": "complete", "ROLLBACK": "rolled back", "ABORT": "aborted"}
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|[-+]?inf|nan")


# -- a rollout's state, from its decisions -------------------------------------------------------------------
@dataclass(frozen=True)
class Rollout:
    """A rollout as its decisions say it is: START first, one decision per sequence number, in order."""

    key: str
    decisions: tuple[RolloutDecision, ...]

    @property
    def plan(self) -> RolloutPlan:
        plan = self.decisions[0].plan
        assert plan is not None  # rollouts_from keeps only rollouts that begin with their START
        return plan

    @property
    def last(self) -> RolloutDecision:
        return self.decisions[-1]

    @property
    def step(self) -> int:
        return self.last.step

    @property
    def percent(self) -> float:
        return self.last.percent_after

    @property
    def revision(self) -> int:
        """The revision of the current step: results of this step name it."""
        return self.last.revision_after

    @property
    def ended(self) -> str | None:
        """'complete', 'rolled back' or 'aborted'; None while it runs."""
        return _ENDED.get(self.last.action)

    @property
    def paused(self) -> bool:
        marks = [d.action for d in self.decisions if d.action in ("PAUSE", "RESUME")]
        return self.ended is None and bool(marks) and marks[-1] == "PAUSE"

    @property
    def state(self) -> str:
        return self.ended or ("paused" if self.paused else "running")

    def experiment(self) -> Experiment:
        """The experiment as the last decision would have it."""
        start = self.decisions[0].event_time
        stopped = self.last.action == "ABORT"
        end = self.last.event_time if stopped and self.last.event_time > start else None
        changes = MappingProxyType(overrides(self.plan.treatment))
        variants = (Variant(CONTROL, 100.0 - self.percent), Variant(TREATMENT, self.percent, changes))
        return Experiment(self.key, variants, start, end, CONTROL, describe_plan(self.plan), self.revision, stopped)


def rollouts_from(decisions: Iterable[RolloutDecision]) -> dict[str, Rollout]:
    """Each rollout on the topic (``decisions`` in topic order): the first decision of each sequence number is the
    one (a repeat, or a racing writer's, is ignored)."""
    by_key: dict[str, dict[int, RolloutDecision]] = {}
    for decision in decisions:
        by_key.setdefault(decision.rollout, {}).setdefault(decision.sequence, decision)
    rollouts = {}
    for key, numbered in by_key.items():
        ordered = tuple(numbered[n] for n in sorted(numbered))
        if ordered[0].action != "START" or ordered[0].plan is None:
            log.warning("rollout without its START on the topic: left alone", extra={"rollout": key})
            continue
        rollouts[key] = Rollout(key, ordered)
    return rollouts


def new_decision(
    rollout: Rollout | None,
    key: str,
    action: RolloutAction,
    reason: str,
    decided_by: str,
    *,
    step: int | None = None,
    percent: float | None = None,
    figures: dict[str, float] | None = None,
    plan: RolloutPlan | None = None,
) -> RolloutDecision:
    """The decision after ``rollout``'s last (None: a START); a new ``percent`` takes a new revision, else the
    step, percent and revision stay."""
    before_percent, before_revision = (rollout.percent, rollout.revision) if rollout else (0.0, 0)
    sequence = rollout.last.sequence + 1 if rollout else 1
    if step is None:
        step = rollout.step if rollout else 0
    return RolloutDecision(
        event_id=derived_event_id(f"rollout:{key}", f"{sequence}:{action}"),
        event_time=_now_ms(),
        rollout=key,
        sequence=sequence,
        action=action,
        step=step,
        percent_before=before_percent,
        percent_after=before_percent if percent is None else percent,
        revision_before=before_revision,
        revision_after=before_revision if percent is None else before_revision + 1,
        reason=reason,
        figures=figures or {},
        decided_by=decided_by,
        plan=plan,
    )


def _now_ms() -> datetime.datetime:
    """Now, to the millisecond the events keep, so an experiment built from a decision read back is the same."""
    now = utc_now()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


# -- where decisions and experiments live -------------------------------------------------------------------
class RolloutStore(Protocol):
    """The rollouts topic and the experiments topic (``rollout_store.KafkaRolloutStore``; fakes in tests)."""

    def decisions(self) -> list[RolloutDecision]:
        """Every decision on the rollouts topic, in topic order."""
        ...

    def publish_decision(self, decision: RolloutDecision) -> None:
        """Returns once the broker has it."""
        ...

    def experiments(self) -> dict[str, Experiment]:
        """The experiments in force, by key."""
        ...

    def publish_experiment(self, experiment: Experiment, applied_by: str) -> Experiment | None:
        """Publishes it with the next revision unless its definition is in force already; what was published."""
        ...


def read_rollouts(store: RolloutStore) -> dict[str, Rollout]:
    return rollouts_from(store.decisions())


def reconcile(
    store: RolloutStore, rollout: Rollout, current: Experiment | None, progress: Callable[[str], None]
) -> None:
    """Bring the experiment to what the rollout's last decision says when it is behind (a crash came between the
    decision and the experiment); an experiment changed since by someone else is left as it is, with a warning
    while the rollout runs."""
    wanted = rollout.experiment()
    if current is not None and dataclasses.replace(current, revision=wanted.revision) == wanted:
        return
    if current is not None and current.revision >= rollout.revision:
        if rollout.ended is None:
            log.warning(
                "experiment changed outside its rollout: pause or abort the rollout",
                extra={"rollout": rollout.key, "revision": current.revision, "rollout_revision": rollout.revision},
            )
        return
    published = store.publish_experiment(wanted, applied_by=rollout.last.decided_by)
    if published is not None:
        progress(
            f"{rollout.key}: experiment at revision {published.revision}, {rollout.percent:g} % treatment "
            f"({rollout.last.action.lower()})"
        )


def apply(store: RolloutStore, decision: RolloutDecision, progress: Callable[[str], None]) -> Rollout:
    """Publish ``decision``, then the experiment it calls for; returns the rollout as the topic has it now (whose
    decision at that sequence number may be another writer's: see ``won``)."""
    store.publish_decision(decision)
    rollout = read_rollouts(store)[decision.rollout]
    reconcile(store, rollout, store.experiments().get(rollout.key), progress)
    return rollout


def won(rollout: Rollout, decision: RolloutDecision) -> bool:
    """Whether ``decision`` is the rollout's decision at its sequence number (not a racing writer's)."""
    if decision.sequence > len(rollout.decisions):
        return False
    kept = rollout.decisions[decision.sequence - 1]
    return (kept.event_id, kept.event_time, kept.decided_by) == (
        decision.event_id,
        decision.event_time,
        decision.decided_by,
    )


# -- a person's decisions ----------------------------------------------------------------------------------
def start_rollout(
    store: RolloutStore, key: str, plan: RolloutPlan, decided_by: str, progress: Callable[[str], None]
) -> Rollout:
    """START: the experiment KEY at the plan's first step."""
    existing = read_rollouts(store).get(key)
    if existing is not None:
        started = f"{existing.decisions[0].event_time:%Y-%m-%d %H:%M} UTC"
        raise RolloutError(
            f"rollout {key!r} exists already ({existing.state}, started {started}): a key holds one rollout; start "
            "another attempt under a new key"
        )
    if key in store.experiments():
        raise RolloutError(
            f"experiment {key!r} is on the experiments topic already: a rollout makes an experiment of its own; "
            "choose a new key"
        )
    reason = f"start: {describe_plan(plan)}"
    decision = new_decision(None, key, "START", reason, decided_by, step=0, percent=plan.steps[0], plan=plan)
    rollout = apply(store, decision, progress)
    if not won(rollout, decision):
        raise RolloutError(f"rollout {key!r} was started by {rollout.decisions[0].decided_by} at the same moment")
    return rollout


def person_decides(
    store: RolloutStore,
    key: str,
    action: RolloutAction,
    reason: str,
    decided_by: str,
    progress: Callable[[str], None],
) -> Rollout:
    """PAUSE, RESUME or ABORT of rollout KEY; tried again when the controller's decision comes first."""
    for _ in range(3):
        rollouts = read_rollouts(store)
        if key not in rollouts:
            known = ", ".join(sorted(rollouts)) or "none"
            raise RolloutError(f"no rollout {key!r}; rollouts on the topic: {known}")
        rollout = rollouts[key]
        _check_allowed(rollout, action)
        percent = 0.0 if action == "ABORT" else None
        decision = new_decision(rollout, key, action, reason, decided_by, percent=percent)
        after = apply(store, decision, progress)
        if won(after, decision):
            return after
    raise RolloutError(f"rollout {key!r} kept changing under the command; try again")


def _check_allowed(rollout: Rollout, action: RolloutAction) -> None:
    if action == "ABORT":
        if rollout.ended == "aborted":
            raise RolloutError(f"rollout {rollout.key!r} is aborted already")
        return
    if rollout.ended is not None:
        raise RolloutError(f"rollout {rollout.key!r} has ended ({rollout.ended}): only abort applies to it")
    if action == "PAUSE" and rollout.paused:
        raise RolloutError(f"rollout {rollout.key!r} is paused already")
    if action == "RESUME" and not rollout.paused:
        raise RolloutError(f"rollout {rollout.key!r} is not paused")


# -- the controller -------------------------------------------------------------------------------------------
class Controller:
    """Looks at every running rollout once a round and acts on ``guardrails.decide``'s verdict.

    ``connect`` opens a ClickHouse client for a round's looks (closed after it). ``progress`` gets a line for every
    decision and experiment change; the logs get the rest.
    """

    def __init__(
        self,
        store: RolloutStore,
        connect: Callable[[], Client],
        decided_by: str,
        progress: Callable[[str], None] = lambda _: None,
        hold_repeat_s: float = HOLD_REPEAT_S,
    ) -> None:
        self.store = store
        self.connect = connect
        self.decided_by = decided_by
        self.progress = progress
        self.hold_repeat_s = hold_repeat_s

    def round(self) -> list[RolloutDecision]:
        """Reconcile every rollout's experiment, then one look at each running one; the decisions taken."""
        try:
            rollouts = read_rollouts(self.store)
            experiments = self.store.experiments()
            for rollout in rollouts.values():
                reconcile(self.store, rollout, experiments.get(rollout.key), self.progress)
        except Exception as e:  # Kafka unreachable or refusing: nothing read, nothing published; next round retries
            log.warning("rollouts not read: no look this round", extra={"error": repr(e)})
            return []
        running = [r for r in rollouts.values() if r.ended is None]
        if not running:
            return []
        try:
            client = self.connect()
        except Exception as e:  # ClickHouse unreachable: no data, so no decision
            log.warning("ClickHouse unreachable: no decision this round", extra={"error": repr(e)})
            return []
        decisions = []
        try:
            for rollout in running:
                try:
                    decision = self.look(rollout, client)
                except Exception as e:  # a failed query or publish: this rollout waits for the next round
                    log.warning("look failed: no decision", extra={"rollout": rollout.key, "error": repr(e)})
                    continue
                if decision is not None:
                    decisions.append(decision)
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                close()
        return decisions

    def look(self, rollout: Rollout, client: Client) -> RolloutDecision | None:
        """One look at one rollout's current step; the decision published, or None (no change worth recording, or
        another writer's decision came first)."""
        plan = rollout.plan
        verdict = judge_step(rollout, client)
        log.info(
            "rollout looked at",
            extra={
                "rollout": rollout.key,
                "step": rollout.step,
                "verdict": str(verdict.decision),
                "reason": verdict.reason,
            },
        )
        key, figures = rollout.key, verdict.figures
        if verdict.decision == Decision.ROLLBACK:
            decision = new_decision(
                rollout, key, "ROLLBACK", verdict.reason, self.decided_by, percent=0.0, figures=figures
            )
        elif rollout.paused:
            return None
        elif verdict.decision == Decision.ADVANCE:
            step = rollout.step + 1
            action: RolloutAction = "COMPLETE" if step == len(plan.steps) - 1 else "ADVANCE"
            reason = (
                verdict.reason
                if action == "ADVANCE"
                else f"every user on the treatment, the new default: {verdict.reason}"
            )
            decision = new_decision(
                rollout, key, action, reason, self.decided_by, step=step, percent=plan.steps[step], figures=figures
            )
        elif self._hold_worth_recording(rollout, verdict.reason):
            decision = new_decision(rollout, key, "HOLD", verdict.reason, self.decided_by, figures=figures)
        else:
            return None
        after = apply(self.store, decision, self.progress)
        if not won(after, decision):
            log.info("another decision came first", extra={"rollout": key, "sequence": decision.sequence})
            return None
        if decision.action == "ROLLBACK":
            log.warning("rollout rolled back", extra={"rollout": key, "reason": decision.reason})
        self.progress(
            f"{key}: {decision.action} at step {decision.step + 1}/{len(plan.steps)}, {decision.percent_before:g} % -> "
            f"{decision.percent_after:g} %: {decision.reason}"
        )
        return decision

    def _hold_worth_recording(self, rollout: Rollout, reason: str) -> bool:
        last = rollout.last
        if gist(reason) != gist(last.reason):
            return True
        return (utc_now() - last.event_time).total_seconds() >= self.hold_repeat_s


def judge_step(rollout: Rollout, client: Client) -> Verdict:
    """The guardrails' verdict on the rollout's current step, from its rows in ClickHouse (nothing is published)."""
    arms = fetch_arms(client, rollout.key, rollout.revision)
    plan = rollout.plan
    step = StepData(arms.get(CONTROL), arms.get(TREATMENT))
    return decide(step, guardrails_of(plan), plan.min_users, plan.alpha, rollout.percent / 100)


def gist(reason: str) -> str:
    """A reason without its numbers: what a HOLD says, which changes far less often than its figures."""
    return _NUMBER.sub("#", reason)
