"""Guarded rollouts without a broker or a ClickHouse server: the plan's checks, a rollout rebuilt from its decisions,
the controller's decisions on faked step data (roll-back, advance to completion, HOLD recorded once, nothing decided
without data), a controller killed between a decision and its experiment change resuming without skipping or
repeating a step, a person's pause, resume and abort, the step query on chDB, and the commands' errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from click.testing import CliRunner

from pixelpipe.analytics import rollout_cli
from pixelpipe.analytics.rollout_data import STEP_METRICS, fetch_arms, step_sql
from pixelpipe.analytics.rollout_plan import RolloutError, make_plan, parse_guardrails, parse_steps
from pixelpipe.analytics.rollouts import (
    Controller,
    gist,
    person_decides,
    read_rollouts,
    rollouts_from,
    start_rollout,
)
from pixelpipe.cli import main
from pixelpipe.core import cli as core_cli
from pixelpipe.core import clickhouse
from pixelpipe.core.clickhouse import ChdbClient
from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ExperimentDefinition, RolloutDecision
from pixelpipe.core.experiments import Experiment
from pixelpipe.core.live_experiments import from_definition, to_definition
from pixelpipe.sinks.clickhouse.migrate import apply_migrations

CODEC = Codec()
KEY = "sd-2"
# Margins a few hundred faked users can show to be within: the advance path without thousands of rows.
LOOSE = "failure_rate:+0.1,moderation_rejection_rate:+0.1,latency_p95:+50%,cost_per_image:+20%"


class FakeStore:
    """The two topics as lists: what is published is read back through the codec, as from the broker."""

    def __init__(self) -> None:
        self.topic: list[RolloutDecision] = []
        self.live: dict[str, Experiment] = {}
        self.published: list[Experiment] = []
        self.down = False
        self.experiment_publishes_to_fail = 0
        self.racing_writer: Callable[[FakeStore], None] | None = None

    def _check(self) -> None:
        if self.down:
            raise TimeoutError("the broker does not answer")

    def decisions(self) -> list[RolloutDecision]:
        self._check()
        return list(self.topic)

    def publish_decision(self, decision: RolloutDecision) -> None:
        self._check()
        if self.racing_writer is not None:
            racing, self.racing_writer = self.racing_writer, None
            racing(self)
        self.topic.append(CODEC.decode_as(RolloutDecision, CODEC.encode(decision)))

    def experiments(self) -> dict[str, Experiment]:
        self._check()
        return dict(self.live)

    def publish_experiment(self, experiment: Experiment, applied_by: str) -> Experiment | None:
        self._check()
        if self.experiment_publishes_to_fail:
            self.experiment_publishes_to_fail -= 1
            raise TimeoutError("the broker did not take the experiment")
        current = self.live.get(experiment.key)
        if current is not None and dataclasses.replace(current, revision=experiment.revision) == experiment:
            return None
        revision = (current.revision if current else 0) + 1
        definition = CODEC.encode(to_definition(experiment, revision, applied_by))
        self.live[experiment.key] = from_definition(CODEC.decode_as(ExperimentDefinition, definition))
        self.published.append(self.live[experiment.key])
        return self.live[experiment.key]

    def actions(self) -> list[str]:
        return [d.action for d in self.topic]


class FakeWarehouse:
    """ClickHouse answering each step's query with the rows given for that key and revision (none otherwise)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple]] = {}
        self.queried: list[int] = []
        self.fails = False

    def set_step(self, revision: int, *rows: tuple) -> None:
        self.rows[step_sql(KEY, revision)] = list(rows)

    def execute(self, sql: str) -> list[tuple]:
        if self.fails:
            raise ConnectionError("ClickHouse query failed")
        self.queried.append(next((r for r in range(1, 20) if sql == step_sql(KEY, r)), 0))
        return self.rows.get(sql, [])

    def close(self) -> None:
        pass


def arm(name: str, users: int, failure: float = 0.0, latency_ms: float = 800.0, seed: int = 0) -> tuple:
    """One arm's row as the step query returns it: per-user failure shares 0 or 1 (one request each)."""
    rng = np.random.default_rng(seed)
    failed = (rng.random(users) < failure).astype(float)
    latencies = rng.lognormal(np.log(latency_ms), 0.3, users)
    costs = 0.002 * rng.lognormal(0.0, 0.05, users)
    ok = users - int(failed.sum())
    return (
        name,
        users,
        failed.sum(),
        failed.sum(),
        0.0,
        0.0,
        ok,
        costs[:ok].sum(),
        (costs[:ok] ** 2).sum(),
        list(latencies[:ok]),
    )


