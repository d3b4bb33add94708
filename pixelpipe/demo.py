"""`pixelpipe demo`: the pipeline end to end on embedded defaults, starting whatever is missing."""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer
from tqdm import tqdm

from pixelpipe.config import Settings
from pixelpipe.producers import Publisher
from pixelpipe.producers.load import SyntheticLoad, publish_all
from pixelpipe.schemas import Codec
from pixelpipe.stack import LocalStack
from pixelpipe.stack.services import port_open
from pixelpipe.topics import ensure_topics

DEMO_EXPERIMENT = {"steps-test": {"control": 1.0, "fast": 1.0}}


def run_demo(settings: Settings, requests: int, echo: Callable[[str], None], keep_stack: bool = False) -> bool:
    """Publish a synthetic mix and read it back from Kafka; returns True when every event came back once."""
    stack = LocalStack(settings)
    host, _, port = settings.kafka_bootstrap.split(",")[0].rpartition(":")
    started_stack = not port_open(int(port), host)
    if started_stack:
        echo(f"starting the local stack in {settings.stack_dir} ...")
        stack.up()
    try:
        ensure_topics(settings)
        load = SyntheticLoad(
            count=requests,
            source_uris=(f"{settings.object_store_url.rstrip('/')}/inputs/demo-source.png",),
            experiments=DEMO_EXPERIMENT,
            seed=int(time.time()),
        )
        began = time.monotonic()
        with Publisher(settings) as publisher:
            report = publish_all(publisher, load, total=requests)
        published_s = time.monotonic() - began
        received = _read_back(settings, report.deliveries, echo)
        echo("")
        echo(
            f"published {report.acknowledged}/{requests} requests in {published_s:.2f}s "
            f"({report.acknowledged / published_s:,.0f}/s) to {settings.topic_requests}"
        )
        for label, counter in received.items():
            echo(f"  by {label:<10} " + "  ".join(f"{k}={v}" for k, v in sorted(counter.items())))
        echo("the moderation, generation and editing stages consume this topic: see README, 'Roadmap'")
        return report.acknowledged == sum(received["partition"].values()) == requests
    finally:
        if started_stack and not keep_stack:
            stack.down()


def _read_back(settings: Settings, deliveries: list, echo: Callable[[str], None]) -> dict[str, collections.Counter]:
    """Consume exactly the published offsets back and tally them."""
    consumer = Consumer(
        settings.kafka_client_config()
        | {"group.id": f"pixelpipe-demo-{uuid.uuid4()}", "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )
    wanted = {(d.partition, d.offset) for d in deliveries}
    codec = Codec()
    tallies: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    consumer.subscribe([settings.topic_requests])
    deadline = time.monotonic() + 60
    with tqdm(total=len(wanted), unit="req", desc="read back") as bar:
        while wanted and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=1.0):
                if message.error() or (message.partition(), message.offset()) not in wanted:
                    continue
                wanted.discard((message.partition(), message.offset()))
                request = codec.decode_as("ImageRequest", message.value())
                tallies["kind"][request["kind"]] += 1
                tallies["priority"][request["priority"]] += 1
                tallies["variant"][request["experiments"]["steps-test"]] += 1
                tallies["partition"][message.partition()] += 1
                bar.update(1)
    consumer.close()
    if wanted:
        echo(f"{len(wanted)} published requests were not read back within 60s")
    return tallies
