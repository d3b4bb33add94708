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
from the request id, so a redelivered request is deduplicated downstream. Stages are built, models loaded and
warmed, before the worker joins its group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import faust
from aiokafka import AIOKafkaConsumer
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, EventT, Message

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.settings import KafkaSettings, Settings, StageSettings, TopicSettings
from pixelpipe.core.telemetry import Health, LagMonitor, serve
from pixelpipe.processors.limits import UserLimits
from pixelpipe.processors.sender import EmissionSender
from pixelpipe.processors.stages import (
    EditStage,
    Emission,
    GenerateStage,
    Inbound,
    ModerationStage,
    RenderStage,
    StageContext,
)
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.processors.takes import InOrderAcknowledgement, in_thread, render_take
from pixelpipe.processors.telemetry import TELEMETRY

if TYPE_CHECKING:
    from pixelpipe.processors.models import DiffusionModels

log = logging.getLogger(__name__)
Stage = ModerationStage | RenderStage

STAGES = ("moderation", "generate", "edit")
LONG = "-long"  # a render stage's long lane is built and run as "<kind>-long", on the kind's long topic
RENDER_STAGES: dict[str, type[RenderStage]] = {"generate": GenerateStage, "edit": EditStage}
LOG_APPEND_TIME = 1  # a record's timestamp type when the broker set it
# Longest a fetch waits at the broker for records; an empty fetch costs the worker about 1 ms, so the hundred a
# second of an idle worker take about a tenth of a core.
FETCH_MAX_WAIT_MS = 10
# What a fetch waits for, up to FETCH_MAX_WAIT_MS. With aiokafka's 1 byte, at a steady few hundred requests/s every
# fetch came back with a record or two: the fetches alone kept the worker busy and its queues grew (p50 468 ms at
# 450 requests/s); gathering up to 64 KB cut that to 73-96 ms (benchmarks/pipeline.py), for at most 10 ms a hop.
FETCH_MIN_BYTES = 64 * 1024
USER_LIMITS_TABLE = "user-limits"
END_OFFSETS_WAIT_S = 5.0  # longest the stall check waits for the broker's end offsets
# Faust keeps a directory per app even for memory tables, by default in the working directory (the user's checkout,
# the container's root); nothing in it outlives the worker.
FAUST_DATA_DIR = Path(tempfile.gettempdir()) / "pixelpipe-faust"
IDLE_SWEEP_S = 30.0  # how often moderation forgets the users whose buckets are full again


def worker_id(settings: Settings) -> str:
    return settings.stages.worker_id or f"{socket.gethostname()}-{os.getpid()}"


def group_id(settings: Settings, stages: Sequence[str]) -> str:
    """Workers running the same stages form one consumer group (Faust's app id)."""
    return f"{settings.stages.consumer_group}-" + "-".join(s for s in STAGES if s in stages)


def broker_url(kafka: KafkaSettings) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in kafka.bootstrap.split(","))


def broker_credentials(kafka: KafkaSettings) -> Any:
    """The SASL and TLS settings of ``KafkaSettings.client_config`` in the form Faust (aiokafka) takes; None for
    PLAINTEXT."""
    protocol = kafka.security_protocol.upper()
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=kafka.ssl_ca_location or None)
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password,
            mechanism=kafka.sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    return faust.SSLCredentials(context) if context else None


class _PromptFetchConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: aiokafka_driver.Transport) -> AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Faust fixes aiokafka's fetch wait at 1500 ms. aiokafka keeps one fetch in flight per broker, leaving out
        # the partitions whose records are not all read yet, so a message that arrives on one of those waited for
        # the fetch in flight to time out: up to 1.5 s at each stage at low rates. (Both set before the consumer
        # starts, which is when aiokafka reads them.)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        consumer._fetch_min_bytes = FETCH_MIN_BYTES
        return consumer