def good(users: int = 400, percent: float = 10) -> tuple[tuple, tuple]:
    """A harmless candidate's step at ``percent``: ``users`` treated, and control's users in the step's split."""
    return arm("control", round(users * (100 - percent) / percent), seed=1), arm("treatment", users, seed=2)


def harmful(users: int = 100) -> tuple[tuple, tuple]:
    return arm("control", 9 * users, seed=1), arm("treatment", users, failure=0.3, seed=2)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def warehouse() -> FakeWarehouse:
    return FakeWarehouse()


def controller(store: FakeStore, warehouse: FakeWarehouse, **kwargs) -> Controller:
    return Controller(store, lambda: warehouse, "rollout-controller:test", **kwargs)


def start(store: FakeStore, steps: str = "10,50,100", guardrails: str | None = None, min_users: int = 20):
    limits = None if guardrails is None else parse_guardrails(guardrails)
    plan = make_plan({"model": "sd-2"}, "sd-1", parse_steps(steps), min_users, 0.05, limits)
    return start_rollout(store, KEY, plan, "cli:test", lambda _: None)


# -- the plan -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,5,x", "expected percents separated by commas"),
        ("5,1,100", "each step must be larger than the one before"),
        ("1,5,50", "they end at 100"),
        ("100", "after at least one step below it"),
        ("0,50,100", "above 0 and at most 100"),
        ("10,50,120", "above 0 and at most 100"),
    ],
)
def test_steps_that_cannot_make_a_ramp_are_refused(text, message):
    with pytest.raises(RolloutError, match=message):
        parse_steps(text)


def test_guardrails_read_absolute_and_relative_margins_and_refuse_what_no_look_can_measure():
    limits = parse_guardrails("failure_rate:+0.01, latency_p95:+20%")
    assert [(g.metric, g.margin, g.relative) for g in limits] == [
        ("failure_rate", 0.01, False),
        ("latency_p95", 0.2, True),
    ]
    with pytest.raises(RolloutError, match="expected METRIC:MARGIN"):
        parse_guardrails("failure_rate")
    with pytest.raises(RolloutError, match="is not a number"):
        parse_guardrails("failure_rate:lots")
    with pytest.raises(
        RolloutError, match=f"unknown guardrail metric.*joy; a rollout measures {', '.join(STEP_METRICS)}"
    ):
        make_plan({"model": "m"}, guardrails=parse_guardrails("joy:+1"))
    with pytest.raises(RolloutError, match="the margin is the harm tolerated"):
        make_plan({"model": "m"}, guardrails=parse_guardrails("failure_rate:-0.01"))
    with pytest.raises(RolloutError, match="changes nothing"):
        make_plan({"model": None})


# -- state from the topic -------------------------------------------------------------------------------------
def test_a_rollout_is_rebuilt_from_its_decisions_a_repeat_counted_once_and_one_without_its_start_left_alone(store):
    start(store)
    person_decides(store, KEY, "PAUSE", "a look at the dashboards", "cli:test", lambda _: None)
    store.topic.append(store.topic[-1])  # the pause published twice
    orphan = dataclasses.replace(store.topic[1], rollout="lost-start", sequence=2)
    rollouts = rollouts_from([*store.topic, orphan])
    assert list(rollouts) == [KEY]
    rollout = rollouts[KEY]
    assert [d.action for d in rollout.decisions] == ["START", "PAUSE"]
    assert (rollout.state, rollout.step, rollout.percent, rollout.revision) == ("paused", 0, 10.0, 1)


def test_start_publishes_the_decision_with_its_plan_then_the_experiment_at_the_first_step(store):
    rollout = start(store)
    (decision,) = store.topic
    assert (decision.action, decision.sequence, decision.percent_before, decision.percent_after) == ("START", 1, 0, 10)
    assert (decision.revision_before, decision.revision_after) == (0, 1)
    assert decision.plan.steps == [10, 50, 100] and decision.plan.treatment.model == "sd-2"
    experiment = store.live[KEY]
    assert experiment.revision == 1 and not experiment.stopped
    assert experiment.weights == {"control": 90, "treatment": 10}
    assert experiment.overrides_for("treatment") == {"model": "sd-2"} and experiment.overrides_for("control") == {}
    assert rollout.experiment() == experiment
    with pytest.raises(RolloutError, match=r"exists already \(running"):
        start(store)
    other = FakeStore()
    other.live[KEY] = experiment
    with pytest.raises(RolloutError, match="is on the experiments topic already"):
        start(other)


