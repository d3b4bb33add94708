"""Guarded rollouts on the real servers: a moderation and a render worker on null models, the ClickHouse sink and the
rollout controller (`pixelpipe rollout run`) as processes, ten requests a second from new users. A candidate that
fails a fifth of its requests is rolled back from its first step, within three minutes of its first exposure, and
the requests it was given before still get their results; a candidate no different from today's model goes through
every step to 100 % with no roll-back, while its controller is killed mid-step and started again without skipping
or repeating a step."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pixelpipe.analytics.rollout_plan import make_plan, parse_guardrails
from pixelpipe.analytics.rollout_store import KafkaRolloutStore
from pixelpipe.analytics.rollouts import Rollout, read_rollouts, start_rollout
from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageResult
from pixelpipe.core.settings import Settings
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.sinks.clickhouse.migrate import migrate
from pixelpipe.tools.processes import PixelpipeProcess, WorkerProcess

pytestmark = pytest.mark.integration
WAIT_S = 240.0
ROLLBACK_WITHIN_S = 180.0  # the promise: a grossly harmful candidate is rolled back within 3 minutes of exposure
REQUESTS_PER_S = 10.0
LOOK_EVERY_S = 2.0


class Drill:
    """One test's pipeline: workers, the sink, the controller and a stream of requests for today's model."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.tmp_path = tmp_path
        self.store = KafkaRolloutStore(settings.kafka, settings.topics, codec_from_settings(settings.kafka))
        self.processes: list[PixelpipeProcess] = []
        self.published: list[str] = []
        self._stop = threading.Event()
        self._stream: threading.Thread | None = None

    def start(self, name: str, args: list[str]) -> PixelpipeProcess:
        process = PixelpipeProcess(self.settings.updated(worker_id=name), args, self.tmp_path / f"{name}.log")
        self.processes.append(process)
        return process

    def start_pipeline(self) -> None:
        for stages in (["moderation"], ["generate"]):
            self.processes.append(
                WorkerProcess(self.settings.updated(worker_id=stages[0]), stages, self.tmp_path / f"{stages[0]}.log")
            )
        self.start("sink", ["clickhouse", "sink"])
        warm = new_request(prompt="a fox", model="today", user_id="warm", width=16, height=16, steps=2)
        with Publisher(self.settings) as publisher:
            publisher.publish(warm).result(timeout=60)
        flowing = collect(
            self.settings.kafka, self.settings.topics.results, ImageResult, [warm.request_id], timeout_s=WAIT_S
        )
        assert not flowing.missing, self.logs()

    def start_controller(self, name: str = "controller") -> PixelpipeProcess:
        return self.start(name, ["rollout", "run", "--interval", str(LOOK_EVERY_S)])

    def stream(self) -> None:
        """Requests for today's model, each from a new user, at REQUESTS_PER_S until ``stop_stream``."""

        def run() -> None:
            with Publisher(self.settings) as publisher:
                i = 0
                while not self._stop.is_set():
                    r = new_request(
                        prompt="a lighthouse", model="today", user_id=f"user-{i}", width=16, height=16, steps=2, seed=i
                    )
                    publisher.publish(r).result(timeout=60)
                    self.published.append(r.request_id)
                    i += 1
                    time.sleep(1 / REQUESTS_PER_S)

        self._stream = threading.Thread(target=run, daemon=True)
        self._stream.start()

    def stop_stream(self) -> dict[str, ImageResult]:
        """Stop publishing; every request's result."""
        self._stop.set()
        assert self._stream is not None
        self._stream.join(60)
        results = collect(
            self.settings.kafka, self.settings.topics.results, ImageResult, self.published, timeout_s=WAIT_S
        )
        assert not results.missing, f"{len(results.missing)} requests without a result\n{self.logs()}"
        return results.latest()

    def start_rollout(self, key: str, model: str, steps: list[float], guardrails: str | None = None) -> None:
        limits = None if guardrails is None else parse_guardrails(guardrails)
        plan = make_plan({"model": model}, "today", steps, min_users=20, guardrails=limits)
        start_rollout(self.store, key, plan, "cli:test", lambda _: None)

    def wait_for(self, key: str, done: Callable[[Rollout], bool], timeout_s: float) -> Rollout:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rollout = read_rollouts(self.store)[key]
            if done(rollout):
                return rollout
            time.sleep(1.0)
        shown = "\n".join(
            f"{d.action} {d.percent_after:g} % {d.reason}" for d in read_rollouts(self.store)[key].decisions
        )
        raise AssertionError(f"rollout {key} did not get there within {timeout_s:.0f} s:\n{shown}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log_tail(15)}" for p in self.processes)

    def close(self) -> None:
        self._stop.set()
        for process in self.processes:
            process.kill()