class _PipelineConsumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> aiokafka_driver.AIOKafkaConsumerThread:
        return _PromptFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def ack(self, message: Message) -> bool:
        # Faust acknowledges the events a stream skips (fetched under an older assignment, or met while a rebalance
        # holds the flow) as if they were processed, and a rebalance's commit then moved partitions past requests
        # nobody had rendered. An event no stream took is left unacknowledged: it is read again from the committed
        # offset, here or by the partition's next owner.
        if not message.tracked:
            return False
        return bool(super().ack(message))

    def hand_back(self, messages: Sequence[Message]) -> None:
        """Messages a stopping agent leaves unprocessed: never acknowledged, so no commit passes them and the
        partition's next owner reads them again, and not waited for by the stop (Faust's ``wait_empty`` waits for
        every message taken to be acknowledged)."""
        self._unacked_messages.difference_update(messages)

    async def on_partitions_revoked(self, revoked: Set[TP]) -> None:
        # Faust forgets the revoked partitions' acknowledged offsets before it waits for the streams and commits, so
        # the takes acknowledged since the last commit (up to broker_commit_interval of them) were delivered again
        # after every rebalance: moderated and rendered twice. They are committed first; what the takes in flight
        # acknowledge later, the wait that follows commits (stream_wait_empty).
        await self.maybe_wait_for_commit_to_finish()
        await self.force_commit(revoked)
        await super().on_partitions_revoked(revoked)

    async def perform_seek(self) -> None:
        # Faust's recovery resumes the stream partitions, then seeks them to their committed offsets, with the fetcher
        # already running (for the changelogs): what it delivered meanwhile was delivered again after the seek, and a
        # worker taking partitions over moderated and rendered part of its first takes twice. They wait for the seek.
        held = {tp for tp in self._get_active_partitions() if not self._is_changelog_tp(tp)}
        self.pause_partitions(held)
        try:
            await super().perform_seek()
        finally:
            self.resume_partitions(held)


class _PromptFetchTransport(aiokafka_driver.Transport):
    Consumer = _PipelineConsumer


class SharedGlobalTable(faust.GlobalTable):
    """A global table over a topic of its own name, which apps of every consumer group read (the cancellations).
    Faust's assignor looks a global table's changelog up under the app's default name, whatever topic the table was
    given, and fails the assignment (silently: the worker then waits for partitions forever)."""

    def _changelog_topic_name(self) -> str:
        return self.changelog_topic.get_topic_name()


class PipelineApp(faust.App):
    """Faust's app, whose consumer fetches with a wait of ``FETCH_MAX_WAIT_MS`` and acknowledges only events a
    stream took."""

    def _new_transport(self) -> faust.types.TransportT:
        return _PromptFetchTransport(self.conf.broker_consumer, self)


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


def build_stages(settings: Settings, names: Sequence[str]) -> dict[str, Stage]:
    """Build the named stages, models loaded and warmed: done before the worker joins its consumer group, so
    partitions are never assigned to a worker that cannot serve them yet. The render stages share one
    ``DiffusionModels``, so a model both use is loaded once. Each render stage also gets its long lane
    ("generate-long", "edit-long"): a stage of its own on a lane of those models (``DiffusionModels.lane``: the
    same weights, its own pipelines and lock), so a long request renders beside the short ones."""
    unknown = sorted(set(names) - set(STAGES))
    if unknown or not names:
        raise ValueError(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    context = StageContext(
        settings.topics,
        settings.limits,
        settings.stages,
        codec_from_settings(settings.kafka),
        worker_id(settings),
        ModerationStamp(settings.moderation.stamp_key),
    )
    started_s = time.perf_counter()
    built: dict[str, Stage] = {}
    if "moderation" in names:
        built["moderation"] = _moderation_stage(settings, context)
    render_kinds = [kind for kind in RENDER_STAGES if kind in names]
    if render_kinds:
        models = _diffusion_models(settings)
        # Every model loaded, compiled and warmed: a rebalance never meets a compile stall.
        TELEMETRY.models_ready(models.warm_up())
        lane = models.lane()
        for kind in render_kinds:
            built[kind] = _render_stage(RENDER_STAGES[kind], settings, context, models)
            built[kind + LONG] = _render_stage(RENDER_STAGES[kind], settings, context, lane)
    log.info("stages ready", extra={"stages": list(built), "seconds": round(time.perf_counter() - started_s, 3)})
    return built


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
        cancellation_partitions: int = 1,
    ) -> None:
        self.settings = settings
        self.cancellation_partitions = cancellation_partitions
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
        self.cancellations: faust.GlobalTable | None = None
        for kind, topic in self.sources.items():
            stage = stages[kind]
            if isinstance(stage, ModerationStage):
                self._add_moderation_agent(stage, topic, partitions)
            elif isinstance(stage, RenderStage):
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
                TELEMETRY.events_in("moderation", len(events))
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
        cancellations = self._cancellations()
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
                TELEMETRY.events_in(kind, len(events))
                take = await render_take(
                    stage, [inbound(e) for e in events], self.sender.send_all, model_thread, finishing_thread
                )
                self.abandoned_model_call |= take.abandoned
                done = [e for e in events if (e.message.partition, e.message.offset) not in take.handed_back]
                if take.handed_back:
                    consumer = cast(_PipelineConsumer, self.app.consumer)
                    consumer.hand_back([e.message for e in events if e not in done])
                # Busy until the take before is done too: a storage outage holds the agent here, retrying, which is
                # no stall.
                await acknowledgement.after(self._guarded(take.sent), _acker(stream, done))
                self._ended(kind)
                yield None
            await acknowledgement.close()

    def _cancellations(self) -> faust.GlobalTable:
        if self.cancellations is None:
            # Every render worker reads the whole compacted topic: cancellations are few and small.
            self.cancellations = self.app.GlobalTable(
                "cancellations",
                key_type=bytes,  # raw: keys are request ids as the publishers wrote them
                value_type=bytes,
                changelog_topic=self._topic(self.settings.topics.cancellations),
                partitions=self.cancellation_partitions,
                # faust-streaming's advice for a global table read by several instances: without it a worker can
                # loop in recovery.
                recovery_buffer_size=1,
            )
        return self.cancellations

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


