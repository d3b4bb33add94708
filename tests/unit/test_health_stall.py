"""The worker's stall check (``Pipeline.stalled``), which stops /healthz's beat: an agent idle past the liveness
bound while the broker holds events on its partitions that its consumer has not read. Faust's consumer is faked (no
honest way makes a real one stop fetching from outside the process); the broker's end offsets are what it answers."""

import asyncio
import time
from types import SimpleNamespace

from faust.types import TP

from pixelpipe.core.settings import Settings
from pixelpipe.processors.app import Pipeline

BOUND_S = 30.0


class FakeConsumer:
    def __init__(self, ends: dict[TP, int], read: dict[TP, int | None], answers: bool = True) -> None:
        self.ends, self._read_offset, self.answers = ends, read, answers

    def assignment(self) -> set[TP]:
        return set(self.ends)

    async def highwaters(self, *partitions: TP) -> dict[TP, int]:
        if not self.answers:
            await asyncio.sleep(3600)  # a broker that does not answer
        return {tp: self.ends[tp] for tp in partitions}


def pipeline(consumer: FakeConsumer, rebalancing: bool = False) -> Pipeline:
    settings = Settings.from_env({"PIXELPIPE_LIVENESS_BOUND_S": str(BOUND_S)})
    built = Pipeline(settings, {}, sender=None, partitions=2)  # type: ignore[arg-type]  # no agent sends
    built.app = SimpleNamespace(rebalancing=rebalancing, in_recovery=False, consumer=consumer)  # type: ignore[assignment]
    built.sources = {"generate": "gen", "moderation": "req"}
    long_ago = time.monotonic() - BOUND_S - 1
    built._taken_s = {"generate": long_ago, "moderation": long_ago}
    return built


def stalled(built: Pipeline) -> list[str]:
    return asyncio.run(built.stalled())


def test_an_idle_agent_whose_consumer_reads_nothing_of_what_waits_is_stalled():
    consumer = FakeConsumer({TP("gen", 0): 10, TP("gen", 1): 4, TP("req", 0): 7}, {TP("gen", 0): 3})
    consumer._read_offset.update({TP("gen", 1): 3, TP("req", 0): 6})  # read to the end
    assert stalled(pipeline(consumer)) == ["generate"]


def test_no_stall_when_everything_was_read_or_the_agent_is_busy_or_took_lately():
    read_all = FakeConsumer({TP("gen", 0): 10}, {TP("gen", 0): 9})
    assert stalled(pipeline(read_all)) == []

    waiting = FakeConsumer({TP("gen", 0): 10}, {TP("gen", 0): 3})
    busy = pipeline(waiting)
    busy._busy.add("generate")  # a long render, or a take waiting on a storage outage
    assert stalled(busy) == []
    lately = pipeline(waiting)
    lately._taken_s["generate"] = time.monotonic()
    assert stalled(lately) == []


def test_no_verdict_while_rebalancing_or_without_the_broker():
    waiting = FakeConsumer({TP("gen", 0): 10}, {TP("gen", 0): None})
    assert stalled(pipeline(waiting)) == ["generate"]  # nothing read since the assignment
    rebalancing = pipeline(waiting, rebalancing=True)
    assert stalled(rebalancing) == []
    assert rebalancing._taken_s["generate"] > time.monotonic() - 1  # the bound starts again after it

    silent = FakeConsumer({TP("gen", 0): 10}, {TP("gen", 0): 3}, answers=False)
    started_s = time.monotonic()
    assert stalled(pipeline(silent)) == []
    assert time.monotonic() - started_s < 10  # within the end offsets' wait, not the broker's silence
