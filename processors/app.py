"""The Faust app: the pipeline's topics, tables and agents, in one place.

Agents: ``moderation`` on the requests topic; ``generate`` and ``edit`` on their topics, each with a long lane
beside it (``generate-long``, ``edit-long``: an agent on its kind's long topic, with its own executor and models that
share the weights). One app per worker; workers running the same stages form one consumer group.

Tables: ``user-limits`` (moderation), each user's token buckets, keyed by user on the partition publishers put that
user's requests on (``pixelpipe.core.topics.user_partition``), with a changelog, so a user's limit is the configured
one whatever the number of workers and survives restarts and rebalances; ``cancellations`` (render stages), a
global table over the compacted cancellations topic, which every render worker reads whole.

Messages are raw bytes on every topic and are decoded by the foundation's codec inside the stages, so an
undecodable message is dead-lettered with its original bytes instead of being dropped by a deserializer. Model and
detector calls never run on the event loop: each stage runs in its own single-thread executor and the agent awaits
it, so heartbeats and fetches go on while a batch renders. A take's events are acknowledged to Faust (and their
offsets become committable) only after everything they emit, table changes included, was acknowledged by the
broker (``processors.sender``, librdkafka), so a crash redelivers instead of losing; result and metric ids derive
from the request id, so a redelivered request is deduplicated downstream (Faust's consumer is fitted to this:
``processors.faust_app``). Stages are built, models loaded and warmed, before the worker joins its group
(``processors.build``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import faust
from faust.types import TP, EventT

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.experiments import Experiment
from pixelpipe.core.live_experiments import LiveExperiments
from pixelpipe.core.pools import DEFAULT_POOL, PoolConfigError, PoolRouting, pool_topics, read_pools
from pixelpipe.core.settings import Settings, StageSettings, TopicSettings
from pixelpipe.core.telemetry import Health, LagMonitor, serve
from pixelpipe.core.topics import TopicMirror
from pixelpipe.processors.build import LONG, RENDER_KINDS, STAGES, build_stages
from pixelpipe.processors.faust_app import (
    PipelineApp,
    PipelineConsumer,
    SharedGlobalTable,
    broker_credentials,
    broker_url,
)
from pixelpipe.processors.limits import UserLimits
from pixelpipe.processors.messages import Emission, Inbound
from pixelpipe.processors.moderation_stage import ModerationStage
from pixelpipe.processors.sender import EmissionSender
from pixelpipe.processors.takes import InOrderAcknowledgement, in_thread, render_take
from pixelpipe.processors.telemetry import GPU, TELEMETRY

if TYPE_CHECKING:
    from pixelpipe.processors.build import Stage
    from pixelpipe.processors.render import RenderStage

log = logging.getLogger(__name__)

LOG_APPEND_TIME = 1  # a record's timestamp type when the broker set it
USER_LIMITS_TABLE = "user-limits"
END_OFFSETS_WAIT_S = 5.0  # longest the stall check waits for the broker's end offsets
# Faust keeps a directory per app even for memory tables, by default in the working directory (the user's checkout,
# the container's root); nothing in it outlives the worker.
FAUST_DATA_DIR = Path(tempfile.gettempdir()) / "pixelpipe-faust"
IDLE_SWEEP_S = 30.0  # how often moderation forgets the users whose buckets are full again


def group_id(settings: Settings, stages: Sequence[str]) -> str:
    """Workers running the same stages for the same pool form one consumer group (Faust's app id); the default
    pool's group has no pool in its name, as before pools existed."""
    group = f"{settings.stages.consumer_group}-" + "-".join(s for s in STAGES if s in stages)
    pool = settings.stages.pool
    return group if pool == DEFAULT_POOL else f"{group}-{pool}"


def inbound(event: EventT) -> Inbound:
    message = event.message
    appended_s = message.timestamp if message.timestamp_type == LOG_APPEND_TIME else None
    return Inbound(
        message.value,
        message.key,
        message.topic,
        message.partition,
        message.offset,
        message.timestamp,
        appended_s,
        dict(message.headers or ()),
    )


class Pipeline:
    """The Faust app running the built ``stages``; what they emit goes out through ``sender``. ``partitions`` is the
    requests topic's partition count, which the user-limits table is partitioned like.

    Stopping (SIGTERM, SIGINT): Faust stops taking, and waits for the events in flight to be acknowledged before
    it commits and leaves the group. A render agent ends its model call in progress at the next denoising step and
    hands that chunk and the rest of its take back, unacknowledged, to be rendered from the start by the partition's
    next owner (processors.takes), so a stop takes seconds whatever is rendering, and renders nothing twice."""

    def __init__(
        self,
        settings: Settings,
        stages: Mapping[str, Stage],
        sender: EmissionSender,
        partitions: int,
        health: Health | None = None,
        table_partitions: Mapping[str, int] | None = None,
    ) -> None:
        """``table_partitions``: the partition count of each global table's topic that is not 1."""
        self.settings = settings
        self.table_partitions = dict(table_partitions or {})
        self.stages = stages
        self.sender = sender
        self.health = health
        self.failed = False
        FAUST_DATA_DIR.mkdir(exist_ok=True)
        self.abandoned_model_call = False  # a model call did not stop at a step; the process exits without it
        self.app = PipelineApp(
            group_id(settings, list(stages)),
            broker=broker_url(settings.kafka),
            broker_credentials=broker_credentials(settings.kafka),
            web_enabled=False,
            GlobalTable=SharedGlobalTable,
            store="memory://",
            datadir=str(FAUST_DATA_DIR / "{conf.name}"),
            topic_partitions=partitions,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            # Model calls never block the loop, so heartbeats flow during a batch and a dead worker can be noticed
            # in 10 s rather than Faust's default 60 s.
            broker_session_timeout=10.0,
            broker_heartbeat_interval=3.0,
            broker_commit_every=100,
            broker_commit_interval=1.0,
            # Room for a few takes, so the next one is ready when one is taken; a full buffer pauses its partition.
            stream_buffer_maxsize=max(64, settings.stages.take_events * 4, settings.stages.moderation_take_events * 2),
            # A rebalance or a stop waits for the takes in flight: a partition moves once its work is committed.
            stream_wait_empty=True,
        )
        topics = settings.topics
        self.sources = {
            kind: topic
            for kind, topic in (
                ("moderation", topics.requests),
                ("generate", topics.generate),
                ("edit", topics.edit),
                ("generate" + LONG, topics.generate_long),
                ("edit" + LONG, topics.edit_long),
            )
            if kind in stages
        }
        self._taken_s = dict.fromkeys(self.sources, time.monotonic())  # each agent's last take, or start
        self._busy: set[str] = set()  # agents inside a take
        self._global_tables: dict[str, faust.GlobalTable] = {}
        self._experiments: TopicMirror | None = None
        for kind, topic in self.sources.items():
            stage = stages[kind]
            if isinstance(stage, ModerationStage):
                self._add_moderation_agent(stage, topic, partitions)
            else:
                self._add_render_agent(kind, stage, topic)
        self._watch()

    def _topic(self, name: str) -> faust.TopicT:
        return self.app.topic(name, key_serializer="raw", value_serializer="raw")

    # -- moderation ---------------------------------------------------------------------------------------------
    def _add_moderation_agent(self, stage: ModerationStage, topic: str, partitions: int) -> None:
        table = self.app.Table(USER_LIMITS_TABLE, partitions=partitions)  # keys and values in JSON
        # The stage reads and charges the buckets in the table's own store, on its thread; the changes go to the
        # changelog with the take's events (below), not through Faust's producer one by one.
        moderation = self.settings.moderation
        stage.limits = UserLimits(
            moderation.max_requests_per_user_per_minute,
            moderation.rate_limit_burst,
            moderation.max_user_compute_per_minute,
            table.data,
            partitions,
        )
        stage.placed = True
        # Every moderation worker reads the whole compacted topic of pools: they are few and small.
        pools = self._global_table("model-pools", self.settings.topics.model_pools)
        stage.pools = PoolRouting(pools.data, stage.context.codec)
        stage.experiments = self._live_experiments(stage.experiments)
        changelog = table.changelog_topic.get_topic_name()
        executor = ThreadPoolExecutor(1, thread_name_prefix="moderation")
        stage_settings = self.settings.stages

        @self.app.agent(self._topic(topic), name="moderation")
        async def moderate(stream: faust.StreamT) -> AsyncIterator[None]:
            # Taken without Faust's acknowledgement: a take is acknowledged once the broker acknowledged all it
            # emits, its table changes included, while the next take is moderated.
            acknowledgement = InOrderAcknowledgement("moderation")
            within_s = self.settings.stages.moderation_max_wait_ms / 1000
            async for events in stream.noack_take(stage_settings.moderation_take_events, within=within_s):
                self._began("moderation")
                TELEMETRY.events_in("moderation", len(events), pool=None)  # of no pool: it routes to them all
                emissions = await in_thread(executor, stage.handle_batch, [inbound(e) for e in events])
                emissions += _table_changes(changelog, stage.limits.changes().items())
                await acknowledgement.after(self._guarded(self.sender.send_all(emissions)), _acker(stream, events))
                self._ended("moderation")
                yield None
            await acknowledgement.close()

        @self.app.timer(IDLE_SWEEP_S)
        async def forget_idle_users() -> None:
            # A full bucket is the same as none: idle users leave the table, and their changelog entries are
            # deleted, so the table holds the users of the last minute, not every user ever seen.
            idle = await in_thread(executor, stage.limits.forget_idle)
            await self._guarded(self.sender.send_all(_table_changes(changelog, idle.items())))

        @self.app.on_partitions_assigned.connect
        async def forget_moved_users(_app: faust.App, assigned: Set[TP], **_: object) -> None:
            # Faust's memory store forgets the keys it recovered of partitions that moved; these the stage wrote
            # itself. A partition kept through the rebalance keeps its users, and Faust reads on from where it was.
            stage.limits.keep_only({tp.partition for tp in assigned if tp.topic == topic})

    # -- rendering ----------------------------------------------------------------------------------------------
    def _add_render_agent(self, kind: str, stage: RenderStage, topic: str) -> None:
        stage.preview_sink = self.sender.send_preview  # previews of images in progress go to reply topics
        GPU.pool = stage.context.pool or ""  # a worker renders for one pool: its GPU series name it
        # Every render worker reads the whole compacted topic: cancellations are few and small.
        cancellations = self._global_table("cancellations", self.settings.topics.cancellations)
        stage.experiments = live = self._live_experiments(stage.experiments)
        stage.unread_experiments = live.unread
        stage.cancelled = lambda request_id: request_id.encode() in cancellations.data
        stage.stopping = lambda: bool(self.app.should_stop)
        model_thread = ThreadPoolExecutor(1, thread_name_prefix=kind)
        finishing_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{kind}-finish")
        stage_settings: StageSettings = self.settings.stages

        @self.app.agent(self._topic(topic), name=kind)
        async def render(stream: faust.StreamT) -> AsyncIterator[None]:
            # Faust's time-bounded take gathers the events the stage groups into batches: up to take_events, or
            # what came in max_wait_ms. Taken without Faust's acknowledgement: a take is acknowledged once its last
            # chunk is finished (its emissions acknowledged by the broker), while the next take renders.
            acknowledgement = InOrderAcknowledgement(kind)
            within_s = self.settings.stages.max_wait_ms / 1000
            async for events in stream.noack_take(stage_settings.take_events, within=within_s):
                self._began(kind)
                TELEMETRY.events_in(kind, len(events), pool=stage.context.pool)
                take = await render_take(
                    stage, [inbound(e) for e in events], self.sender.send_all, model_thread, finishing_thread
                )
                self.abandoned_model_call |= take.abandoned
                done = [e for e in events if (e.message.partition, e.message.offset) not in take.handed_back]
                if take.handed_back:
                    consumer = cast(PipelineConsumer, self.app.consumer)
                    consumer.hand_back([e.message for e in events if e not in done])
                # Busy until the take before is done too: a storage outage holds the agent here, retrying, which is
                # no stall.
                await acknowledgement.after(self._guarded(take.sent), _acker(stream, done))
                self._ended(kind)
                yield None
            await acknowledgement.close()

    def _live_experiments(self, from_file: Mapping[str, Experiment]) -> LiveExperiments:
        """The experiments a stage applies: its file's, and the experiments topic's as the worker mirrors it (every
        worker reads the whole compacted topic: experiments are few and small)."""
        if self._experiments is None:
            self._experiments = TopicMirror(self.settings.kafka, self.settings.topics.experiments).start()
            self.app.closers = (self._experiments.close,)
        return LiveExperiments(from_file, self._experiments.data, codec_from_settings(self.settings.kafka))

    def _global_table(self, name: str, topic: str) -> faust.GlobalTable:
        """A table of every message on ``topic`` (compacted), keyed and valued by their raw bytes, as its
        publishers wrote them; read whole by every worker of every group that asks for it."""
        if name not in self._global_tables:
            self._global_tables[name] = self.app.GlobalTable(
                name,
                key_type=bytes,
                value_type=bytes,
                changelog_topic=self._topic(topic),
                partitions=self.table_partitions.get(topic, 1),
                # faust-streaming's advice for a global table read by several instances: without it a worker can
                # loop in recovery.
                recovery_buffer_size=1,
            )
        return self._global_tables[name]

    # -- health and failure -------------------------------------------------------------------------------------
    def _began(self, kind: str) -> None:
        self._busy.add(kind)
        self._taken_s[kind] = time.monotonic()

    def _ended(self, kind: str) -> None:
        self._busy.discard(kind)
        self._taken_s[kind] = time.monotonic()

    async def _guarded(self, effects: Any) -> None:
        """A take's effects; their failure (the broker refused them after librdkafka's retries) stops the worker with
        the take unacknowledged, to be delivered again."""
        try:
            await effects
        except Exception:
            log.exception("a take's effects failed; the worker stops")
            self.failed = True
            os.kill(os.getpid(), signal.SIGTERM)  # Faust's worker stops as for any SIGTERM
            raise

    async def stalled(self) -> list[str]:
        """The agents that took nothing for the liveness bound while idle though the broker holds events on their
        partitions that the consumer has not read: a fetcher that stopped (the silent stall reported of some Faust
        versions). The broker is asked for its end offsets: the consumer's own highwater stops with its fetches."""
        bound_s = self.settings.ops.liveness_bound_s
        now_s = time.monotonic()
        if self.app.rebalancing or self.app.in_recovery:  # tables recovering: the agents wait, rightly
            self._taken_s = dict.fromkeys(self._taken_s, now_s)
            return []
        idle = {
            topic
            for kind, topic in self.sources.items()
            if kind not in self._busy and now_s - self._taken_s[kind] > bound_s
        }
        consumer = self.app.consumer
        assigned = [tp for tp in consumer.assignment() if tp.topic in idle]
        if not assigned:
            return []
        try:
            ends = await asyncio.wait_for(consumer.highwaters(*assigned), END_OFFSETS_WAIT_S)
        except Exception:  # the broker away: that is not the worker's stall, and /healthz stays up through it
            return []
        waiting = set()
        for tp, end in ends.items():
            last_read = consumer._read_offset[tp]
            if end is not None and end > (-1 if last_read is None else last_read) + 1:
                waiting.add(tp.topic)
        return [kind for kind, topic in self.sources.items() if topic in waiting and kind not in self._busy]

    def _watch(self) -> None:
        """The assignment logged and marked for ``/readyz``; a beat on the event loop every second while no agent is
        stalled (``/healthz`` fails when beats stop)."""
        app, health, group = self.app, self.health, self.app.conf.id

        @app.on_partitions_assigned.connect
        async def assigned(_app: faust.App, assigned: Set[TP], **_: object) -> None:
            sources = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned if tp.topic in self.sources.values())
            log.info("partitions assigned", extra={"group": group, "partitions": sources})
            if health is not None:
                health.mark("partitions", bool(sources))

        @app.on_partitions_revoked.connect
        async def revoked(_app: faust.App, revoked: Set[TP], **_: object) -> None:
            log.info("partitions revoked", extra={"group": group, "partitions": len(revoked)})
            if health is not None:
                health.mark("partitions", False)

        if health is None:
            return

        @app.timer(interval=1.0)
        async def heartbeat() -> None:
            stalled = await self.stalled()
            if stalled:
                log.warning("agents stalled: events wait and none is taken", extra={"agents": stalled})
                return
            health.beat()