def _moderation_stage(settings: Settings, context: StageContext) -> ModerationStage:
    from pixelpipe.core.experiments import load_experiments
    from pixelpipe.core.objects import open_object_store
    from pixelpipe.processors.models import ModelRegistry
    from pixelpipe.processors.moderation import ImageModerator, ModerationPolicy, PromptModerator

    policy = ModerationPolicy.from_file(settings.moderation.policy or None)
    # The registry's entries (no weights) and the experiments give each request's compute, as the renderers will
    # resolve it: for the per-request and per-user budgets and the long lane.
    registry_file, experiments_file = Path(settings.models.registry), Path(settings.experiments.file)
    registry = ModelRegistry.load(registry_file) if registry_file.exists() else None
    if registry is None:
        log.warning(
            "no model registry: moderation counts no compute (no per-user compute budget, no long lane); the render "
            "stages still check the per-request budget",
            extra={"registry": str(registry_file)},
        )
    return ModerationStage(
        context,
        settings.moderation,
        PromptModerator(policy),
        ImageModerator(policy, detector=settings.moderation.image_detector),
        open_object_store(settings.objects),
        registry,
        load_experiments(experiments_file) if experiments_file.exists() else {},
    )


def _diffusion_models(settings: Settings) -> DiffusionModels:
    import diffusers
    import transformers

    from pixelpipe.processors.models import DiffusionModels

    # Worker logs are structured lines: no progress bars, no advice about optional packages.
    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()
    return DiffusionModels.from_file(settings.models.registry)


def _render_stage(
    stage: type[RenderStage], settings: Settings, context: StageContext, models: DiffusionModels
) -> RenderStage:
    from pixelpipe.core.experiments import load_experiments
    from pixelpipe.core.objects import open_object_store
    from pixelpipe.processors.moderation import ImageModerator, ModerationPolicy

    policy = ModerationPolicy.from_file(settings.moderation.policy or None)
    experiments_file = Path(settings.experiments.file)
    return stage(
        context,
        models,
        ImageModerator(policy, detector=settings.moderation.image_detector),
        open_object_store(settings.objects),
        load_experiments(experiments_file) if experiments_file.exists() else {},
    )


def stage_topics(topics: TopicSettings, stages: Sequence[str]) -> list[str]:
    """The topics these stages read or write: under Kafka ACLs a worker may not even see the others."""
    used = [topics.requests, *topics.render()] if "moderation" in stages else []
    used += [getattr(topics, kind + suffix) for kind in RENDER_STAGES if kind in stages for suffix in ("", "_long")]
    if any(kind in stages for kind in RENDER_STAGES):
        used.append(topics.cancellations)
    return list(dict.fromkeys([*used, topics.results, topics.metrics, topics.dead_letter]))


def run_worker(settings: Settings, stages: Sequence[str]) -> int:
    """Run a worker until SIGTERM or SIGINT, which stop the agents and commit what was processed; returns the exit
    status: 1 when a take's effects failed."""
    from pixelpipe.core import logs
    from pixelpipe.core.topics import ensure_topics, partition_count

    # Served from the start: /healthz answers while models load; /readyz once they are warm and partitions assigned.
    health = Health(settings.ops.liveness_bound_s, ["models", "partitions"])
    server = serve(settings.ops, health)
    TELEMETRY.enable(server is not None)
    ensure_topics(settings.kafka, settings.topics, stage_topics(settings.topics, stages))
    sender = EmissionSender(settings.kafka, settings.stages.reply_timeout_ms)
    lag = None
    try:
        built = build_stages(settings, stages)
        health.mark("models")
        # Only the topics these stages use: under ACLs a worker may not even see the others.
        topics, renders = settings.topics, any(kind in stages for kind in RENDER_STAGES)
        pipeline = Pipeline(
            settings,
            built,
            sender,
            partition_count(settings.kafka, topics.requests) if "moderation" in stages else 1,
            health,
            partition_count(settings.kafka, topics.cancellations) if renders else 1,
        )
        if server is not None:
            groups = {pipeline.app.conf.id: _sources(settings.topics, stages)}
            lag = LagMonitor(settings.kafka, groups, interval_s=settings.ops.lag_interval_s).start()
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