# -- the controller -------------------------------------------------------------------------------------------
def test_a_harmful_treatment_is_rolled_back_at_once_with_its_figures_and_the_rollout_ends(store, warehouse):
    start(store)
    warehouse.set_step(1, *harmful())
    (decision,) = controller(store, warehouse).round()
    assert decision.action == "ROLLBACK"
    assert (decision.percent_before, decision.percent_after, decision.revision_before, decision.revision_after) == (
        10,
        0,
        1,
        2,
    )
    assert decision.reason.startswith("harm beyond the margin: failure_rate")
    assert decision.figures["failure_rate.ci_low"] > decision.figures["failure_rate.margin"]
    experiment = store.live[KEY]
    # Weight 0, still running, and the treatment keeps its overrides for the requests assigned to it before.
    assert experiment.revision == 2 and experiment.weights["treatment"] == 0 and not experiment.stopped
    assert experiment.overrides_for("treatment") == {"model": "sd-2"}
    assert read_rollouts(store)[KEY].state == "rolled back"
    assert controller(store, warehouse).round() == []


def test_a_good_treatment_advances_step_by_step_to_complete_and_stays_the_default(store, warehouse):
    start(store, guardrails=LOOSE)
    warehouse.set_step(1, *good())
    warehouse.set_step(2, *good(percent=50))
    running = controller(store, warehouse)
    (advance,) = running.round()
    assert (advance.action, advance.step, advance.percent_after, advance.revision_after) == ("ADVANCE", 1, 50, 2)
    (complete,) = running.round()
    assert (complete.action, complete.step, complete.percent_after, complete.revision_after) == ("COMPLETE", 2, 100, 3)
    assert running.round() == []
    assert [(e.revision, e.weights["treatment"]) for e in store.published] == [(1, 10), (2, 50), (3, 100)]
    assert not store.live[KEY].stopped  # every user on the treatment: the new default
    assert warehouse.queried == [1, 2]  # each look read its own step's rows only
    assert read_rollouts(store)[KEY].state == "complete"


def test_nothing_advances_without_data(store, warehouse):
    start(store, guardrails=LOOSE, min_users=300)
    warehouse.set_step(1, *good(users=100))  # no harm, but too few users
    down = Controller(store, lambda: (_ for _ in ()).throw(ConnectionError("refused")), "rollout-controller:test")
    assert down.round() == []
    warehouse.fails = True
    assert controller(store, warehouse).round() == []
    assert store.actions() == ["START"]
    warehouse.fails = False
    (hold,) = controller(store, warehouse).round()
    assert hold.action == "HOLD" and "too few users" in hold.reason
    assert store.live[KEY].revision == 1


def test_a_step_whose_users_are_not_split_as_allocated_holds_until_they_are(store, warehouse):
    start(store, guardrails=LOOSE)
    warehouse.set_step(1, *good(percent=50))  # as many treated as control at the 10 % step: results go missing
    (hold,) = controller(store, warehouse).round()
    assert hold.action == "HOLD" and "sample ratio mismatch: 400 of 800 users" in hold.reason
    assert hold.figures["srm.p_value"] < 0.001
    warehouse.set_step(1, *good())
    (advance,) = controller(store, warehouse).round()
    assert (advance.action, advance.percent_after) == ("ADVANCE", 50)


def test_a_hold_is_recorded_when_its_reason_changes_not_at_every_look(store, warehouse):
    start(store, guardrails=LOOSE, min_users=300)
    running = controller(store, warehouse)
    (first,) = running.round()
    assert first.reason == "holding: no control or treatment users in this step yet"
    assert running.round() == []
    warehouse.set_step(1, *good(users=100))
    (second,) = running.round()
    assert "too few users" in second.reason
    warehouse.set_step(1, *good(users=120))  # other numbers, the same reason
    assert running.round() == []
    short = "too few users: latency_p95 needs 77 per arm ({})"
    assert gist(short.format("control has 5, treatment has 3")) == gist(short.format("control has 50, treatment has 8"))
    assert gist(short.format("control has 5, treatment has 3")) != gist(short.format("treatment has 30"))
    (repeated,) = controller(store, warehouse, hold_repeat_s=0.0).round()  # its interval passed
    assert repeated.action == "HOLD"
    assert store.actions() == ["START", "HOLD", "HOLD", "HOLD"]