def _acker(stream: faust.StreamT, events: Sequence[EventT]) -> Any:
    """Acknowledges ``events`` to Faust: their offsets may then be committed."""

    async def acknowledge() -> None:
        for event in events:
            await stream.ack(event)

    return acknowledge


def _table_changes(changelog: str, changes: Any) -> list[Emission]:
    """Table changes (user: (partition, value or None to delete)) as changelog records in Faust's JSON encoding."""
    return [
        Emission(
            changelog,
            json.dumps(user).encode(),
            None if value is None else json.dumps(value).encode(),  # type: ignore[arg-type]  # a tombstone
            partition=partition,
        )
        for user, (partition, value) in changes
    ]


def stage_topics(topics: TopicSettings, stages: Sequence[str]) -> list[str]:
    """The topics these stages read or write: under Kafka ACLs a worker may not even see the others."""
    used = [topics.requests, topics.model_pools, *topics.render()] if "moderation" in stages else []
    used += [getattr(topics, kind + suffix) for kind in RENDER_KINDS if kind in stages for suffix in ("", "_long")]
    if any(kind in stages for kind in RENDER_KINDS):
        used.append(topics.cancellations)
    return list(dict.fromkeys([*used, topics.experiments, topics.results, topics.metrics, topics.dead_letter]))


