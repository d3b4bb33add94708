"""The overlap of a stage's two steps: the next take is processed while the last one finishes, and events are
acknowledged in order, only after their take finished."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from pixelpipe.processors.overlap import OverlappedTakes


async def takes_of(*takes: list[int]) -> AsyncIterator[list[int]]:
    for take in takes:
        yield take


class Recorder:
    def __init__(self, finish_s: float = 0.0, fail_finish_on: int | None = None) -> None:
        self.log: list[tuple[str, object]] = []
        self.finish_s = finish_s
        self.fail_finish_on = fail_finish_on

    async def process(self, events: Sequence[int]) -> list[int]:
        self.log.append(("process", events[0]))
        await asyncio.sleep(0)
        return list(events)

    async def finish(self, processed: list[int]) -> None:
        self.log.append(("finish started", processed[0]))
        await asyncio.sleep(self.finish_s)  # a slow encoder or upload
        if processed[0] == self.fail_finish_on:
            raise OSError("upload failed")
        self.log.append(("finished", processed[0]))

    async def ack(self, event: int) -> None:
        self.log.append(("ack", event))


def test_a_slow_finish_does_not_delay_the_next_take_s_model_call() -> None:
    recorder = Recorder(finish_s=0.2)
    asyncio.run(OverlappedTakes(recorder.process, recorder.finish, recorder.ack).run(takes_of([1, 2], [3, 4])))
    log = recorder.log
    # Take 2 is processed while take 1 is still finishing.
    assert log.index(("process", 3)) < log.index(("finished", 1))
    # Every event acknowledged once, in order, and only after its take finished.
    assert [e for kind, e in log if kind == "ack"] == [1, 2, 3, 4]
    assert log.index(("finished", 1)) < log.index(("ack", 1))
    assert log.index(("finished", 3)) < log.index(("ack", 3))


def test_no_more_than_depth_processed_takes_wait_for_the_finisher() -> None:
    recorder = Recorder(finish_s=0.05)
    takes = [[i] for i in range(1, 6)]
    asyncio.run(OverlappedTakes(recorder.process, recorder.finish, recorder.ack, depth=1).run(takes_of(*takes)))
    log = recorder.log
    for k in range(3, 6):
        # take k is processed only after take k-2 finished: one take finishing, one waiting, one processing.
        assert log.index(("finished", k - 2)) < log.index(("process", k))


def test_a_failed_finish_stops_the_run_and_leaves_its_events_unacknowledged() -> None:
    recorder = Recorder(fail_finish_on=3)
    with pytest.raises(OSError, match="upload failed"):
        asyncio.run(
            OverlappedTakes(recorder.process, recorder.finish, recorder.ack).run(takes_of([1, 2], [3, 4], [5], [6]))
        )
    acked = [e for kind, e in recorder.log if kind == "ack"]
    assert acked == [1, 2]  # redelivered from 3 on


def test_cancelling_leaves_what_is_not_finished_unacknowledged() -> None:
    recorder = Recorder(finish_s=10.0)

    async def cancelled_during_finish() -> None:
        run = asyncio.create_task(
            OverlappedTakes(recorder.process, recorder.finish, recorder.ack).run(takes_of([1], [2]))
        )
        await asyncio.sleep(0.1)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(cancelled_during_finish())
    assert not [e for kind, e in recorder.log if kind == "ack"]
