"""The Faust app: the pipeline's topics and agents, in one place.

Messages are raw bytes on every topic and are decoded by the foundation's codec inside the stages, so an
undecodable message is dead-lettered with its original bytes instead of being dropped by a deserializer.
Model and detector calls never run on the event loop: each stage runs in its own single-thread executor and
the agent awaits it, so Kafka heartbeats and polls keep going while a batch renders. An agent's events are
acknowledged (and their offsets become committable) only after everything they emit was acknowledged by the
broker, so a crash redelivers instead of losing; result and metric ids derive from the request id, so a
redelivered request is deduplicated downstream. Stages are built, models loaded and warmed, before the worker
joins its group. Each render stage has a long lane beside it: an agent on its kind's long topic, where moderation
sends the requests over PIXELPIPE_LONG_REQUEST_COMPUTE, with its own executor and models that share the weights.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faust
from aiokafka import AIOKafkaConsumer
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import EventT

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.settings import KafkaSettings, Settings, StageSettings, TopicSettings
from pixelpipe.core.telemetry import Health, LagMonitor, serve
from pixelpipe.processors.sender import EmissionSender
from pixelpipe.processors.stages import (
    EditStage,
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
LOG_APPEND_TIME = 1  # a record's timestamp type when the broker set it
# Longest a fetch waits at the broker for records; an empty fetch costs the worker about 1 ms, so the hundred a
# second of an idle worker take about a tenth of a core.
FETCH_MAX_WAIT_MS = 10
# What a fetch waits for, up to FETCH_MAX_WAIT_MS. With aiokafka's 1 byte, at a steady few hundred requests/s every
# fetch came back with a record or two: the fetches alone kept the worker busy and its queues grew (p50 468 ms at
# 450 requests/s); gathering up to 64 KB cut that to 73-96 ms (benchmarks/pipeline.py), for at most 10 ms a hop.
FETCH_MIN_BYTES = 64 * 1024
RENDER_STAGES: dict[str, type[RenderStage]] = {"generate": GenerateStage, "edit": EditStage}


def worker_id(settings: Settings) -> str:
    return settings.stages.worker_id or f"{socket.gethostname()}-{os.getpid()}"


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


class _PromptFetchConsumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> aiokafka_driver.AIOKafkaConsumerThread:
        return _PromptFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _PromptFetchTransport(aiokafka_driver.Transport):
    Consumer = _PromptFetchConsumer


class PipelineApp(faust.App):
    """Faust's app, whose consumer fetches with a wait of ``FETCH_MAX_WAIT_MS``."""

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


def create_app(settings: Settings, stages: Mapping[str, Stage], sender: EmissionSender) -> faust.App:
    """A Faust app running the built ``stages``, which send what they emit with ``sender``; workers with the same
    stages form one consumer group."""
    app = PipelineApp(
        f"{settings.stages.consumer_group}-" + "-".join(s for s in STAGES if s in stages),
        broker=broker_url(settings.kafka),
        broker_credentials=broker_credentials(settings.kafka),
        web_enabled=False,
        store="memory://",
        topic_partitions=settings.topics.partitions,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # Model calls never block the loop, so heartbeats flow during a batch and a dead worker can be noticed
        # in 10 s rather than Faust's default 60 s.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        broker_commit_every=100,
        broker_commit_interval=1.0,
        # Room for a few takes, so the next one is ready when one is taken.
        stream_buffer_maxsize=max(64, settings.stages.take_events * 4, settings.stages.moderation_take_events * 2),
    )

    def topic(name: str) -> faust.TopicT:
        return app.topic(name, key_serializer="raw", value_serializer="raw")

    stage_settings = settings.stages
    moderation = stages.get("moderation")
    if isinstance(moderation, ModerationStage):
        executor = ThreadPoolExecutor(1, thread_name_prefix="moderation")

        @app.agent(topic(settings.topics.requests), name="moderation")
        async def moderate(stream: faust.StreamT) -> AsyncIterator[None]:
            # Taken without Faust's acknowledgement: a take is acknowledged once the broker acknowledged all it
            # emits, while the next take is moderated.
            take, within_s = stage_settings.moderation_take_events, stage_settings.moderation_max_wait_ms / 1000
            acknowledgement = InOrderAcknowledgement("moderation")
            async for events in stream.noack_take(take, within=within_s):
                TELEMETRY.events_in("moderation", len(events))
                emissions = await in_thread(executor, moderation.handle_batch, [inbound(e) for e in events])
                await acknowledgement.after(asyncio.ensure_future(sender.send_all(emissions)), acker(stream, events))
                yield None
            await acknowledgement.close()

    # The long lanes are agents of the same app (so of its consumer group), each on its own topic, with an executor
    # and models of its own, so a long request never holds the short ones behind it.
    topics = settings.topics
    for kind, topic_name in (
        ("generate", topics.generate),
        ("edit", topics.edit),
        ("generate" + LONG, topics.generate_long),
        ("edit" + LONG, topics.edit_long),
    ):
        stage = stages.get(kind)
        if isinstance(stage, RenderStage):
            _add_render_agent(app, topic(topic_name), kind, stage, stage_settings, sender)
    return app