def run_worker(settings: Settings, stages: Sequence[str]) -> int:
    """Run a worker until SIGTERM or SIGINT, which stop the agents and commit what was processed; returns the exit
    status: 1 when a take's effects failed."""
    from pixelpipe.core import logs
    from pixelpipe.core.topics import ensure_topics, partition_count

    # SIGUSR1 writes every thread's stack to the log while models load; once Faust's worker runs, its own handler
    # adds every asyncio task's (mode's ``cry``).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    renders = any(kind in stages for kind in RENDER_KINDS)
    pool = settings.stages.pool
    if pool != DEFAULT_POOL and (not renders or "moderation" in stages):
        raise PoolConfigError(f"--pool {pool}: a pool is served by render stages; moderation routes to every pool")
    pools = read_pools(settings.kafka, settings.topics, codec_from_settings(settings.kafka)) if renders else {}
    named_topics = settings.topics  # the default pool's names, by which the lag names a topic's pool
    if renders:
        # A pool's render workers read its own render topics; made here too, as the pool asks, if not applied yet.
        settings = dataclasses.replace(settings, topics=pool_topics(settings.topics, pool))
        own = pools.get(pool)
        ensure_topics(settings.kafka, settings.topics, settings.topics.render(), own.partitions if own else None)
    # Served from the start: /healthz answers while models load; /readyz once they are warm and partitions assigned.
    health = Health(settings.ops.liveness_bound_s, ["models", "partitions"])
    server = serve(settings.ops, health)
    TELEMETRY.enable(server is not None)
    ensure_topics(settings.kafka, settings.topics, stage_topics(settings.topics, stages))
    sender = EmissionSender(settings.kafka, settings.stages.reply_timeout_ms)
    lag = None
    try:
        built = build_stages(settings, stages, pools)
        health.mark("models")
        # Only the topics these stages use: under ACLs a worker may not even see the others.
        topics = settings.topics
        tables = [topics.cancellations] if renders else []
        tables += [topics.model_pools] if "moderation" in stages else []
        pipeline = Pipeline(
            settings,
            built,
            sender,
            partition_count(settings.kafka, topics.requests) if "moderation" in stages else 1,
            health,
            {topic: partition_count(settings.kafka, topic) for topic in tables},
        )
        if server is not None:
            groups = {pipeline.app.conf.id: _sources(settings.topics, stages)}
            lag = LagMonitor(
                settings.kafka, groups, interval_s=settings.ops.lag_interval_s, topics=named_topics
            ).start()
        level = settings.logs.level.upper()
        # Faust's worker sets logging up again, from this: the same JSON lines as the rest of pixelpipe.
        worker = faust.Worker(pipeline.app, quiet=True, loglevel=level, logging_config=logs.dict_config(level))
        # Faust's terminal spinner turns every log record into a spin, setting the root logger to DEBUG: each debug
        # line of aiokafka, Faust and mode then builds a record, about a tenth of the consumer thread's time.
        worker.spinner = None
        log.info("worker starting", extra={"group": pipeline.app.conf.id, "topics": list(pipeline.sources.values())})
        with contextlib.suppress(SystemExit):  # Faust has stopped the agents, committed and closed its clients
            worker.execute_from_commandline()
        log.info("worker stopped", extra={"group": pipeline.app.conf.id})
        status = 1 if pipeline.failed else 0
        if pipeline.abandoned_model_call:
            # Offsets are committed and nothing of that call was acknowledged; the interpreter would wait for its
            # thread at exit, for as long as the call runs.
            log.warning("a model call did not reach a denoising step in time; exiting without it")
            sender.close()
            logging.shutdown()
            os._exit(status)
        return status
    finally:
        sender.close()
        if lag is not None:
            lag.close()
        if server is not None:
            server.close()


def _sources(topics: TopicSettings, stages: Sequence[str]) -> list[str]:
    """The topics these stages consume."""
    names = {"moderation": topics.requests, "generate": topics.generate, "edit": topics.edit}
    return [names[stage] for stage in STAGES if stage in stages]
