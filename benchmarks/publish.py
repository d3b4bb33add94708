"""Producer throughput to the local broker for 1 KB events.

    pixelpipe stack up && python benchmarks/publish.py [--events 200000]

Three paths, measured in the same run against the same topic:
  baseline   confluent-kafka's Producer with the SDK's settings, pre-encoded values, no delivery futures
  sdk bytes  Publisher.publish_encoded: the same bytes, each with a PendingDelivery
  sdk full   Publisher.publish: experiment stamping, validation and Avro encoding of each typed ImageRequest, then
             as above
Each rate counts from the first send until the broker acknowledged the last event.
"""

from __future__ import annotations

import argparse
import time
import uuid

from confluent_kafka import Producer

from pixelpipe.core.codec import Codec, codec_from_settings
from pixelpipe.core.events import ImageRequest
from pixelpipe.core.settings import Settings
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.publisher import producer_config

EVENT_BYTES = 1024


def one_kb_request(codec: Codec, i: int) -> ImageRequest:
    request = new_request(prompt="", model="sd-1.5", user_id=f"user-{i % 1000:05d}", seed=i)
    # Pad the prompt so the encoded event is 1 KB, like a long real prompt.
    request.prompt = "x"
    filler = EVENT_BYTES - len(codec.encode(request))  # +1 for "x", -1 for the longer length
    request.prompt = ("a detailed prompt " * 64)[:filler]
    return request


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    events = parser.parse_args().events
    settings = Settings.from_env().updated(topic_requests=f"bench.publish.{uuid.uuid4().hex[:8]}")
    topic = settings.topics.requests
    ensure_topics(settings.kafka, settings.topics, names=[topic], partitions=8)
    codec = codec_from_settings(settings.kafka)  # the codec the Publisher uses, so all three send the same bytes
    requests = [one_kb_request(codec, i) for i in range(min(events, 20_000))]
    encoded = [(r.request_id.encode(), codec.encode(r)) for r in requests]
    print(f"{events} events of {len(encoded[0][1])} bytes to {settings.kafka.bootstrap}, topic of 8 partitions")

    producer = Producer(producer_config(settings.kafka))
    started = time.perf_counter()
    for i in range(events):
        key, value = encoded[i % len(encoded)]
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush()
    baseline = events / (time.perf_counter() - started)
    print(f"  baseline (raw producer)  {baseline:>10,.0f} events/s")

    with Publisher(settings, codec=codec) as publisher:
        started = time.perf_counter()
        for i in range(events):
            key, value = encoded[i % len(encoded)]
            publisher.publish_encoded(key, value)
        publisher.flush()
        sdk_bytes = events / (time.perf_counter() - started)
        print(f"  sdk publish_encoded      {sdk_bytes:>10,.0f} events/s  ({sdk_bytes / baseline:.2f}x baseline)")

        started = time.perf_counter()
        for i in range(events):
            publisher.publish(requests[i % len(requests)])
        publisher.flush()
        full = events / (time.perf_counter() - started)
        print(f"  sdk publish (validate+encode) {full:>5,.0f} events/s  ({full / baseline:.2f}x baseline)")
    print("  goal                        100,000 events/s")


if __name__ == "__main__":
    main()
