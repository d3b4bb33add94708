"""`pixelpipe demo --rollout`: two guarded rollouts on the running pipeline, one after the other, with the rollout
controller's rounds in this process: a good candidate (tiny-sd-b, as light as today's tiny-sd) ramped through every
step to all users, then a bad one (a null model that fails 30 % of its calls, in a registry written beside the tiny
models' one) rolled back from its first step. Light requests (16x16, each from a new user) flow throughout; the
ClickHouse sink loads their results as they come, and the controller judges each step from ClickHouse.

Experiments have no targeting: two rollouts at once would both override every request. So the bad candidate starts
once the good one is done and the demo has done the operator's part: the requests name tiny-sd-b themselves, then
the good rollout's experiment is stopped (as `pixelpipe experiments stop KEY` does).

The controller reads ClickHouse while the sink writes it, which an embedded chDB directory (one process at a time)
cannot serve: the demo needs a ClickHouse server, PIXELPIPE_CLICKHOUSE_URL's or else the local stack's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pixelpipe.analytics.rollout_cli import status_lines
from pixelpipe.analytics.rollout_plan import make_plan, parse_guardrails
from pixelpipe.analytics.rollout_store import KafkaRolloutStore
from pixelpipe.analytics.rollouts import Controller, Rollout, person_decides, read_rollouts, start_rollout
from pixelpipe.core.clickhouse import connect
from pixelpipe.core.clock import utc_now
from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageResult
from pixelpipe.core.live_experiments import stopped
from pixelpipe.core.registry import read_registry_json
from pixelpipe.core.settings import Settings, mask_secrets
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.tools.demo import PROMPTS, metrics_ports, prepare_servers
from pixelpipe.tools.model_builders import write_registry
from pixelpipe.tools.processes import PixelpipeProcess, WorkerProcess
from pixelpipe.tools.stack.services import ClickHouse, stack_unless_kafka_answers
from pixelpipe.tools.stack.settings import StackSettings

TODAY_MODEL = "tiny-sd"
GOOD_MODEL = "tiny-sd-b"  # the same architecture, other weights: within every margin
BAD_MODEL = "tiny-sd-broken"
BAD_ENTRY = {"kind": "null", "failure_rate": 0.3, "max_batch": 1}  # a call fails whole: one request a call
# One plan for both candidates, sized for a few minutes on 2 cores: with no failure in either arm, the failure
# rate's interval is within +0.1 at about 40 treated users (160 users at the first step, 100 at the second), and 30 %
# failures breach it from about as many. The latency guardrail is left out: its p95 is the tail, which on a shared
# 2-core machine is the other processes' doing (a few seconds' stall held a no-worse candidate at its first step for
# ten minutes), and its interval needs 77 users per arm. A minority model's batches are smaller, so its cost per
# image swings on a busy CPU: hence the wide cost margin.
STEPS = (25.0, 50.0, 100.0)
MIN_USERS = 20
GUARDRAILS = "failure_rate:+0.1,moderation_rejection_rate:+0.1,cost_per_image:+100%"
REQUESTS_PER_S = 4.0  # what two workers render at 16x16 in 2 steps with room to spare: latencies stay short
SIDE = 16
RENDER_STEPS = 2
WORKERS = 2
LOOK_EVERY_S = 3.0
ROLLOUT_TIMEOUT_S = 300.0  # each rollout takes one to two minutes
RESULTS_TIMEOUT_S = 300.0


class RequestStream:
    """Light text-to-image requests at ``REQUESTS_PER_S``, each from a new user, on a thread until ``stop``;
    ``model`` is the requests' own model, which the operator may change while it runs."""

    def __init__(self, settings: Settings, model: str) -> None:
        self.settings = settings
        self.model = model
        self.published: list[str] = []
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-demo-requests", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        rng = random.Random(13)
        began = time.monotonic()
        try:
            with Publisher(self.settings) as publisher:
                for i in itertools.count():
                    request = new_request(
                        prompt=rng.choice(PROMPTS),
                        model=self.model,
                        user_id=f"rollout-user-{i:06d}",
                        width=SIDE,
                        height=SIDE,
                        steps=RENDER_STEPS,
                        seed=i,
                    )
                    publisher.publish(request).result(timeout=60)
                    self.published.append(request.request_id)
                    if self._stop.wait(max(0.0, began + (i + 1) / REQUESTS_PER_S - time.monotonic())):
                        return
        except Exception as e:  # the main thread reports it: the rollouts would wait for users who never come
            self.error = e


