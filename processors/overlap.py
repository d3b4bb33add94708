"""Two-step processing of a stream's takes, overlapped: take k+1 is processed while take k is finished.

A render stage's model call is the expensive step; encoding, output moderation, uploads and waiting for the
broker's acknowledgements are not, but they would leave the accelerator idle if they ran in line. Here the first
step (``process``) moves on to the next take as soon as it has handed its output to a bounded queue, and one
finisher task runs the second step (``finish``) on each take in order. A take's events are acknowledged only
after its ``finish`` returned (its effects were acknowledged by the broker), in the order they were taken, so
committed offsets never pass unfinished work: a crash or a stop loses nothing, and redelivered events are
deduplicated downstream by their derived ids.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

E = TypeVar("E")  # an event of the stream
T = TypeVar("T")  # what the first step hands to the second


class OverlappedTakes(Generic[E, T]):
    """Runs ``process`` on each take and ``finish`` on its output; while one take is processed, at most ``depth``
    earlier ones are finishing or waiting to. ``ack`` is called on each event once its take is finished."""

    def __init__(
        self,
        process: Callable[[Sequence[E]], Awaitable[T]],
        finish: Callable[[T], Awaitable[None]],
        ack: Callable[[E], Awaitable[object]],
        depth: int = 1,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.process = process
        self.finish = finish
        self.ack = ack
        self.depth = depth

    async def run(self, takes: AsyncIterable[Sequence[E]]) -> None:
        """Until ``takes`` ends (then everything taken is finished first) or the task is cancelled (then what is
        not finished stays unacknowledged, to be redelivered). An error in either step propagates."""
        finishing: asyncio.Queue[tuple[Sequence[E], T]] = asyncio.Queue()
        # Bounds the takes in flight, the one being processed included: memory stays bounded and a slow finish
        # holds the model back rather than piling up rendered images.
        in_flight = asyncio.Semaphore(self.depth + 1)
        finisher = asyncio.create_task(self._finish_in_order(finishing, in_flight))
        try:
            async for events in takes:
                await _unless_failed(in_flight.acquire(), finisher)
                finishing.put_nowait((events, await self.process(events)))
            await _unless_failed(finishing.join(), finisher)
        finally:
            finisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await finisher

    async def _finish_in_order(
        self, finishing: asyncio.Queue[tuple[Sequence[E], T]], in_flight: asyncio.Semaphore
    ) -> None:
        while True:
            events, processed = await finishing.get()
            await self.finish(processed)
            for event in events:
                await self.ack(event)
            in_flight.release()
            finishing.task_done()


async def _unless_failed(step: Awaitable[object], finisher: asyncio.Task[None]) -> None:
    """Await ``step``, unless the finisher fails first: then raise its error (``step`` would wait forever)."""
    waiting = asyncio.ensure_future(step)
    try:
        await asyncio.wait({waiting, finisher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiting.done():
            waiting.cancel()
    if finisher.done():  # it only ever stops on an error
        raise finisher.exception() or RuntimeError("the finisher stopped")
    waiting.result()
