"""`pixelpipe demo --rollout` in pieces, without servers (the whole demo takes a few minutes on 2 cores, too slow for
the suite): its plan takes a candidate no worse than today's through every step and rolls a failing one back on the
volumes the demo produces, a rollout that never ends is aborted, the figures it prints, its registry of candidates,
its request stream, and its refusals (chDB without a server; options that do not go with --rollout)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import re
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from pixelpipe.analytics.rollout_data import step_sql
from pixelpipe.cli import main
from pixelpipe.core.events import ImageRequest, ImageResult
from pixelpipe.core.registry import ModelRegistry
from pixelpipe.core.settings import Settings
from pixelpipe.tools import rollout_demo
from pixelpipe.tools.stack import free_port
from pixelpipe.tools.stack.settings import StackSettings
from tests.unit.test_rollouts import FakeStore, arm

# The users each of the controller's looks finds more of in the demo: every request comes from a new user.
LOOK_S = rollout_demo.LOOK_EVERY_S
USERS_PER_LOOK = round(rollout_demo.REQUESTS_PER_S * LOOK_S)
BUDGET_S = 120.0  # the most the demo's volumes may take to decide a rollout: a few minutes for the whole demo


class StepWarehouse:
    """ClickHouse answering each step of rollout KEY as the demo's stream fills it: USERS_PER_LOOK more users at
    every look, split by the step's treatment share (``shares`` by revision), the treatment failing ``failure`` of
    its requests; up to what BUDGET_S brings."""

    def __init__(self, key: str, shares: dict[int, float], failure: float) -> None:
        self.steps = {step_sql(key, revision): (revision, share) for revision, share in shares.items()}
        self.failure = failure
        self.looks: dict[int, int] = {}

    def execute(self, sql: str) -> list[tuple]:
        if sql not in self.steps:
            return []
        revision, share = self.steps[sql]
        self.looks[revision] = self.looks.get(revision, 0) + 1
        users = USERS_PER_LOOK * min(self.looks[revision], round(BUDGET_S / LOOK_S))
        return [
            arm("control", round(users * (1 - share)), seed=revision),
            arm("treatment", round(users * share), failure=self.failure, seed=100 + revision),
        ]

    def seconds(self) -> float:
        """How long the demo's stream takes to bring the users of every look so far."""
        return sum(self.looks.values()) * LOOK_S

    def close(self) -> None:
        pass


@dataclasses.dataclass
class StillStream:
    model: str = rollout_demo.TODAY_MODEL
    error: Exception | None = None


@pytest.fixture
def fast_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Looks without waits, StepWarehouse's users standing in for the time between them."""
    monkeypatch.setattr(rollout_demo, "LOOK_EVERY_S", 0.0)
    monkeypatch.setattr(rollout_demo, "ROLLOUT_TIMEOUT_S", 5.0)


def roll_out(store: FakeStore, key: str, model: str, warehouse: StepWarehouse, monkeypatch) -> tuple:
    monkeypatch.setattr(rollout_demo, "connect", lambda _url: warehouse)
    lines: list[str] = []
    rollout = rollout_demo._roll_out(Settings(), store, StillStream(), key, model, lines.append)  # type: ignore[arg-type]
    return rollout, lines


def shares(percents: tuple[float, ...]) -> dict[int, float]:
    """Each step's treatment share by revision, as the rollout's decisions number them."""
    return {revision: percent / 100 for revision, percent in enumerate(percents, start=1)}


def test_the_plan_takes_a_no_worse_candidate_to_every_user_on_the_demos_volumes(fast_looks, monkeypatch):
    store, key = FakeStore(), "demo-good"
    warehouse = StepWarehouse(key, shares(rollout_demo.STEPS), failure=0.0)
    good, lines = roll_out(store, key, rollout_demo.GOOD_MODEL, warehouse, monkeypatch)

    assert good.ended == "complete", "\n".join(lines)
    assert warehouse.seconds() <= BUDGET_S
    assert [d.action for d in good.decisions if d.action != "HOLD"] == ["START", "ADVANCE", "COMPLETE"]
    assert any(f"{key}: ADVANCE at step 2/3, 25 % -> 50 %" in line for line in lines), lines
    assert any(f"{key}: COMPLETE at step 3/3, 50 % -> 100 %" in line for line in lines), lines
    figures = rollout_demo._good_figures(good)
    assert re.fullmatch(
        rf"good candidate {rollout_demo.GOOD_MODEL}: complete; 25 % at \d+ s, 50 % at \d+ s, 100 % at \d+ s", figures
    ), figures