def run_rollout_demo(
    settings: Settings, stack_settings: StackSettings, echo: Callable[[str], None], keep_stack: bool = False
) -> bool:
    """Run the good and the bad candidate's rollouts; True when the good one completed, the bad one was rolled
    back, and every request got its result."""
    began = time.monotonic()
    logs = Path("data") / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    with stack_unless_kafka_answers(settings, stack_settings, echo, keep=keep_stack) as settings:
        server = _clickhouse_server(settings, stack_settings)
        if server is None:
            echo(
                f"the rollout demo needs a ClickHouse server, not {mask_secrets(settings.clickhouse.url)}: the "
                "controller reads ClickHouse while the sink writes it, and chDB opens its directory to one process "
                "at a time. Set PIXELPIPE_CLICKHOUSE_URL=clickhouse://... or start the local stack (pixelpipe stack "
                "up), whose server the demo then uses."
            )
            return False
        echo(f"ClickHouse: {mask_secrets(server)}")
        settings = prepare_servers(settings.updated(clickhouse_url=server), echo)
        no_experiments = logs / "rollout-experiments.json"  # only the rollouts' live experiments assign requests
        no_experiments.write_text(json.dumps({"experiments": []}))
        settings = settings.updated(
            model_registry=str(_candidates_registry(Path(settings.models.registry))),
            experiments_file=str(no_experiments),
            sink_max_batch_wait_ms=500,
        )
        store = KafkaRolloutStore(settings.kafka, settings.topics, codec_from_settings(settings.kafka))
        ports = metrics_ports(settings, stack_settings, WORKERS + 1)
        with contextlib.ExitStack() as running:
            workers = [
                running.enter_context(
                    WorkerProcess(
                        settings,
                        ["moderation", "generate"],
                        logs / f"rollout-worker-{i + 1}.log",
                        {"OMP_NUM_THREADS": "1"} | ports[i],
                    )
                )
                for i in range(WORKERS)
            ]
            sink = running.enter_context(
                PixelpipeProcess(settings, ["clickhouse", "sink"], logs / "rollout-sink.log", ports[-1])
            )
            processes = [*workers, sink]
            echo(f"workers and sink starting; logs: {', '.join(str(p.log_path) for p in processes)}")
            if not _warm(settings, echo):
                echo(_log_tails(processes))
                return False
            stream = RequestStream(settings, TODAY_MODEL)
            stream.start()
            running.callback(stream.stop)
            echo(f"requests flowing: {REQUESTS_PER_S:g} a second, {SIDE}x{SIDE}, each from a new user")
            stamp = utc_now().strftime("%m%d-%H%M%S")
            good = _roll_out(settings, store, stream, f"demo-good-{stamp}", GOOD_MODEL, echo)
            if good.ended == "complete":
                stream.model = GOOD_MODEL
            _stop_experiment(store, good.key)
            echo(
                f"operator: the requests name {stream.model} themselves, and experiment {good.key} is stopped "
                f"(pixelpipe experiments stop {good.key})"
            )
            bad = _roll_out(settings, store, stream, f"demo-bad-{stamp}", BAD_MODEL, echo)
            _stop_experiment(store, bad.key)
            stream.stop()
            echo(f"waiting for the results of the {len(stream.published)} requests published ...")
            results = collect(
                settings.kafka, settings.topics.results, ImageResult, stream.published, timeout_s=RESULTS_TIMEOUT_S
            )
        if stream.error is not None:
            echo(f"publishing stopped: {stream.error!r}")
        echo("")
        if results.missing:
            echo(f"{len(results.missing)} requests got no result\n{_log_tails(processes)}")
        else:
            echo(f"{len(stream.published)} requests, every one with its result")
        echo(_good_figures(good))
        echo(_bad_figures(bad, results.latest()))
        for rollout in (good, bad):
            echo("")
            for line in status_lines(read_rollouts(store)[rollout.key]):
                echo(line)
        echo("")
        echo(f"show a rollout again: pixelpipe rollout status {bad.key} (or {good.key}), while this Kafka runs")
        echo(f"done in {time.monotonic() - began:.0f} s")
        return good.ended == "complete" and bad.ended == "rolled back" and not results.missing


