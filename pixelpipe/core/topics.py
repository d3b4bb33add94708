"""The pipeline's Kafka topics: names and partition counts come from the settings."""

from __future__ import annotations

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from pixelpipe.core.settings import KafkaSettings, TopicSettings


def ensure_topics(
    kafka: KafkaSettings, topics: TopicSettings, names: list[str] | None = None, partitions: int | None = None
) -> list[str]:
    """Create the topics that do not exist yet (by default the pipeline's); returns the names created. Existing
    topics are left as they are."""
    admin = AdminClient(kafka.client_config())
    wanted = names or topics.pipeline()
    existing = admin.list_topics(timeout=10).topics
    missing = [name for name in wanted if name not in existing]
    if not missing:
        return []
    # The broker stamps each request with its own clock on arrival: the rate limiter's time, which a producer
    # cannot set.
    append_time = {"message.timestamp.type": "LogAppendTime"}
    futures = admin.create_topics(
        [
            NewTopic(name, partitions or topics.partitions, 1, config=append_time if name == topics.requests else {})
            for name in missing
        ],
        operation_timeout=30,
    )
    for future in futures.values():
        try:
            future.result()
        except KafkaException as e:
            if e.args[0].code() != e.args[0].TOPIC_ALREADY_EXISTS:
                raise
    return missing