def test_a_controller_killed_between_a_decision_and_its_experiment_resumes_without_skipping_or_repeating(
    store, warehouse
):
    start(store, steps="10,50,75,100", guardrails=LOOSE)
    warehouse.set_step(1, *good())
    store.experiment_publishes_to_fail = 1  # the decision lands, the experiment change does not
    assert controller(store, warehouse).round() == []
    assert store.actions() == ["START", "ADVANCE"] and store.live[KEY].revision == 1
    restarted = controller(store, warehouse)
    (hold,) = restarted.round()  # the experiment brought to the decision first, then a look at the new step
    assert store.live[KEY].revision == 2 and store.live[KEY].weights["treatment"] == 50
    assert (hold.action, hold.step, hold.revision_after) == ("HOLD", 1, 2)
    assert warehouse.queried == [1, 2]
    warehouse.set_step(2, *good(percent=50))
    (advance,) = restarted.round()
    assert (advance.action, advance.step, advance.percent_after) == ("ADVANCE", 2, 75)
    assert store.actions() == ["START", "ADVANCE", "HOLD", "ADVANCE"]
    assert [e.weights["treatment"] for e in store.published] == [10, 50, 75]


def test_without_kafka_nothing_is_read_or_published_and_the_next_round_carries_on(store, warehouse):
    start(store)
    warehouse.set_step(1, *harmful())
    store.down = True
    assert controller(store, warehouse).round() == []
    store.down = False
    assert [d.action for d in controller(store, warehouse).round()] == ["ROLLBACK"]


# -- a person's decisions -------------------------------------------------------------------------------------
def test_paused_it_neither_advances_nor_holds_but_still_rolls_back(store, warehouse):
    start(store, guardrails=LOOSE)
    person_decides(store, KEY, "PAUSE", "checking", "cli:test", lambda _: None)
    warehouse.set_step(1, *good())
    assert controller(store, warehouse).round() == []
    person_decides(store, KEY, "RESUME", "looks fine", "cli:test", lambda _: None)
    person_decides(store, KEY, "PAUSE", "checking again", "cli:test", lambda _: None)
    warehouse.set_step(1, *harmful())
    assert [d.action for d in controller(store, warehouse).round()] == ["ROLLBACK"]
    with pytest.raises(RolloutError, match=r"has ended \(rolled back\): only abort applies"):
        person_decides(store, KEY, "RESUME", "", "cli:test", lambda _: None)


def test_resumed_it_advances_again(store, warehouse):
    start(store, guardrails=LOOSE)
    person_decides(store, KEY, "PAUSE", "checking", "cli:test", lambda _: None)
    with pytest.raises(RolloutError, match="paused already"):
        person_decides(store, KEY, "PAUSE", "", "cli:test", lambda _: None)
    person_decides(store, KEY, "RESUME", "looks fine", "cli:test", lambda _: None)
    warehouse.set_step(1, *good())
    assert [d.action for d in controller(store, warehouse).round()] == ["ADVANCE"]


def test_abort_rolls_back_to_zero_and_stops_the_experiment(store):
    start(store)
    aborted = person_decides(store, KEY, "ABORT", "wrong model", "cli:ops", lambda _: None)
    assert (aborted.state, aborted.percent, aborted.revision) == ("aborted", 0, 2)
    assert store.live[KEY].stopped and store.live[KEY].weights["treatment"] == 0
    with pytest.raises(RolloutError, match="aborted already"):
        person_decides(store, KEY, "ABORT", "", "cli:ops", lambda _: None)
    with pytest.raises(RolloutError, match=f"no rollout 'other'; rollouts on the topic: {KEY}"):
        person_decides(store, "other", "PAUSE", "", "cli:ops", lambda _: None)


def test_a_persons_decision_that_loses_the_race_for_its_sequence_number_is_made_again_after(store, warehouse):
    start(store)

    def controller_holds_first(racing: FakeStore) -> None:
        racing.topic.append(
            dataclasses.replace(racing.topic[-1], sequence=2, action="HOLD", event_id="hold-2", plan=None)
        )

    store.racing_writer = controller_holds_first
    paused = person_decides(store, KEY, "PAUSE", "checking", "cli:ops", lambda _: None)
    assert [(d.sequence, d.action) for d in paused.decisions] == [(1, "START"), (2, "HOLD"), (3, "PAUSE")]
    assert paused.paused and store.actions() == ["START", "HOLD", "PAUSE", "PAUSE"]  # the loser stays, ignored


