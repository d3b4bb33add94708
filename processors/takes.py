"""How the agents work through their streams, keeping the model busy and committing nothing unfinished.

A render take is planned (requests read, checked and grouped into chunks, one model call each), then each chunk is
rendered on the model thread and finished on the finishing thread (output moderation, encoding, one store write,
results and metrics, sent and acknowledged by the broker). Chunk k+1's model call runs while chunk k is finished,
with at most one chunk waiting between the two, and chunk k's events wait for the broker while chunk k+1 is finished
(the finishing thread never waits for a round trip). Across takes too: ``render_take`` returns once a take's last
chunk is rendered, and the agent takes the next one while that chunk is finished.

So a take's messages are acknowledged (``InOrderAcknowledgement``; Faust commits acknowledged
offsets only) once everything the take emits was acknowledged by the broker, not when the next take is asked for,
take after take in order, with at most one take waiting. Committed offsets never pass unfinished work, and a crash,
a stop or a failed send loses nothing: the take is delivered again.

A stop (SIGTERM) ends the model call in progress at its next denoising step; that chunk and those after it are
handed back (their messages stay unacknowledged and are rendered from the start by the partition's next owner),
while the chunks already rendered are finished, sent and acknowledged; the takes that follow, from what the stream
had buffered, are handed back whole. A call that does not reach a step boundary
within ``HAND_BACK_WAIT_S`` (one step longer than that) is abandoned to its thread, and the worker exits without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pixelpipe.processors.messages import Emission, Inbound
from pixelpipe.processors.telemetry import TELEMETRY

if TYPE_CHECKING:
    from pixelpipe.processors.render import RenderStage

log = logging.getLogger(__name__)
T = TypeVar("T")
Send = Callable[[Sequence[Emission]], Awaitable[None]]
# Longest a stopping worker waits for the model call in progress to reach a denoising step and return: well inside
# the 10 s a stop may take, so that a step longer than this (a huge image on a CPU) cannot hold the stop.
HAND_BACK_WAIT_S = 5.0
STOP_POLL_S = 0.1  # how often an agent waiting for a model call looks whether the worker stops


@dataclass
class RenderedTake:
    """What ``render_take`` did with a take: ``sent`` is done when everything it emits was sent; ``handed_back``
    holds the (partition, offset) of the messages it left to be delivered again, because the worker stops;
    ``abandoned`` says a model call of it is still running on the model thread, past ``HAND_BACK_WAIT_S``."""

    sent: asyncio.Future[None]
    handed_back: frozenset[tuple[int, int]] = frozenset()
    abandoned: bool = False


async def render_take(
    stage: RenderStage,
    messages: Sequence[Inbound],
    send: Send,
    model_thread: Executor,
    finishing_thread: Executor,
) -> RenderedTake:
    """Plan and render ``messages``, finishing each chunk while the next renders and sending what a chunk emits
    while the next is finished; returns once the last chunk is rendered, with a future done when everything the
    take emits was sent (every ``send`` returned).
    Once the worker stops (``stage.stopping``), the chunk in progress ends at its next denoising step, and it and
    the chunks after it are handed back (``RenderedTake.handed_back``); a take begun after the stop is handed back
    whole."""
    if stage.stopping():
        return RenderedTake(asyncio.ensure_future(_all_of([])), _positions(messages))
    planned = await in_thread(model_thread, stage.plan, messages)
    await send(planned.emissions)
    loop = asyncio.get_running_loop()
    finishing: asyncio.Future[list[Emission]] = loop.create_future()
    finishing.set_result([])  # nothing to finish before the first chunk
    sending: list[asyncio.Future[None]] = []
    try:
        for index, chunk in enumerate(planned.chunks):
            call = asyncio.ensure_future(in_thread(model_thread, stage.render, chunk))
            rendered = await _unless_stuck_in_a_stop(call, stage.stopping)
            if rendered is None or rendered.handed_back:
                left = [item.message for later in planned.chunks[index:] for item in later.items]
                log.info("stopping: chunks handed back", extra={"stage": stage.name, "requests": len(left)})
                return RenderedTake(asyncio.ensure_future(_all_of(sending)), _positions(left), rendered is None)
            TELEMETRY.model_busy(stage.name, rendered.model_ms / 1000.0, pool=stage.context.pool)
            # At most one rendered chunk waits for the finishing thread; its sends do not hold the next finish.
            await finishing
            finishing = asyncio.ensure_future(in_thread(finishing_thread, stage.finish, rendered))
            sending.append(asyncio.ensure_future(_send_when_finished(finishing, send)))
    except BaseException:
        # Cancelled (a stop, a rebalance) or failed: the take stays unacknowledged and is delivered again.
        for future in sending:
            await _cancelled(future)
        raise
    return RenderedTake(asyncio.ensure_future(_all_of(sending)))


def _positions(messages: Sequence[Inbound]) -> frozenset[tuple[int, int]]:
    return frozenset((message.partition, message.offset) for message in messages)


async def _unless_stuck_in_a_stop(call: asyncio.Future[T], stopping: Callable[[], bool]) -> T | None:
    """``call``'s result; None when the worker stops and the call does not return within ``HAND_BACK_WAIT_S``."""
    while not stopping():
        done, _ = await asyncio.wait({call}, timeout=STOP_POLL_S)
        if done:
            return call.result()
    try:
        return await asyncio.wait_for(asyncio.shield(call), HAND_BACK_WAIT_S)
    except TimeoutError:
        return None


async def _send_when_finished(finishing: Awaitable[list[Emission]], send: Send) -> None:
    await send(await finishing)


async def _all_of(futures: Sequence[asyncio.Future[None]]) -> None:
    """Wait for every one of ``futures``, then raise the first failure among them."""
    await asyncio.gather(*futures, return_exceptions=True)
    for future in futures:
        future.result()


class InOrderAcknowledgement:
    """Acknowledges each take's messages once the take's effects are done, take after take in order, while the agent
    goes on with the next take; at most one take waits to be acknowledged."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._waiting: asyncio.Future[None] | None = None

    async def after(self, effects: Awaitable[None], acknowledge: Callable[[], Awaitable[None]]) -> None:
        """Acknowledge a take (``acknowledge``) when ``effects`` are done, after the take before it; waits for that
        take first, and raises what its effects raised (the agent then stops with its takes unacknowledged)."""
        if self._waiting is not None:
            await self._waiting
        self._waiting = asyncio.ensure_future(self._acknowledge(effects, acknowledge))

    async def close(self) -> None:
        """Wait for the last take to be acknowledged; cancelled, its messages stay unacknowledged."""
        if self._waiting is not None:
            try:
                await self._waiting
            except asyncio.CancelledError:
                await _cancelled(self._waiting)
                raise

    async def _acknowledge(self, effects: Awaitable[None], acknowledge: Callable[[], Awaitable[None]]) -> None:
        try:
            await effects
        except Exception:
            log.exception("a take's effects failed; it stays unacknowledged", extra={"stage": self.stage})
            raise
        await acknowledge()


async def _cancelled(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await future


async def in_thread(executor: Executor, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on ``executor``'s thread, awaited without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(executor, function, *args)