def test_the_plan_rolls_back_a_candidate_failing_30_percent_from_its_first_step(fast_looks, monkeypatch):
    store, key = FakeStore(), "demo-bad"
    warehouse = StepWarehouse(key, {1: rollout_demo.STEPS[0] / 100}, rollout_demo.BAD_ENTRY["failure_rate"])
    bad, lines = roll_out(store, key, rollout_demo.BAD_MODEL, warehouse, monkeypatch)

    assert bad.ended == "rolled back", "\n".join(lines)
    assert warehouse.seconds() <= BUDGET_S
    assert (bad.last.percent_before, bad.last.percent_after) == (rollout_demo.STEPS[0], 0)
    assert "failure_rate" in bad.last.reason
    assert store.live[key].weights["treatment"] == 0


def test_a_rollout_without_an_end_in_time_is_aborted_and_its_experiment_stopped(fast_looks, monkeypatch):
    monkeypatch.setattr(rollout_demo, "ROLLOUT_TIMEOUT_S", 0.2)
    store, key = FakeStore(), "demo-quiet"
    quiet, lines = roll_out(store, key, rollout_demo.GOOD_MODEL, StepWarehouse(key, {}, 0.0), monkeypatch)

    assert quiet.ended == "aborted"
    assert "the demo's time ran out" in quiet.last.reason and quiet.last.decided_by == "demo"
    assert store.live[key].stopped
    assert any(f"{key}: ABORT, no end within 0 s" in line for line in lines), lines


def test_the_bad_candidates_figures_count_from_its_first_exposure(fast_looks, monkeypatch):
    store, key = FakeStore(), "demo-bad"
    warehouse = StepWarehouse(key, {1: rollout_demo.STEPS[0] / 100}, rollout_demo.BAD_ENTRY["failure_rate"])
    bad, _ = roll_out(store, key, rollout_demo.BAD_MODEL, warehouse, monkeypatch)
    rollback_at = bad.last.event_time

    def result(n: int, status: str, variant: str, before_s: float) -> ImageResult:
        return ImageResult(
            event_id=f"e{n}",
            request_id=f"r{n}",
            status=status,  # type: ignore[arg-type]
            user_id=f"u{n}",
            model=rollout_demo.BAD_MODEL if variant == "treatment" else rollout_demo.TODAY_MODEL,
            experiments={key: variant},
            request_created_at=rollback_at - dt.timedelta(seconds=before_s),
        )

    results = [
        result(1, "SUCCEEDED", "treatment", 30.0),
        result(2, "FAILED", "treatment", 41.0),  # the first exposure
        result(3, "SUCCEEDED", "control", 50.0),  # control users were there before: not an exposure
        result(4, "SUCCEEDED", "treatment", 2.0),
    ]
    figures = rollout_demo._bad_figures(bad, {r.request_id: r for r in results})
    assert figures.startswith(
        f"bad candidate {rollout_demo.BAD_MODEL}: rolled back 41 s after its first exposure, from 25 %; "
        "3 requests treated, 1 of them failed by design; harm beyond the margin: failure_rate"
    ), figures


def test_the_candidates_registry_keeps_the_tiny_models_and_adds_the_failing_one(tmp_path):
    (tmp_path / "tiny-sd").mkdir()
    tiny = {"tiny-sd": {"path": "tiny-sd", "kind": "stable-diffusion", "default_steps": 4}}
    (tmp_path / "registry.json").write_text(json.dumps(tiny))

    written = rollout_demo._candidates_registry(tmp_path / "registry.json")

    assert written.parent == tmp_path and written != tmp_path / "registry.json"
    registry = ModelRegistry.load(written)
    assert registry.get("tiny-sd").path == str((tmp_path / "tiny-sd").resolve())  # relative paths still resolve
    bad = registry.get(rollout_demo.BAD_MODEL)
    assert (bad.kind, bad.failure_rate, bad.batch_limit(8)) == ("null", 0.3, 1)