@pytest.fixture
def drill(topic_settings: Settings, clickhouse_url: str, tmp_path: Path) -> Iterator[Drill]:
    registry = tmp_path / "registry.json"
    models = {
        "today": {"kind": "null", "seconds_per_image": 0.01},
        "same": {"kind": "null", "seconds_per_image": 0.01},  # a harmless candidate
        "bad": {"kind": "null", "seconds_per_image": 0.01, "failure_rate": 0.2},
    }
    registry.write_text(json.dumps(models))
    suffix = uuid.uuid4().hex[:8]
    settings = topic_settings.updated(
        model_registry=str(registry),
        experiments_file=str(tmp_path / "none.json"),
        consumer_group=f"rollouts-{suffix}",
        sink_group_id=f"rollouts-sink-{suffix}",
        sink_max_batch_wait_ms=300,
        clickhouse_url=clickhouse_url,
        object_store_url=f"file://{tmp_path / 'objects'}",
        image_detector="null",
        topic_partitions=2,
        max_batch=1,  # the null model fails a whole call: one request a call, so failures are per request
        max_wait_ms=20,
        log_level="INFO",
    )
    ensure_topics(settings.kafka, settings.topics)
    migrate(clickhouse_url)
    pipeline = Drill(settings, tmp_path)
    try:
        yield pipeline
    finally:
        pipeline.close()


def test_a_failing_candidate_is_rolled_back_within_three_minutes_and_its_requests_still_get_results(drill):
    drill.start_pipeline()
    drill.stream()
    drill.start_rollout("bad-candidate", "bad", [10, 50, 100])
    drill.start_controller()
    rollout = drill.wait_for("bad-candidate", lambda r: r.ended is not None, WAIT_S)
    time.sleep(5.0)  # requests assigned after the roll-back too
    results = drill.stop_stream()

    rollback = rollout.last
    assert (rollback.action, rollback.percent_before, rollback.percent_after) == ("ROLLBACK", 10, 0), rollback.reason
    assert "failure_rate" in rollback.reason
    assert [d.action for d in rollout.decisions if d.action != "HOLD"] == ["START", "ROLLBACK"]
    treated = [r for r in results.values() if r.experiments.get("bad-candidate") == "treatment"]
    first_exposure = min(r.request_created_at for r in treated)
    seconds = (rollback.event_time - first_exposure).total_seconds()
    figures = rollback.figures
    print(
        f"\nroll-back {seconds:.1f} s after the first exposure, on {figures['failure_rate.n_treatment']:.0f} "
        f"treatment users (failure rate {figures['failure_rate.treatment']:.3f} against "
        f"{figures['failure_rate.control']:.3f}); {len(treated)} requests treated"
    )
    assert seconds < ROLLBACK_WITHIN_S
    # Every treated request got its result (stop_stream checked), rendered by the candidate: its images, or its
    # failures by design.
    succeeded = [r for r in treated if r.status == "SUCCEEDED"]
    failed = [r for r in treated if r.status == "FAILED"]
    assert succeeded and failed and len(succeeded) + len(failed) == len(treated)
    assert {r.model for r in succeeded} == {"bad"}
    assert all("model 'bad' failed by design" in (r.error_message or "") for r in failed), failed[0].error_message
    # Assigned after the roll-back: control, under the revision with the treatment at 0 %.
    after = [r for r in results.values() if r.experiment_revisions.get("bad-candidate") == rollback.revision_after]
    assert after and {r.experiments["bad-candidate"] for r in after} == {"control"}
    assert {r.model for r in after} == {"today"}
    experiment = drill.store.experiments()["bad-candidate"]
    assert experiment.revision == rollback.revision_after and experiment.weights["treatment"] == 0


def test_a_harmless_candidate_reaches_every_user_through_a_controller_killed_and_restarted_mid_step(drill):
    drill.start_pipeline()
    drill.stream()
    began = time.monotonic()
    loose = "failure_rate:+0.1,moderation_rejection_rate:+0.1,latency_p95:+100%,cost_per_image:+50%"
    drill.start_rollout("same-candidate", "same", [20, 50, 100], loose)
    controller = drill.start_controller()
    drill.wait_for("same-candidate", lambda r: r.step == 1, WAIT_S)
    controller.kill()  # mid-step: the 50 % step is under way
    drill.start_controller("controller-restarted")
    rollout = drill.wait_for("same-candidate", lambda r: r.ended is not None, WAIT_S)
    print(f"\nharmless candidate: 20 -> 50 -> 100 % in {time.monotonic() - began:.0f} s, controller killed at 50 %")
    drill.stop_stream()

    changes = [d for d in rollout.decisions if d.action != "HOLD"]
    assert [(d.action, d.step, d.percent_after) for d in changes] == [
        ("START", 0, 20),
        ("ADVANCE", 1, 50),
        ("COMPLETE", 2, 100),
    ]
    assert [d.sequence for d in rollout.decisions] == list(range(1, len(rollout.decisions) + 1))
    assert [d.revision_after for d in changes] == [1, 2, 3]
    # Each allocation published once: the experiment's revision counts the changes. The controller publishes a
    # decision before its allocation, so the last one may still be on its way.
    deadline = time.monotonic() + 30
    while (experiment := drill.store.experiments()["same-candidate"]).revision < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert experiment.revision == 3 and experiment.weights == {"control": 0, "treatment": 100}
    assert not experiment.stopped
