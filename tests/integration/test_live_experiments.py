"""Experiments as live configuration on the real servers: a moderation worker and a render worker (null models)
running while an experiment is published and ramped. Each change is in force within seconds without a restart
(the allocation on moderation, the variant's overrides on the render stage), a user treated at a small share stays
treated at a larger one, and every result records the variant it ran with and the revision it was assigned under.
"""

import json
import threading
import time
import uuid

import pytest

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageResult, StageMetric
from pixelpipe.core.experiments import parse_experiments
from pixelpipe.core.live_experiments import publish_experiments, read_experiments
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.tools.processes import WorkerProcess

pytestmark = pytest.mark.integration
WAIT_S = 240.0
IN_FORCE_WITHIN_S = 5.0  # the promise: a change published at t is applied by every worker by t + 5 s


def candidate(percent: float):
    return parse_experiments(
        {
            "experiments": [
                {
                    "key": "candidate",
                    "start": "2026-01-01",
                    "variants": [
                        {"name": "control", "weight": 100 - percent},
                        {"name": "treatment", "weight": percent, "overrides": {"model": "new", "steps": 3}},
                    ],
                }
            ]
        }
    )


def test_a_ramp_applies_on_running_workers_within_seconds_and_results_record_the_allocation(topic_settings, tmp_path):
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({name: {"kind": "null", "seconds_per_image": 0.01} for name in ("old", "new")}))
    settings = topic_settings.updated(
        model_registry=str(registry),
        experiments_file=str(tmp_path / "none.json"),
        consumer_group=f"live-{uuid.uuid4().hex[:8]}",
        object_store_url=f"file://{tmp_path / 'objects'}",
        image_detector="null",
        topic_partitions=2,
        max_wait_ms=20,
    )
    ensure_topics(settings.kafka, settings.topics)
    codec = codec_from_settings(settings.kafka)
    workers = [
        WorkerProcess(settings.updated(worker_id=stages[0]), stages, tmp_path / f"{stages[0]}.log")
        for stages in (["moderation"], ["generate"])
    ]
    published: dict[str, float] = {}
    stop = threading.Event()

    def stream():  # 40 users, over and over, 20 requests a second
        with Publisher(settings) as publisher:
            i = 0
            while not stop.is_set():
                r = new_request(prompt="a fox", model="old", user_id=f"user-{i % 40}", width=16, height=16, steps=2)
                publisher.publish(r).result(timeout=60)
                published[r.request_id] = time.time()
                i += 1
                time.sleep(0.05)

    try:
        warm = new_request(prompt="a fox", model="old", user_id="warm", width=16, height=16, steps=2)
        with Publisher(settings) as publisher:
            publisher.publish(warm).result(timeout=60)
        flowing = collect(settings.kafka, settings.topics.results, ImageResult, [warm.request_id], timeout_s=WAIT_S)
        assert not flowing.missing, "\n".join(w.log_tail() for w in workers)
        streaming = threading.Thread(target=stream, daemon=True)
        streaming.start()
        changes = {}
        for revision, percent in enumerate((10, 50), start=1):
            time.sleep(3.0)
            publish_experiments(settings.kafka, settings.topics, codec, candidate(percent))
            changes[revision] = time.time()
        time.sleep(IN_FORCE_WITHIN_S + 2.0)
        stop.set()
        streaming.join(60)
        assert read_experiments(settings.kafka, settings.topics, codec)["candidate"].revision == 2
        results = collect(settings.kafka, settings.topics.results, ImageResult, list(published), timeout_s=WAIT_S)
        assert not results.missing, "\n".join(w.log_tail() for w in workers)
        metrics = collect(
            settings.kafka, settings.topics.metrics, StageMetric, dict.fromkeys(published, 3), timeout_s=WAIT_S
        )
    finally:
        for worker in workers:
            worker.kill()

    moderated_at = {
        m.request_id: m.event_time.timestamp()
        for events in metrics.events.values()
        for m in events
        if m.stage == "MODERATION"
    }
    latest = results.latest()
    # Moderated after a change's t + 5 s: assigned under that revision or a later one.
    for revision, changed_at in changes.items():
        late = [rid for rid, at in moderated_at.items() if at > changed_at + IN_FORCE_WITHIN_S]
        assert late and all(latest[rid].experiment_revisions.get("candidate", 0) >= revision for rid in late)
        stale = [
            at - changed_at
            for rid, at in moderated_at.items()
            if latest[rid].experiment_revisions.get("candidate", 0) < revision and at > changed_at
        ]
        print(f"\nrevision {revision}: last request assigned under an older one, {max(stale, default=0):.2f} s after")
    # Each result ran what its arm says, and a user treated at 10 % was treated at 50 % too.
    treated: dict[int, set[str]] = {1: set(), 2: set()}
    for result in latest.values():
        arm = result.experiments.get("candidate")
        revision = result.experiment_revisions.get("candidate")
        assert result.status == "SUCCEEDED"
        assert result.model == ("new" if arm == "treatment" else "old")
        assert (result.steps == 3) == (arm == "treatment")
        if arm == "treatment":
            treated[revision].add(result.user_id)
    assert treated[1] and treated[1] <= treated[2]