class Taken:
    def result(self, timeout: float) -> None:
        pass


class FakePublisher:
    """Takes requests as the broker would, or refuses them once it holds ``refuse_after``."""

    def __init__(self) -> None:
        self.taken: list[ImageRequest] = []
        self.refuse_after: int | None = None

    def __enter__(self) -> FakePublisher:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def publish(self, request: ImageRequest) -> Taken:
        if self.refuse_after is not None and len(self.taken) >= self.refuse_after:
            raise TimeoutError("the broker did not take the request")
        self.taken.append(request)
        return Taken()


@pytest.fixture
def publisher(monkeypatch: pytest.MonkeyPatch) -> FakePublisher:
    fake = FakePublisher()
    monkeypatch.setattr(rollout_demo, "Publisher", lambda _settings: fake)
    monkeypatch.setattr(rollout_demo, "REQUESTS_PER_S", 50.0)
    return fake


def test_the_stream_paces_light_requests_from_new_users_and_follows_the_operators_model(publisher):
    stream = rollout_demo.RequestStream(Settings(), rollout_demo.TODAY_MODEL)
    began = time.monotonic()
    stream.start()
    time.sleep(0.3)
    stream.model = rollout_demo.GOOD_MODEL
    time.sleep(0.3)
    stream.stop()
    elapsed = time.monotonic() - began

    taken = publisher.taken
    assert stream.error is None and [r.request_id for r in taken] == stream.published
    assert 2 <= len(taken) <= elapsed * rollout_demo.REQUESTS_PER_S + 1  # never faster than the rate
    assert len({r.user_id for r in taken}) == len(taken)
    assert {(r.width, r.height, r.steps) for r in taken} == {(16, 16, rollout_demo.RENDER_STEPS)}
    models = [r.model for r in taken]
    assert models[0] == rollout_demo.TODAY_MODEL and models[-1] == rollout_demo.GOOD_MODEL
    assert models == sorted(models, key=lambda m: m == rollout_demo.GOOD_MODEL)  # switched once, never back


def test_the_stream_stops_on_a_refused_request_and_keeps_the_error(publisher):
    publisher.refuse_after = 3
    stream = rollout_demo.RequestStream(Settings(), rollout_demo.TODAY_MODEL)
    stream.start()
    deadline = time.monotonic() + 30
    while stream.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stream.stop()
    assert isinstance(stream.error, TimeoutError) and len(stream.published) == 3


def test_the_demo_refuses_chdb_without_a_clickhouse_server_and_says_what_it_needs(monkeypatch, tmp_path):
    @contextlib.contextmanager
    def kafka_answers(settings: Settings, *_args: object, **_kwargs: object) -> Iterator[Settings]:
        yield settings

    monkeypatch.setattr(rollout_demo, "stack_unless_kafka_answers", kafka_answers)
    monkeypatch.chdir(tmp_path)
    settings = Settings().updated(clickhouse_url=f"chdb://{tmp_path / 'clickhouse'}")
    lines: list[str] = []

    ran = rollout_demo.run_rollout_demo(settings, StackSettings(clickhouse_port=free_port()), lines.append)

    assert not ran
    assert "the rollout demo needs a ClickHouse server" in lines[-1] and "chDB" in lines[-1], lines
    assert "PIXELPIPE_CLICKHOUSE_URL=clickhouse://" in lines[-1]
    assert not (tmp_path / "clickhouse").exists()  # nothing was started or written


def test_a_server_url_is_used_as_it_is():
    url = "clickhouse://default@db.example:9000/default"
    stack = StackSettings(clickhouse_port=free_port())
    assert rollout_demo._clickhouse_server(Settings().updated(clickhouse_url=url), stack) == url
    assert rollout_demo._clickhouse_server(Settings().updated(clickhouse_url="chdb://./x"), stack) is None


@pytest.mark.parametrize("extra", [["--requests", "20"], ["--experiment"]])
def test_rollout_takes_neither_a_request_count_nor_experiment(extra):
    done = CliRunner().invoke(main, ["demo", "--rollout", *extra])
    assert done.exit_code == 2 and "--rollout publishes until both rollouts end" in done.output, done.output
