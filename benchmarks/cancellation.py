"""Cancellations honoured by a running worker, and their latency from ``cancel`` to the CANCELLED result.

    python benchmarks/cancellation.py [--requests 40] [--cancel 20] [--steps 40]

Runs on the local stack (started when no Kafka answers at PIXELPIPE_KAFKA_BOOTSTRAP, stopped afterwards) with the
tiny models, one `pixelpipe worker --stages moderation,generate` on topics of the run's own. A backlog of
``--requests`` text-to-image requests (64x64, ``--steps`` steps, one user each so no rate limit refuses them) is
published; once the first result is in, the last ``--cancel`` of them, still queued, are cancelled one by one with
the SDK (``Publisher.publish_cancellation``), each timed from the moment the broker acknowledged it. Printed: how
many ended CANCELLED, how many of those before their render (0 device seconds, by their metrics) and how many in a
batch shared with requests not cancelled (rendered with them, images discarded), and the latency from each
cancellation to its CANCELLED result's arrival here (p50, p95, max). That latency is mostly the chunk rendering when
the cancellation lands: the worker looks cancellations up when it plans a take, before each chunk's model call and
at each denoising step (which stops a chunk whose requests are all cancelled).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from pipeline import PIPELINE_TOPICS, ResultWatcher  # benchmarks/pipeline.py, beside this script

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ImageResult, StageMetric
from pixelpipe.core.settings import Settings, section_from_env
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.tools.model_builders import build_tiny_models
from pixelpipe.tools.processes import WorkerProcess
from pixelpipe.tools.stack import StackSettings, stack_unless_kafka_answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--cancel", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if not 0 < args.cancel < args.requests:
        raise SystemExit("--cancel must be between 1 and --requests - 1")
    workdir = Path(tempfile.mkdtemp(prefix="bench-cancel-"))
    base = Settings.from_env()
    with stack_unless_kafka_answers(base, section_from_env(StackSettings, os.environ), print) as base:
        suffix = uuid.uuid4().hex[:8]
        settings = base.updated(
            **{f"topic_{name}": f"bench.{name}.{suffix}" for name in PIPELINE_TOPICS},
            consumer_group=f"bench-{suffix}",
            model_registry=str(build_tiny_models(workdir / "models")),
            object_store_url=f"file://{workdir / 'objects'}",
            image_detector="null",
        )
        ensure_topics(settings.kafka, settings.topics)
        requests = [
            new_request(prompt=f"a fox {i}", model="tiny-sd", user_id=f"u{i}", width=64, height=64, steps=args.steps)
            for i in range(args.requests)
        ]
        ids = [r.request_id for r in requests]
        doomed = ids[-args.cancel :]
        watcher = ResultWatcher(settings)
        with (
            Publisher(settings) as publisher,
            WorkerProcess(settings, ["moderation", "generate"], workdir / "worker.log") as worker,
        ):
            for request in requests:
                publisher.publish(request).result(timeout=30)
            if not watcher.wait_for(ids, "first result", 600, at_least=1):
                raise SystemExit(f"no result came; worker log:\n{worker.log_tail()}")
            cancelled_at: dict[str, float] = {}
            for request_id in doomed:
                publisher.publish_cancellation(request_id, reason="benchmark").result(timeout=30)
                cancelled_at[request_id] = time.time()
            if not watcher.wait_for(ids, "all results", 600):
                raise SystemExit(f"results missing; worker log:\n{worker.log_tail()}")
            metrics = collect(
                settings.kafka, settings.topics.metrics, StageMetric, {i: 2 for i in doomed}, timeout_s=120
            )
        watcher.close()
    codec, arrivals = Codec(), watcher.arrivals
    ended = [i for i in doomed if codec.decode_as(ImageResult, arrivals.values[i]).status == "CANCELLED"]
    latencies_ms = sorted((arrivals.at_s[i] - cancelled_at[i]) * 1000.0 for i in ended)
    spent = {i: sum(m.device_seconds for m in metrics.events.get(i, []) if m.stage != "MODERATION") for i in ended}
    before = [i for i in ended if spent[i] == 0]
    print(f"\n{len(ended)} of {len(doomed)} cancelled requests ended CANCELLED (the others had already rendered)")
    print(f"{len(before)} of them before their render: 0 device seconds spent")
    print(
        f"{len(ended) - len(before)} in a batch shared with requests not cancelled, or already rendering: "
        f"{sum(spent.values()):.2f} device seconds spent, their images discarded"
    )
    if latencies_ms:
        p95 = latencies_ms[min(len(latencies_ms) - 1, int(0.95 * len(latencies_ms)))]
        print(
            f"cancel to CANCELLED: p50 {statistics.median(latencies_ms):.0f} ms, p95 {p95:.0f} ms, "
            f"max {latencies_ms[-1]:.0f} ms ({args.steps} steps a render, tiny model on this machine's CPU)"
        )


if __name__ == "__main__":
    main()
