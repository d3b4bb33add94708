"""How soon an experiment's new allocation is in force on every running moderation worker.

    python benchmarks/allocation_latency.py [--changes 30] [--workers 2] [--rate 100]

Runs on the local stack (started when no Kafka answers at PIXELPIPE_KAFKA_BOOTSTRAP, stopped afterwards) with fresh
topics. ``--workers`` moderation workers (`pixelpipe worker --stages moderation`) share the requests topic's
partitions while requests of many users arrive at ``--rate`` per second; meanwhile an experiment is published
``--changes`` times, a second apart (its treatment's share stepping 5, 10, 15, ... %: each a new revision), with
`publish_experiments`, as `pixelpipe experiments apply` does. Moderation stamps every request with the revision it was
assigned under, on its MODERATION metric with the worker's id and the moment it was moderated.

For each change published at t (its definition's event_time, set just before it was sent) and each worker: the
seconds from t to the first request that worker moderated under the new revision or a later one, an upper bound of
when the change was in force there (requests reach each worker every few tens of milliseconds). Printed: p50, p99
and the largest over all changes and workers, once the workers have caught up with the backlog of their start. The
promise: in force on every worker by t + 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

from pipeline import delete_own_topics, quantile, with_own_topics  # benchmarks/pipeline.py, beside this script

from pixelpipe.core.codec import Codec, codec_from_settings
from pixelpipe.core.events import ExperimentDefinition, StageMetric
from pixelpipe.core.experiments import Experiment, parse_experiments
from pixelpipe.core.live_experiments import publish_experiments
from pixelpipe.core.settings import Settings, section_from_env
from pixelpipe.core.topics import assign_from_start, assigned_consumer, ensure_topics
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.tools.processes import WorkerProcess
from pixelpipe.tools.stack import StackSettings, stack_unless_kafka_answers

KEY = "allocation-latency"


def experiment(percent: float) -> dict[str, Experiment]:
    return parse_experiments(
        {
            "experiments": [
                {
                    "key": KEY,
                    "start": "2026-01-01",
                    "variants": [
                        {"name": "control", "weight": 100 - percent},
                        {"name": "treatment", "weight": percent},
                    ],
                }
            ]
        }
    )


def wait_until_caught_up(settings: Settings, sent: list[str], workers: list[WorkerProcess]) -> None:
    """Until the workers moderate a request within a second of its publication: the backlog of their start is gone,
    so each change meets workers at their steady pace."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(1.0)
        probe, published = sent[-1], time.time()
        found = collect(settings.kafka, settings.topics.metrics, StageMetric, [probe], timeout_s=60)
        if found.missing:
            continue
        if found.latest()[probe].event_time.timestamp() - published < 1.0:
            return
    raise SystemExit("the moderation workers did not catch up:\n" + workers[0].log_tail())


def published_at(settings: Settings, codec: Codec) -> dict[int, float]:
    """When each revision was sent: its definition's event_time, set just before it was produced."""
    consumer = assigned_consumer(settings.kafka)
    assign_from_start(consumer, settings.topics.experiments)
    (end,) = [consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in consumer.assignment()]
    sent: dict[int, float] = {}
    read = 0
    while read < end:
        for message in consumer.consume(500, timeout=1.0):
            if not message.error():
                read += 1
                definition = codec.decode_as(ExperimentDefinition, message.value())
                sent[definition.revision] = definition.event_time.timestamp()
    consumer.close()
    return {revision: at for revision, at in sent.items() if revision > 1}  # the first is the 0 % start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    args = parser.parse_args()
    suffix = uuid.uuid4().hex[:8]
    folder = Path(tempfile.mkdtemp(prefix="allocation-latency-"))
    registry = folder / "registry.json"
    registry.write_text(json.dumps({"null": {"kind": "null"}}))
    with stack_unless_kafka_answers(Settings.from_env(), section_from_env(StackSettings, os.environ), print) as base:
        settings = with_own_topics(base, suffix).updated(
            model_registry=str(registry),
            experiments_file=str(folder / "none.json"),
            object_store_url=f"file://{folder / 'objects'}",
            topic_partitions=max(4, args.workers),
            log_level="WARNING",
        )
        ensure_topics(settings.kafka, settings.topics)
        codec = codec_from_settings(settings.kafka)
        publish_experiments(settings.kafka, settings.topics, codec, experiment(0.0))
        workers = [
            WorkerProcess(settings.updated(worker_id=f"moderation-{i}"), ["moderation"], folder / f"m{i}.log")
            for i in range(args.workers)
        ]
        sent: list[str] = []
        stop = threading.Event()

        def stream() -> None:
            with Publisher(settings) as publisher:
                while not stop.is_set():
                    r = new_request(prompt="a fox", model="null", user_id=f"u{len(sent)}", width=16, height=16)
                    publisher.publish(r)
                    sent.append(r.request_id)
                    time.sleep(1 / args.rate)

        try:
            print(f"starting {args.workers} moderation worker(s); requests at {args.rate:g}/s")
            streaming = threading.Thread(target=stream, daemon=True)
            streaming.start()
            wait_until_caught_up(settings, sent, workers)
            for n in range(1, args.changes + 1):
                time.sleep(1.0)
                publish_experiments(settings.kafka, settings.topics, codec, experiment(min(5.0 * n, 100.0)))
                print(f"\rchange {n}/{args.changes} published", end="", flush=True)
            time.sleep(6.0)
            stop.set()
            streaming.join(30)
            print(f"\nreading the MODERATION metrics of {len(sent)} requests")
            metrics = collect(settings.kafka, settings.topics.metrics, StageMetric, sent, timeout_s=300)
            changes = published_at(settings, codec)
        finally:
            stop.set()
            for worker in workers:
                worker.kill()
            delete_own_topics(settings, suffix)
    moderated = [m for events in metrics.events.values() for m in events if m.stage == "MODERATION"]
    lags = []
    for revision, changed_at in changes.items():
        for worker in {m.worker_id for m in moderated}:
            under = [
                m.event_time.timestamp()
                for m in moderated
                if m.worker_id == worker
                and m.experiment_revisions.get(KEY, 0) >= revision
                and m.event_time.timestamp() >= changed_at
            ]
            if under:
                lags.append(min(under) - changed_at)
    if not lags:
        raise SystemExit("no request was moderated after a change")
    print(
        f"{len(lags)} (change, worker) pairs over {len({m.worker_id for m in moderated})} workers: in force after "
        f"p50 {quantile(lags, 0.5):.3f} s, p99 {quantile(lags, 0.99):.3f} s, max {max(lags):.3f} s (promise: 5 s)"
    )


if __name__ == "__main__":
    main()