# -- the step's query -----------------------------------------------------------------------------------------
def test_the_step_query_reads_only_the_steps_revision_per_user(chdb_client: ChdbClient):
    apply_migrations(chdb_client)
    columns = (
        "event_id, request_id, schema_version, event_time_ms, status, kind, user_id, image_uris, moderation_stage,"
        " model, experiment_keys, experiment_variants, experiment_revisions, request_created_at_ms"
    )
    chdb_client.execute(
        f"INSERT INTO results ({columns}) VALUES"
        " ('e1', 'r1', 4, 3000, 'SUCCEEDED', 'GENERATE', 'u1', ['s3://a'], '', 'sd-1', ['k'], ['control'], [2], 1000),"
        " ('e2', 'r2', 4, 3000, 'FAILED', 'GENERATE', 'u1', [], '', 'sd-1', ['k'], ['control'], [2], 1000),"
        " ('e3', 'r3', 4, 2500, 'SUCCEEDED', 'GENERATE', 'u2', ['s3://b', 's3://c'], '', 'sd-2', ['x', 'k'],"
        "  ['c', 'treatment'], [7, 2], 1000),"
        " ('e4', 'r4', 4, 2500, 'REJECTED', 'GENERATE', 'u2', [], 'OUTPUT_IMAGE', 'sd-2', ['x', 'k'],"
        "  ['c', 'treatment'], [7, 2], 1000),"
        " ('e5', 'r5', 4, 2500, 'REJECTED', 'GENERATE', 'u3', [], 'PROMPT', 'sd-2', ['k'], ['treatment'], [2], 1000),"
        " ('e6', 'r6', 4, 2500, 'FAILED', 'GENERATE', 'u4', [], '', 'sd-2', ['k'], ['treatment'], [1], 1000)"
    )
    chdb_client.execute(
        "INSERT INTO stage_metrics (event_id, request_id, schema_version, event_time_ms, stage, outcome, queue_ms,"
        " compute_ms, batch_size, device, device_seconds, cost_usd, worker_id, user_id, model, experiment_keys,"
        " experiment_variants, experiment_revisions) VALUES"
        " ('m1', 'r1', 3, 3000, 'GENERATE', 'OK', 1, 1, 1, 'cpu', 1, 0.5, 'w', 'u1', 'sd-1', ['k'], ['control'],"
        "  [2]),"
        " ('m3', 'r3', 3, 2500, 'GENERATE', 'OK', 1, 1, 1, 'cpu', 1, 0.8, 'w', 'u2', 'sd-2', ['k'], ['treatment'],"
        "  [2]),"
        " ('m6', 'r6', 3, 2500, 'GENERATE', 'FAILED', 1, 1, 1, 'cpu', 1, 9, 'w', 'u4', 'sd-2', ['k'], ['treatment'],"
        "  [1])"
    )
    arms = fetch_arms(chdb_client, "k", 2)
    control, treatment = arms["control"], arms["treatment"]
    # u1: one of two requests failed; u2: one of two rejected at the output, two images for 0.8; u3: a prompt
    # refused (not the model's doing); u4's failure is another step's.
    assert (control["failure_rate"].n, control["failure_rate"].mean) == (1, 0.5)
    assert (treatment["failure_rate"].n, treatment["failure_rate"].sum) == (2, 0.0)
    assert treatment["moderation_rejection_rate"].sum == 0.5
    assert control["cost_per_image"].mean == 0.5 and treatment["cost_per_image"].mean == pytest.approx(0.4)
    assert list(control["latency_p95"]) == [2000.0] and list(treatment["latency_p95"]) == [1500.0]
    assert set(fetch_arms(chdb_client, "k", 1)) == {"treatment"}


