"""The ops server's endpoints, liveness and readiness, the stages' observations and a `pixelpipe top` frame, with
no servers."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from rich.console import Console

from pixelpipe.core.pools import DEFAULT_POOL, pool_topics, topic_pool
from pixelpipe.core.settings import TopicSettings
from pixelpipe.core.telemetry import Health, OpsServer, reason_label
from pixelpipe.processors.outcomes import Outcome, StageWork
from pixelpipe.processors.telemetry import StageTelemetry
from pixelpipe.tools.top import Frame, render


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def server():
    health = Health(0.3, ["models", "partitions"])
    served = OpsServer("127.0.0.1", 0, health)
    yield served, health
    served.close()


def test_ready_only_once_every_check_is_done_and_not_live_once_the_loop_stops_beating(server):
    served, health = server
    assert get(served.port, "/healthz")[0] == 200  # models loading: no loop yet, live
    status, body = get(served.port, "/readyz")
    assert status == 503 and "models, partitions" in body
    health.mark("models")
    health.beat()
    assert get(served.port, "/readyz") == (503, "waiting for: partitions\n")
    health.mark("partitions")
    assert get(served.port, "/readyz")[0] == 200
    time.sleep(0.4)  # the loop blocked beyond the bound
    status, body = get(served.port, "/healthz")
    assert status == 503 and "loop blocked" in body
    assert get(served.port, "/readyz")[0] == 503
    health.beat()
    assert get(served.port, "/healthz")[0] == 200


def test_metrics_are_served_in_the_text_format(server):
    served, _ = server
    status, body = get(served.port, "/metrics")
    assert status == 200
    assert "# TYPE pixelpipe_consumer_lag_messages gauge" in body
    assert get(served.port, "/nothing")[0] == 404


def test_a_taken_port_is_a_sharp_error(server):
    served, health = server
    with pytest.raises(OSError, match="PIXELPIPE_METRICS_PORT"):
        OpsServer("127.0.0.1", served.port, health)


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("undecodable: not Avro (magic b'\\x00n')", "undecodable"),
        ("unmoderated: no valid moderation stamp", "unmoderated"),
        ("internal error: RuntimeError('x')", "internal_error"),
        ("request abc-123 failed: x", "other"),  # ids or digits before the colon: never a label
    ],
)
def test_dead_letter_reasons_become_bounded_labels(reason, label):
    assert reason_label(reason) == label


def test_stage_telemetry_counts_only_when_enabled():
    telemetry = StageTelemetry()
    registry = CollectorRegistry()
    registry.register(telemetry)

    def sample(name: str, labels: dict[str, str]) -> float:
        return (REGISTRY if name.startswith("pixelpipe_dead") else registry).get_sample_value(name, labels) or 0.0

    work = StageWork("GENERATE", "OK", 250.0, 1500.0, "cpu", 1.5, 4)
    generate = {"stage": "generate", "pool": "sd"}
    before = sample("pixelpipe_stage_queue_seconds_count", generate)
    telemetry.work(work, 0.001, pool="sd")
    assert sample("pixelpipe_stage_queue_seconds_count", generate) == before
    telemetry.enable()
    telemetry.work(work, 0.001, pool="sd")
    telemetry.work(work, 0.001, pool="sd")
    assert sample("pixelpipe_stage_queue_seconds_count", generate) == before + 2
    assert sample("pixelpipe_stage_batch_size_bucket", generate | {"le": "4.0"}) >= 2
    rejected = Outcome.rejected("PROMPT", {"violence": 0.9}, ["violence"])
    violence = {"check": "prompt", "category": "violence", "pool": ""}  # ended at moderation: no pool
    before = sample("pixelpipe_moderation_rejections_total", violence)
    telemetry.result(rejected, "GENERATE", pool=None)
    assert sample("pixelpipe_moderation_rejections_total", violence) == before + 1
    stopped = StageWork("GENERATE", "CANCELLED", 10.0, 400.0, "cpu", 0.4, 1, 1.6)
    telemetry.work(stopped, 0.0, pool="sd")
    telemetry.work(StageWork("GENERATE", "CANCELLED", 10.0, 0.0, "none", 0.0), 0.0, pool="sd")  # queued: unknown
    assert sample("pixelpipe_stage_device_seconds_saved_total", generate) == 1.6
    assert registry.get_sample_value("pixelpipe_stage_device_seconds_saved_total", {"stage": "moderation"}) is None
    assert sample("pixelpipe_stage_events_out_total", generate | {"outcome": "CANCELLED"}) == 2
    before = sample("pixelpipe_dead_letters_total", {"stage": "moderation", "reason": "undecodable"})
    telemetry.dead_letter("moderation", "undecodable: bad bytes")
    assert sample("pixelpipe_dead_letters_total", {"stage": "moderation", "reason": "undecodable"}) == before + 1


def test_each_pool_has_its_own_stage_series_and_no_pool_is_an_empty_label():
    telemetry = StageTelemetry()
    registry = CollectorRegistry()
    registry.register(telemetry)
    telemetry.enable()
    render = StageWork("GENERATE", "OK", 100.0, 2000.0, "cuda:0", 2.0, 2)
    telemetry.work(render, 0.002, pool="sd")
    telemetry.work(render, 0.002, pool="sd")
    telemetry.work(render, 0.002, pool="flux")
    moderated = StageWork("MODERATION", "OK", 5.0, 10.0, "cpu", 0.01, 8)
    telemetry.work(moderated, 0.0, pool="flux")  # routed to flux
    telemetry.work(StageWork("MODERATION", "REJECTED", 5.0, 10.0, "cpu", 0.01, 8), 0.0, pool=None)  # ended there

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("pixelpipe_stage_device_seconds_total", stage="generate", pool="sd", device="cuda:0") == 4.0
    assert value("pixelpipe_stage_device_seconds_total", stage="generate", pool="flux", device="cuda:0") == 2.0
    assert value("pixelpipe_stage_cost_usd_total", stage="generate", pool="sd") == 0.004
    assert value("pixelpipe_stage_compute_seconds_count", stage="generate", pool="flux") == 1
    assert value("pixelpipe_stage_events_out_total", stage="moderation", pool="flux", outcome="OK") == 1
    assert value("pixelpipe_stage_events_out_total", stage="moderation", pool="", outcome="REJECTED") == 1
    assert value("pixelpipe_stage_events_out_total", stage="moderation", pool="", outcome="OK") is None


def test_a_render_topics_lag_is_labelled_with_its_pool():
    topics = TopicSettings()
    assert topic_pool(topics, "pixelpipe.generate") == topic_pool(topics, "pixelpipe.edit.long") == DEFAULT_POOL
    assert topic_pool(topics, "pixelpipe.generate.tiny-sd") == "tiny-sd"
    assert topic_pool(topics, "pixelpipe.edit.tiny-sd.long") == "tiny-sd"
    for topic in ("pixelpipe.requests", "pixelpipe.results", "pixelpipe.generate.Not_A_Pool", "pixelpipe.generate.a.b"):
        assert topic_pool(topics, topic) is None, topic
    for pool in ("tiny-sd", "x"):
        assert {topic_pool(topics, topic) for topic in pool_topics(topics, pool).render()} == {pool}


def test_a_top_frame_shows_lag_stages_and_dead_letters():
    frame = Frame(
        lag={
            ("pixelpipe-moderation", "pixelpipe.requests", ""): {"messages": 12.0, "oldest_s": 3.5},
            ("pixelpipe-generate-edit-flux", "pixelpipe.generate.flux", "flux"): {"messages": 0.0},
        },
        stages={
            ("generate", "tiny-sd"): {"in_per_s": 4.0, "out_per_s": 4.0, "queue_p95_s": 0.2, "batch_mean": 3.5},
            ("generate", "flux"): {"in_per_s": 1.0, "busy": 0.93},
            ("moderation", ""): {"in_per_s": 40.0, "out_per_s": 39.0, "failed_share": 0.025},
            ("edit", "flux"): {"out_per_s": 2.0, "cancelled_share": 0.125, "saved_per_s": 0.75},
            ("output_moderation", "tiny-sd"): {"out_per_s": 4.0},
        },
        totals={"targets_up": 2.0, "targets": 2.0, "images_per_s": 4.0, "results_per_s": 4.0},
        dead_letters={("moderation", "undecodable"): 0.5},
        at=time.time(),
    )
    console = Console(width=140, record=True)
    console.print(render(frame, "http://127.0.0.1:9090"))
    text = console.export_text()
    assert "targets up 2/2" in text
    assert "pixelpipe.requests" in text and "3,500 ms" in text
    lag, stages = text.split("stages (last", 1)[0], text.split("stages (last", 1)[1].split("dead letters", 1)[0]

    def cells(table: str, count: int) -> list[list[str]]:
        return [[c.strip() for c in line.split("│")[1 : count + 1]] for line in table.splitlines() if "│" in line]

    assert ["pixelpipe-generate-edit-flux", "pixelpipe.generate.flux", "flux"] in cells(lag, 3)
    # stages in pipeline order, each stage's pools by name; moderation's intake is of no pool
    assert cells(stages, 2) == [
        ["moderation", ""],
        ["generate", "flux"],
        ["generate", "tiny-sd"],
        ["edit", "flux"],
        ["output_moderation", "tiny-sd"],
    ]
    narrow = Console(width=110, record=True)  # the operations test's width: stage names stay whole
    narrow.print(render(frame, "http://127.0.0.1:9090"))
    assert "output_moderation" in narrow.export_text()
    assert "93 %" in text and "2.5 %" in text and "undecodable" in text
    assert "12.5 %" in text and "0.75 s/s" in text  # cancelled share, device seconds saved per second
