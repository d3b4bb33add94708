"""A render take in pieces: its requests pending (``Pending``), put in service order (``in_service_order``) and
grouped into chunks of equal parameters, one model call each (``PlannedChunk``, in a ``PlannedTake``); a chunk after
its model call (``RenderedChunk``); and the stop check of that call (``Interruption``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from pixelpipe.core.events import ImageRequest
from pixelpipe.processors.messages import Emission, Inbound
from pixelpipe.processors.models import BatchOutput
from pixelpipe.processors.outcomes import RenderParams
from pixelpipe.processors.params import request_seed
from pixelpipe.processors.previews import Previews


@dataclass
class Pending:
    """A request of a take, ready to render: its message, its parameters and, for an edit, its images."""

    message: Inbound
    request: ImageRequest
    params: RenderParams
    source: Image.Image | None = None  # EDIT: the decoded source image
    references: list[Image.Image] = dataclasses.field(default_factory=list)  # EDIT: images beside the source
    mask: Image.Image | None = None  # EDIT with a mask: inpainting

    @property
    def seed(self) -> int:
        return request_seed(self.request)


@dataclass(frozen=True)
class PlannedChunk:
    """Requests with equal parameters for one model call, within their model's batch limit."""

    params: RenderParams
    items: list[Pending]
    take_started_s: float  # when the take began: the end of early endings' queue time


@dataclass
class RenderedChunk:
    """A chunk after its model call: its images, waiting to be moderated, stored and reported, or (``output`` None)
    the emissions that ended its requests when the call failed or was stopped. ``ended`` also holds those of the
    requests cancelled before the call, which ``items`` no longer lists. A chunk ``handed_back`` was left unrendered
    because the worker is stopping: none of its requests ends here; all are delivered again."""

    params: RenderParams
    items: list[Pending]
    output: BatchOutput | None
    device: str
    started_s: float  # when the model call began: the end of the requests' queue time
    model_ms: float
    ended: list[Emission] = dataclasses.field(default_factory=list)
    previews: Previews | None = None  # still being checked and sent when the model call returns
    handed_back: bool = False

    def outputs(self) -> zip[tuple[Pending, list[Image.Image]]]:
        """Each request with its images."""
        assert self.output is not None
        return zip(self.items, self.output.images, strict=True)


@dataclass
class PlannedTake:
    """A take after ``RenderStage.plan``: what ended early (invalid, unmoderated, expired requests) and the chunks
    to render, most urgent first."""

    emissions: list[Emission]
    chunks: list[PlannedChunk]


class Interruption:
    """The stop check of one chunk's model call (``previews.StopCheck``): stop once the worker is stopping (the chunk
    is then handed back, to be rendered from the start by the partition's next owner), or once every request of the
    chunk is cancelled. It counts the denoising steps done, for the device time a cancellation saved."""

    def __init__(
        self, request_ids: list[str], cancelled: Callable[[str], bool], stopping: Callable[[], bool], calls: int
    ) -> None:
        self.request_ids = request_ids
        self.cancelled = cancelled
        self.stopping = stopping
        self.calls = calls  # pipeline calls the chunk takes: one, or one per image (per-image batching)
        self.steps_done = 0
        self.steps_planned = 0
        self.stopped = False  # every request cancelled
        self.handed_back = False  # the worker is stopping

    def __call__(self, steps: int) -> bool:
        self.steps_done += 1
        self.steps_planned = self.calls * steps
        self.handed_back = self.stopping()
        self.stopped = not self.handed_back and all(self.cancelled(request_id) for request_id in self.request_ids)
        return self.handed_back or self.stopped

    def saved_per_spent(self) -> float:
        """Device time saved per second spent: the steps left undone over the steps done."""
        return max(0, self.steps_planned - self.steps_done) / max(1, self.steps_done)


def urgency(pending: Pending) -> tuple[bool, dt.datetime, float]:
    """INTERACTIVE before BATCH, then the earliest deadline, then the oldest."""
    request = pending.request
    far = dt.datetime.max.replace(tzinfo=dt.UTC)
    return (request.priority != "INTERACTIVE", request.deadline or far, pending.message.timestamp_s)


def in_service_order(pending: Sequence[Pending]) -> list[Pending]:
    """``pending`` taking turns across users: each user's requests in order of urgency, and a user's k-th request
    behind every user's (k-1)-th of the same priority, so one user's many requests in a take do not hold another
    user's few behind them; within a turn, by urgency."""
    by_user: dict[tuple[str, str], list[Pending]] = {}
    for item in sorted(pending, key=urgency):
        by_user.setdefault((item.request.user_id, item.request.priority), []).append(item)
    turn = {id(item): k for items in by_user.values() for k, item in enumerate(items)}
    return sorted(pending, key=lambda item: (urgency(item)[0], turn[id(item)], *urgency(item)[1:]))
