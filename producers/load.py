"""Where requests to publish come from (a JSONL file or a synthetic load generator) and the paced publish loop."""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pixelpipe.core.events import ImageRequest
from pixelpipe.core.experiments import assign_variant
from pixelpipe.core.validation import InvalidRequestError
from pixelpipe.producers.publisher import Delivery, PendingDelivery, Publisher
from pixelpipe.producers.requests import new_request

SYNTHETIC_PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "a red fox in fresh snow, photograph",
    "an isometric city block made of glass",
    "a bowl of ramen, studio lighting",
    "a watercolor map of an imaginary island",
    "a robot tending a vegetable garden",
)
_TIME_FIELDS = ("deadline",)


@dataclass(frozen=True)
class Invalid:
    """A request that was refused before sending, and where it came from."""

    source: str  # e.g. "requests.jsonl:17"
    error: str


def requests_from_jsonl(path: Path) -> Iterator[ImageRequest | Invalid]:
    """One request per line, as JSON objects with ImageRequest's field names; ids and times are filled in.

    ``deadline`` is an ISO-8601 time with a zone. A line that is not a valid request yields an Invalid.
    """
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                fields = json.loads(line)
                if not isinstance(fields, dict):
                    raise ValueError("expected a JSON object")
                for name in _TIME_FIELDS:
                    if isinstance(fields.get(name), str):
                        fields[name] = dt.datetime.fromisoformat(fields[name])
                yield new_request(**fields)
            except (ValueError, TypeError) as e:
                yield Invalid(where, str(e))


@dataclass(frozen=True)
class SyntheticLoad:
    """A reproducible mix of generate and edit requests from many users, with experiment assignments."""

    count: int
    model: str = "tiny-sd"
    edit_ratio: float = 0.3
    users: int = 100
    width: int = 64
    height: int = 64
    steps: int | None = None
    source_uris: tuple[str, ...] = ()
    experiments: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    interactive_ratio: float = 0.2
    seed: int = 0

    def __iter__(self) -> Iterator[ImageRequest]:
        rng = random.Random(self.seed)
        for i in range(self.count):
            user_id = f"user-{rng.randrange(self.users):05d}"
            editing = bool(self.source_uris) and rng.random() < self.edit_ratio
            yield new_request(
                kind="EDIT" if editing else "GENERATE",
                prompt=rng.choice(SYNTHETIC_PROMPTS),
                model=self.model,
                user_id=user_id,
                width=self.width,
                height=self.height,
                steps=self.steps,
                seed=rng.randrange(2**31),
                source_image_uri=self.source_uris[i % len(self.source_uris)] if editing else None,
                strength=0.6 if editing else None,
                experiments={key: assign_variant(key, user_id, arms) for key, arms in self.experiments.items()},
                priority="INTERACTIVE" if rng.random() < self.interactive_ratio else "BATCH",
            )


@dataclass
class PublishReport:
    sent: int = 0
    acknowledged: int = 0
    failed: list[str] = field(default_factory=list)  # "request_id: reason"
    invalid: list[Invalid] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.invalid


def publish_all(
    publisher: Publisher,
    requests: Iterable[ImageRequest | Invalid],
    *,
    rate: float | None = None,
    total: int | None = None,
    progress: bool = True,
    topic: str | None = None,
) -> PublishReport:
    """Validate and publish each request, at most ``rate`` per second, and wait for every delivery report.

    Invalid requests are reported with their source and not sent; the rest still go.
    """
    report = PublishReport()
    pending: list[PendingDelivery] = []
    started = time.monotonic()
    bar = tqdm(total=total, unit="req", desc="acknowledged", disable=not progress, dynamic_ncols=True)

    def settled(request_id: str, future: PendingDelivery) -> None:
        error = future.exception()
        if error is None:
            report.acknowledged += 1
            report.deliveries.append(future.result())
        else:
            report.failed.append(f"{request_id}: {error}")
        bar.update(1)

    for index, item in enumerate(requests):
        if isinstance(item, Invalid):
            report.invalid.append(item)
            bar.update(1)
            continue
        if rate:
            time.sleep(max(0.0, started + index / rate - time.monotonic()))
        try:
            future = publisher.publish(item, topic)
        except InvalidRequestError as e:
            report.invalid.append(Invalid(item.request_id or f"#{index}", str(e)))
            bar.update(1)
            continue
        future.add_done_callback(lambda f, rid=item.request_id: settled(rid, f))
        pending.append(future)
        report.sent += 1
    publisher.flush()
    for future in pending:
        future.exception()  # wait for the last reports; settled() has counted them
    bar.close()
    return report


def describe(report: PublishReport) -> dict[str, Any]:
    return {
        "sent": report.sent,
        "acknowledged": report.acknowledged,
        "failed": len(report.failed),
        "invalid": len(report.invalid),
    }
