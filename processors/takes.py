"""How a render stage works through one take of its stream, keeping the model busy.

A take is planned (requests read, checked and grouped into chunks, one model call each), then each chunk is
rendered on the model thread and finished on the finishing thread (output moderation, encoding, one store write,
results and metrics, sent and acknowledged by the broker). Chunk k+1's model call runs while chunk k is finished,
with at most one chunk waiting between the two: the model waits for the CPU and the network only at the end of a
take. The worker asks for the next take, which acknowledges this one's events, only after every chunk's emissions
were acknowledged, so committed offsets never pass unfinished work and a crash or a stop loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

from pixelpipe.processors.stages import Emission, Inbound, RenderedChunk, RenderStage
from pixelpipe.processors.telemetry import TELEMETRY

T = TypeVar("T")
Send = Callable[[Sequence[Emission]], Awaitable[None]]


async def render_take(
    stage: RenderStage, messages: Sequence[Inbound], send: Send, model_thread: Executor, finishing_thread: Executor
) -> None:
    """Plan, render and finish ``messages``; returns once everything they emit was sent (``send`` returned)."""
    planned = await in_thread(model_thread, stage.plan, messages)
    await send(planned.emissions)

    async def finish(chunk: RenderedChunk) -> None:
        await send(await in_thread(finishing_thread, stage.finish, chunk))

    finishing: asyncio.Future[None] | None = None
    try:
        for chunk in planned.chunks:
            rendered = await in_thread(model_thread, stage.render, chunk)
            TELEMETRY.model_busy(stage.name, rendered.model_ms / 1000.0)
            if finishing is not None:
                await finishing
            finishing = asyncio.ensure_future(finish(rendered))
        if finishing is not None:
            await finishing
    finally:
        # Cancelled (a stop, a rebalance) or failed: the take stays unacknowledged and is delivered again.
        if finishing is not None and not finishing.done():
            finishing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await finishing


async def in_thread(executor: Executor, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on ``executor``'s thread, awaited without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(executor, function, *args)
