"""Reading results back: what an upstream service does to learn how its requests ended."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from confluent_kafka import Consumer
from tqdm import tqdm

from pixelpipe.core.codec import CodecError, codec_from_settings
from pixelpipe.core.events import Event, ImageResult
from pixelpipe.core.settings import KafkaSettings
from pixelpipe.core.topics import assign_from_start

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Event)


@dataclass
class Collected(Generic[E]):
    """Every event read per request id; more than one event for a request means a redelivery. Events that do not
    decode are skipped, each listed in ``undecodable`` as ``topic/partition/offset: reason``."""

    events: dict[str, list[E]] = field(default_factory=dict)
    """Each request id's events, in the order they were read."""
    missing: set[str] = field(default_factory=set)
    """The request ids that did not get all their events in time."""
    undecodable: list[str] = field(default_factory=list)
    """Where each skipped event was, and why it did not decode."""

    def latest(self) -> dict[str, E]:
        """Each request id's last event read."""
        return {request_id: events[-1] for request_id, events in self.events.items()}


@dataclass(frozen=True)
class CancelOutcome:
    """What ``Publisher.cancel`` found once its Cancellation was acknowledged: the request's result on the results
    topic, or None when there was none yet after ``waited_s``."""

    request_id: str
    """The request the cancellation named."""
    result: ImageResult | None
    """The request's result on the results topic, or None: none yet."""
    waited_s: float
    """How long the results topic was read for it, in seconds."""

    @property
    def cancelled(self) -> bool:
        """The request ended CANCELLED."""
        return self.result is not None and self.result.status == "CANCELLED"

    @property
    def finished_before(self) -> bool:
        """The request had already ended otherwise: the cancellation changed nothing."""
        return self.result is not None and not self.cancelled

    def __str__(self) -> str:
        if self.result is None:
            return (
                f"{self.request_id}: cancellation published; no result yet after {self.waited_s:g} s. It ends "
                "CANCELLED unless its render is already done; a request id the pipeline never saw gets no result."
            )
        if self.cancelled:
            how = f" ({self.result.error_message})" if self.result.error_message else ""
            return f"{self.request_id}: CANCELLED{how}"
        code = f" {self.result.error_code}" if self.result.error_code else ""
        return f"{self.request_id}: already finished: {self.result.status}{code}; the cancellation changed nothing"


def collect(
    kafka: KafkaSettings,
    topic: str,
    event_type: type[E],
    request_ids: Iterable[str] | Mapping[str, int],
    *,
    timeout_s: float = 300.0,
    settle_s: float = 0.0,
    progress: bool = False,
) -> Collected:
    """Read ``topic`` from the start until each request id has its events (one each, or as many as the mapping
    says) or time runs out, then keep reading ``settle_s`` longer to catch duplicates."""
    expected = dict(request_ids) if isinstance(request_ids, Mapping) else dict.fromkeys(request_ids, 1)
    wanted = set(expected)
    consumer = Consumer(
        kafka.client_config() | {"group.id": f"pixelpipe-reader-{uuid.uuid4()}", "enable.auto.commit": False}
    )
    assign_from_start(consumer, topic, wait_s=timeout_s)
    codec = codec_from_settings(kafka)
    collected: Collected[E] = Collected()
    done: set[str] = set()
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    try:
        with tqdm(total=len(wanted), unit="req", desc=f"{event_type.schema_name}s", disable=not progress) as bar:
            while time.monotonic() < (settle_until or deadline):
                for message in consumer.consume(500, timeout=0.5):
                    if message.error():
                        continue
                    try:
                        event = codec.decode_as(event_type, message.value())
                    except CodecError as e:  # someone else's poison must not stop a reader waiting for its own
                        where = f"{message.topic()}/{message.partition()}/{message.offset()}"
                        log.warning("undecodable event skipped", extra={"at": where, "reason": str(e)})
                        collected.undecodable.append(f"{where}: {e}")
                        continue
                    if event.request_id not in wanted:
                        continue
                    events = collected.events.setdefault(event.request_id, [])
                    events.append(event)
                    if len(events) == expected[event.request_id]:
                        done.add(event.request_id)
                        bar.update(1)
                if settle_until is None and done == wanted:
                    settle_until = time.monotonic() + settle_s
    finally:
        consumer.close()
    collected.missing = wanted - done
    return collected