def _add_render_agent(
    app: faust.App,
    source: faust.TopicT,
    kind: str,
    stage: RenderStage,
    stage_settings: StageSettings,
    sender: EmissionSender,
) -> None:
    stage.preview_sink = sender.send_preview  # previews of images in progress go to reply topics
    model_thread = ThreadPoolExecutor(1, thread_name_prefix=kind)
    finishing_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{kind}-finish")

    @app.agent(source, name=kind)
    async def render(stream: faust.StreamT) -> AsyncIterator[None]:
        # Faust's time-bounded take gathers the events the stage groups into batches: up to take_events, or what
        # came in max_wait_ms. Taken without Faust's acknowledgement: a take is acknowledged once its last chunk is
        # finished (its emissions acknowledged by the broker), while the next take renders.
        take, within_s = stage_settings.take_events, stage_settings.max_wait_ms / 1000
        acknowledgement = InOrderAcknowledgement(kind)
        async for events in stream.noack_take(take, within=within_s):
            TELEMETRY.events_in(kind, len(events))
            messages = [inbound(e) for e in events]
            finished = await render_take(
                stage, messages, sender.send_all, model_thread, finishing_thread, lambda: app.should_stop
            )
            if finished is None:  # the worker stops: Faust waits for what is acknowledged, not for this take
                break
            await acknowledgement.after(finished, acker(stream, events))
            yield None
        await acknowledgement.close()


def acker(stream: faust.StreamT, events: Sequence[EventT]) -> Callable[[], Awaitable[None]]:
    """Acknowledges ``events`` to Faust: their offsets may then be committed."""

    async def acknowledge() -> None:
        for event in events:
            await stream.ack(event)

    return acknowledge


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
    return list(dict.fromkeys([*used, topics.results, topics.metrics, topics.dead_letter]))


def watch_health(app: faust.App, health: Health) -> None:
    """A heartbeat on the event loop every second (``/healthz`` fails when it stops), and partitions assigned
    for ``/readyz``."""

    @app.timer(interval=1.0)
    async def heartbeat() -> None:
        health.beat()

    @app.on_partitions_assigned.connect
    async def assigned(_app: faust.App, _assigned: object, **_: object) -> None:
        health.mark("partitions")

    @app.on_partitions_revoked.connect
    async def revoked(_app: faust.App, _revoked: object, **_: object) -> None:
        health.mark("partitions", False)


def run_worker(settings: Settings, stages: Sequence[str]) -> None:
    """Run a worker until SIGTERM or SIGINT, which stop the agents and commit what was processed."""
    from pixelpipe.core import logs
    from pixelpipe.core.topics import ensure_topics

    level = settings.logs.level.upper()
    # Served from the start: /healthz answers while models load; /readyz once they are warm and partitions assigned.
    health = Health(settings.ops.liveness_bound_s, ["models", "partitions"])
    server = serve(settings.ops, health)
    TELEMETRY.enable(server is not None)
    ensure_topics(settings.kafka, settings.topics, stage_topics(settings.topics, stages))
    sender = EmissionSender(settings.kafka, settings.stages.reply_timeout_ms)
    built = build_stages(settings, stages)
    health.mark("models")
    app = create_app(settings, built, sender)
    watch_health(app, health)
    lag = None
    if server is not None:
        groups = {app.conf.id: _sources(settings.topics, stages)}
        lag = LagMonitor(settings.kafka, groups, interval_s=settings.ops.lag_interval_s).start()
    worker = faust.Worker(app, quiet=True, loglevel=level, logging_config=logs.dict_config(level))
    # Faust's terminal spinner turns every log record into a spin, setting the root logger to DEBUG: each debug
    # line of aiokafka, Faust and mode then builds a record, about a tenth of the consumer thread's time.
    worker.spinner = None
    try:
        worker.execute_from_commandline()
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
