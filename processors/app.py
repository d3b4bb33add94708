"""The Faust app: the pipeline's topics and agents, in one place.

Messages are raw bytes on every topic and are decoded by the foundation's codec inside the stages, so an
undecodable message is dead-lettered with its original bytes instead of being dropped by a deserializer.
Model and detector calls never run on the event loop: each stage runs in its own single-thread executor and
the agent awaits it, so Kafka heartbeats and polls keep going while a batch renders. An agent's events are
acknowledged (and their offsets become committable) only after everything they emit was acknowledged by the
broker, so a crash redelivers instead of losing; result and metric ids derive from the request id, so a
redelivered request is deduplicated downstream.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faust
from faust.types import EventT

from pixelpipe.config import Settings, faust_broker_credentials
from pixelpipe.processors.stages import Emission, Inbound, ModerationStage, RenderStage
from pixelpipe.schemas.codec import Codec

STAGES = ("moderation", "generate", "edit")


def worker_id(settings: Settings) -> str:
    return settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"


def broker_url(settings: Settings) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(","))


def inbound(event: EventT) -> Inbound:
    message = event.message
    return Inbound(message.value, message.key, message.topic, message.partition, message.offset, message.timestamp)


def create_app(settings: Settings, stages: Sequence[str]) -> faust.App:
    """A Faust app running ``stages``; workers with the same stages form one consumer group."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise ValueError(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    app = faust.App(
        f"{settings.consumer_group}-" + "-".join(s for s in STAGES if s in stages),
        broker=broker_url(settings),
        broker_credentials=faust_broker_credentials(settings),
        web_enabled=False,
        store="memory://",
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # Model calls never block the loop, so heartbeats flow during a batch and a dead worker can be noticed
        # in 10 s rather than Faust's default 60 s.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        broker_commit_every=100,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(64, settings.max_batch * 8),
    )

    def topic(name: str) -> faust.TopicT:
        return app.topic(name, key_serializer="raw", value_serializer="raw")

    codec = Codec()
    me = worker_id(settings)

    async def send_all(emissions: list[Emission]) -> None:
        # Wait for the broker's acknowledgement of every emission before the input counts as processed.
        pending = [await topic(e.topic).send(key=e.key, value=e.value) for e in emissions]
        await asyncio.gather(*pending)

    if "moderation" in stages:
        executor = ThreadPoolExecutor(1, thread_name_prefix="moderation")
        stage_holder: list[ModerationStage] = []

        @app.agent(topic(settings.topic_requests), name="moderation")
        async def moderate(stream: faust.StreamT) -> AsyncIterator[None]:
            stage = await _build(executor, lambda: _moderation_stage(settings, codec, me), stage_holder)
            async for event in stream.events():
                await send_all(await _run(executor, stage.handle, inbound(event)))
                yield None

    for kind, topic_name in (("generate", settings.topic_generate), ("edit", settings.topic_edit)):
        if kind in stages:
            _add_render_agent(app, topic(topic_name), kind, settings, codec, me, send_all)
    return app


def _add_render_agent(
    app: faust.App,
    source: faust.TopicT,
    kind: str,
    settings: Settings,
    codec: Codec,
    me: str,
    send_all: Callable[[list[Emission]], Any],
) -> None:
    executor = ThreadPoolExecutor(1, thread_name_prefix=kind)
    stage_holder: list[RenderStage] = []

    @app.agent(source, name=kind)
    async def render(stream: faust.StreamT) -> AsyncIterator[None]:
        stage = await _build(executor, lambda: _render_stage(kind.upper(), settings, codec, me), stage_holder)
        # Faust's time-bounded take is the dynamic batcher: up to max_batch events, or what came in max_wait_ms.
        async for events in stream.take_events(settings.max_batch, within=settings.max_wait_ms / 1000):
            await send_all(await _run(executor, stage.handle_batch, [inbound(e) for e in events]))
            yield None


async def _run(executor: ThreadPoolExecutor, function: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(executor, function, *args)


async def _build(executor: ThreadPoolExecutor, factory: Callable[[], Any], holder: list[Any]) -> Any:
    """Build a stage once per worker, off the event loop (models and detectors take seconds to load)."""
    if not holder:
        holder.append(await _run(executor, factory))
    return holder[0]


def _moderation_stage(settings: Settings, codec: Codec, me: str) -> ModerationStage:
    from pixelpipe.processors.moderation import ImageModerator, ModerationPolicy, PromptModerator
    from pixelpipe.sinks.objects import open_object_store

    policy = ModerationPolicy.from_file(settings.moderation_policy or None)
    return ModerationStage(
        settings, codec, PromptModerator(policy), ImageModerator(policy), open_object_store(settings), me
    )


def _render_stage(kind: str, settings: Settings, codec: Codec, me: str) -> RenderStage:
    import diffusers
    import transformers

    from pixelpipe.processors.models import DiffusionModels
    from pixelpipe.processors.moderation import ImageModerator, ModerationPolicy
    from pixelpipe.producers.experiments import load_experiments
    from pixelpipe.sinks.objects import open_object_store

    # Worker logs are structured lines: no progress bars, no advice about optional packages.
    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()
    policy = ModerationPolicy.from_file(settings.moderation_policy or None)
    experiments_file = Path(settings.experiments_file)
    return RenderStage(
        kind,
        settings,
        codec,
        DiffusionModels.from_file(settings.model_registry),
        ImageModerator(policy),
        open_object_store(settings),
        me,
        load_experiments(experiments_file) if experiments_file.exists() else {},
    )


def run_worker(settings: Settings, stages: Sequence[str]) -> None:
    """Run a worker until SIGTERM or SIGINT, which stop the agents and commit what was processed."""
    from pixelpipe import logs
    from pixelpipe.topics import ensure_topics

    ensure_topics(settings)
    app = create_app(settings, stages)
    level = settings.log_level.upper()
    worker = faust.Worker(app, quiet=True, loglevel=level, logging_config=logs.dict_config(level))
    worker.execute_from_commandline()