def _clickhouse_server(settings: Settings, stack: StackSettings) -> str | None:
    """The ClickHouse server to use: the settings' when they name one, else the local stack's when it answers."""
    if not settings.clickhouse.url.startswith("chdb://"):
        return settings.clickhouse.url
    local = ClickHouse(stack)
    return local.endpoint if local.probe() else None


def _candidates_registry(registry: Path) -> Path:
    """The tiny models' registry with the bad candidate added, written beside it."""
    path = registry.with_name("rollout-demo-registry.json")
    return write_registry(path, read_registry_json(registry) | {BAD_MODEL: BAD_ENTRY})


def _warm(settings: Settings, echo: Callable[[str], None]) -> bool:
    """One request for today's model and one for the good candidate through the pipeline: every process is up and
    has its models loaded before the first step begins."""
    warm = [
        new_request(prompt=PROMPTS[0], model=m, user_id="warm", width=SIDE, height=SIDE, steps=RENDER_STEPS)
        for m in (TODAY_MODEL, GOOD_MODEL)
    ]
    with Publisher(settings) as publisher:
        for request in warm:
            publisher.publish(request).result(timeout=60)
    done = collect(settings.kafka, settings.topics.results, ImageResult, [r.request_id for r in warm], timeout_s=300)
    if done.missing:
        echo("the pipeline did not answer within 300 s")
    return not done.missing


def _roll_out(
    settings: Settings,
    store: KafkaRolloutStore,
    stream: RequestStream,
    key: str,
    model: str,
    echo: Callable[[str], None],
) -> Rollout:
    """Start rolling ``model`` out under ``key`` and run the controller's rounds until the rollout ends (or
    ROLLOUT_TIMEOUT_S passes), with a line for each decision; the rollout as it stands then."""
    started = time.monotonic()

    def progress(line: str) -> None:
        echo(f"  [{time.monotonic() - started:4.0f} s] {line}")

    plan = make_plan({"model": model}, stream.model, STEPS, MIN_USERS, guardrails=parse_guardrails(GUARDRAILS))
    echo(f"rolling out {model} under {key} ...")
    rollout = start_rollout(store, key, plan, "demo", progress)
    controller = Controller(store, lambda: connect(settings.clickhouse.url), "rollout-controller:demo", progress)
    while rollout.ended is None and time.monotonic() - started < ROLLOUT_TIMEOUT_S and stream.error is None:
        time.sleep(LOOK_EVERY_S)
        controller.round()
        rollout = read_rollouts(store)[key]
    if rollout.ended is None:
        why = f"no end within {ROLLOUT_TIMEOUT_S:.0f} s: the demo's time ran out"
        rollout = person_decides(store, key, "ABORT", why, "demo", progress)
        progress(f"{key}: ABORT, {why}")
    return rollout


def _stop_experiment(store: KafkaRolloutStore, key: str) -> None:
    """Stop assigning the ended rollout's experiment, so that the next rollout's is the only one in force."""
    store.publish_experiment(stopped(store.experiments()[key]), applied_by="demo")


def _good_figures(good: Rollout) -> str:
    """Each step the good candidate reached and when, from its START."""
    start = good.decisions[0].event_time
    moves = [d for d in good.decisions if d.action in ("START", "ADVANCE", "COMPLETE")]
    steps = ", ".join(f"{d.percent_after:g} % at {(d.event_time - start).total_seconds():.0f} s" for d in moves)
    return f"good candidate {GOOD_MODEL}: {good.state}; {steps}"


def _bad_figures(bad: Rollout, results: dict[str, ImageResult]) -> str:
    """How soon after its first exposure the bad candidate was rolled back, and what became of its requests."""
    treated = [r for r in results.values() if r.experiments.get(bad.key) == "treatment"]
    failed = sum(r.status == "FAILED" for r in treated)
    outcome = f"{len(treated)} requests treated, {failed} of them failed by design"
    exposures = [r.request_created_at for r in treated if r.request_created_at is not None]
    if bad.ended != "rolled back" or not exposures:
        return f"bad candidate {BAD_MODEL}: {bad.state}; {outcome}"
    seconds = (bad.last.event_time - min(exposures)).total_seconds()
    return (
        f"bad candidate {BAD_MODEL}: rolled back {seconds:.0f} s after its first exposure, from "
        f"{bad.last.percent_before:g} %; {outcome}; {bad.last.reason}"
    )


def _log_tails(processes: list[PixelpipeProcess]) -> str:
    return "\n".join(f"--- {p.log_path}\n{p.log_tail(15)}" for p in processes)