# -- the commands ---------------------------------------------------------------------------------------------
@pytest.fixture
def cli_store(store, monkeypatch, tmp_path):
    monkeypatch.setattr(rollout_cli, "_store", lambda _settings: store)
    monkeypatch.setattr(core_cli, "_check_kafka", lambda _kafka: None)
    registry = tmp_path / "registry.json"
    registry.write_text('{"sd-1": {"kind": "null"}}')
    monkeypatch.setenv("PIXELPIPE_MODEL_REGISTRY", str(registry))
    return store


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "5,1,100"], "each step must be larger than the one before"),
        (["--steps", "1,5,50"], "they end at 100"),
        (["--guardrails", "joy:+1"], "unknown guardrail metric(s) joy"),
        (["--guardrails", "failure_rate"], "expected METRIC:MARGIN"),
        (["--inference-steps", "0"], "Invalid value for --inference-steps: must be between 1 and 150, got 0"),
        (["--guidance", "99"], "Invalid value for --guidance: must be between 0 and 50, got 99.0"),
        (["--scheduler", "fast"], "Invalid value for --scheduler: 'fast' is not one of ddim, dpm-solver++"),
    ],
)
def test_start_refuses_bad_input_and_names_the_option(cli_store, args, message):
    done = CliRunner().invoke(main, ["rollout", "start", KEY, "--model", "sd-1", *args])
    assert done.exit_code == 2 and message in done.output, done.output
    assert cli_store.topic == []


def test_a_setting_rolls_out_like_a_model_and_a_treatment_that_changes_nothing_is_refused(cli_store):
    nothing = CliRunner().invoke(main, ["rollout", "start", KEY])
    assert nothing.exit_code == 2 and "name what the treatment changes: --model, --inference-steps" in nothing.output
    done = CliRunner().invoke(main, ["rollout", "start", KEY, "--inference-steps", "20", "--scheduler", "euler"])
    assert done.exit_code == 0 and "warning" not in done.stderr, done.output
    treatment = cli_store.topic[0].plan.treatment
    assert (treatment.model, treatment.steps, treatment.guidance, treatment.scheduler) == (None, 20, None, "euler")
    assert cli_store.live[KEY].overrides_for("treatment") == {"steps": 20, "scheduler": "euler"}
    assert "guarded rollout of steps 20, scheduler euler through 1, 5, 25, 50, 100 %" in done.stdout


def test_start_warns_of_a_model_the_registry_lacks_and_refuses_a_second_rollout_of_a_key(cli_store):
    done = CliRunner().invoke(main, ["rollout", "start", KEY, "--model", "sd-9", "--steps", "10,100"])
    assert done.exit_code == 0, done.output
    assert "warning: model 'sd-9' is not in the registry" in done.stderr
    assert f"started {KEY}: start: guarded rollout of model sd-9 through 10, 100 %" in done.stdout
    again = CliRunner().invoke(main, ["rollout", "start", KEY, "--model", "sd-1"])
    assert again.exit_code == 1 and "exists already (running" in again.output


def test_status_lists_the_decisions_and_pause_of_an_unknown_key_says_which_exist(cli_store):
    start(cli_store)
    person_decides(cli_store, KEY, "PAUSE", "checking the dashboards", "cli:ops", lambda _: None)
    listed = CliRunner().invoke(main, ["rollout", "status"])
    assert listed.exit_code == 0 and f"{KEY}: paused, step 1/3 at 10 % treatment; last PAUSE" in listed.output
    unknown = CliRunner().invoke(main, ["rollout", "pause", "other"])
    assert unknown.exit_code == 1 and f"no rollout 'other'; rollouts on the topic: {KEY}" in unknown.output
    resumed = CliRunner().invoke(main, ["rollout", "resume", KEY, "--reason", "dashboards fine"])
    assert resumed.exit_code == 0 and f"{KEY}: RESUME recorded; running at 10 % treatment" in resumed.output
    assert cli_store.topic[-1].reason == "dashboards fine"


def test_run_once_looks_and_decides_and_status_shows_the_step_figures_then_the_roll_back(cli_store, monkeypatch):
    warehouse = FakeWarehouse()
    warehouse.set_step(1, *harmful())
    monkeypatch.setattr(clickhouse, "connect", lambda _url: warehouse)
    start(cli_store)
    shown = CliRunner().invoke(main, ["rollout", "status", KEY])
    assert shown.exit_code == 0, shown.output
    assert "current step 1/3: 10 % treatment, experiment revision 1" in shown.output
    assert "now: ROLLBACK: harm beyond the margin" in shown.output
    assert "failure_rate               breached" in shown.output
    assert cli_store.actions() == ["START"]  # status only looks
    ran = CliRunner().invoke(main, ["rollout", "run", "--once"])
    assert ran.exit_code == 0, ran.output
    assert f"{KEY}: ROLLBACK at step 1/3, 10 % -> 0 %: harm beyond the margin" in ran.output
    shown = CliRunner().invoke(main, ["rollout", "status", KEY])
    assert f"{KEY}: rolled back;" in shown.output and "ROLLBACK 10 -> 0 %" in shown.output
    assert "now:" not in shown.output
