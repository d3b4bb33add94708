"""The worker: the pipeline's agents over their topics, in one place.

Messages are raw bytes on every topic and are decoded by the foundation's codec inside the stages, so an
undecodable message is dead-lettered with its original bytes instead of being dropped by a deserializer.
Model and detector calls never run on the event loop: each stage runs in its own single-thread executor and
the agent awaits it, so polls keep going while a batch renders. An agent's takes are acknowledged (and their offsets
become committable) only after everything they emit was acknowledged by the broker, so a crash redelivers instead of
losing; result and metric ids derive from the request id, so a redelivered request is deduplicated downstream.
Stages are built, models loaded and warmed, before the worker joins its group. Each render stage has a long lane
beside it: an agent on its kind's long topic, where moderation sends the requests over
PIXELPIPE_LONG_REQUEST_COMPUTE, with its own executor and models that share the weights.

Kafka is consumed with librdkafka (``processors/streams.py``) and written with it (``processors/sender.py``); the
agents were Faust's until Faust's consumer path took over half the worker's Python time (see the README).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.settings import Settings, TopicSettings
from pixelpipe.core.telemetry import Health, LagMonitor, serve
from pixelpipe.processors.sender import EmissionSender
from pixelpipe.processors.stages import (
    EditStage,
    GenerateStage,
    ModerationStage,
    RenderStage,
    StageContext,
)
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.processors.streams import Take, WorkerConsumer
from pixelpipe.processors.takes import InOrderAcknowledgement, in_thread, render_take
from pixelpipe.processors.telemetry import TELEMETRY

if TYPE_CHECKING:
    from pixelpipe.processors.models import DiffusionModels

log = logging.getLogger(__name__)
Stage = ModerationStage | RenderStage

STAGES = ("moderation", "generate", "edit")
LONG = "-long"  # a render stage's long lane is built and run as "<kind>-long", on the kind's long topic
RENDER_STAGES: dict[str, type[RenderStage]] = {"generate": GenerateStage, "edit": EditStage}
HEARTBEAT_S = 1.0


def worker_id(settings: Settings) -> str:
    return settings.stages.worker_id or f"{socket.gethostname()}-{os.getpid()}"


def group_id(settings: Settings, stages: Sequence[str]) -> str:
    """Workers running the same stages form one consumer group."""
    return f"{settings.stages.consumer_group}-" + "-".join(s for s in STAGES if s in stages)


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


class Worker:
    """The built ``stages`` as agents over their topics, consumed by one ``WorkerConsumer``; what they emit goes out
    through ``sender``. ``run`` returns once a stop was asked (``stop``) and every agent has finished its take."""

    def __init__(
        self, settings: Settings, stages: Mapping[str, Stage], sender: EmissionSender, health: Health | None = None
    ) -> None:
        self.settings = settings
        self.stages = stages
        self.sender = sender
        self.health = health
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
        # Room for a few takes, so the next one is ready when one is taken.
        capacity = max(64, settings.stages.take_events * 4, settings.stages.moderation_take_events * 2)
        self.consumer = WorkerConsumer(
            settings.kafka,
            group_id(settings, list(stages)),
            worker_id(settings),
            dict.fromkeys(self.sources.values(), capacity),
            self._assignment,
        )
        self.failed = False

    def _assignment(self, assigned: bool) -> None:
        if self.health is not None:
            self.health.mark("partitions", assigned)

    def stop(self) -> None:
        self.consumer.stop()

    async def run(self) -> None:
        agents = [asyncio.ensure_future(self._agent(kind, topic)) for kind, topic in self.sources.items()]
        polling = asyncio.ensure_future(self.consumer.run())
        polling.add_done_callback(lambda _: self.consumer.stop())  # a consumer that failed stops the agents
        beating = asyncio.ensure_future(self._heartbeat())
        await asyncio.gather(*agents, return_exceptions=True)  # each agent logs its own failure
        self.consumer.stop()
        try:
            await polling
        except Exception:
            log.exception("the consumer failed; the worker stops")
            self.failed = True
        beating.cancel()

    async def _agent(self, kind: str, topic: str) -> None:
        stage = self.stages[kind]
        try:
            if isinstance(stage, ModerationStage):
                await self._moderate(stage, topic)
            else:
                await self._render(kind, stage, topic)
        except Exception:
            # A take's effects failed (the broker refused them after librdkafka's retries): stop the worker with
            # the take unacknowledged, to be delivered again.
            log.exception("agent failed; the worker stops", extra={"stage": kind})
            self.failed = True
            self.consumer.stop()
            raise

    async def _moderate(self, stage: ModerationStage, topic: str) -> None:
        # A take is acknowledged once the broker acknowledged all it emits, while the next take is moderated.
        executor = ThreadPoolExecutor(1, thread_name_prefix="moderation")
        acknowledgement = InOrderAcknowledgement("moderation")
        within_s = self.settings.stages.moderation_max_wait_ms / 1000
        async for take in self.consumer.takes(topic, self.settings.stages.moderation_take_events, within_s):
            TELEMETRY.events_in("moderation", len(take.messages))
            emissions = await in_thread(executor, stage.handle_batch, take.messages)
            await acknowledgement.after(asyncio.ensure_future(self.sender.send_all(emissions)), self._acker(take))
        await acknowledgement.close()

    async def _render(self, kind: str, stage: RenderStage, topic: str) -> None:
        # Takes of up to take_events, or what came in max_wait_ms, which the stage groups into batches. A take is
        # acknowledged once its last chunk is finished (its emissions acknowledged by the broker), while the next
        # take renders.
        stage.preview_sink = self.sender.send_preview  # previews of images in progress go to reply topics
        model_thread = ThreadPoolExecutor(1, thread_name_prefix=kind)
        finishing_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{kind}-finish")
        acknowledgement = InOrderAcknowledgement(kind)
        within_s = self.settings.stages.max_wait_ms / 1000
        async for take in self.consumer.takes(topic, self.settings.stages.take_events, within_s):
            TELEMETRY.events_in(kind, len(take.messages))
            finished = await render_take(
                stage,
                take.messages,
                self.sender.send_all,
                model_thread,
                finishing_thread,
                lambda: self.consumer.stopping,
            )
            if finished is None:  # the worker stops: the take, never acknowledged, is delivered again
                break
            await acknowledgement.after(finished, self._acker(take))
        await acknowledgement.close()

    def _acker(self, take: Take) -> Callable[[], Awaitable[None]]:
        async def acknowledge() -> None:
            self.consumer.acknowledge(take)

        return acknowledge

    async def _heartbeat(self) -> None:
        """A beat on the event loop every second: ``/healthz`` fails when it stops."""
        while self.health is not None:
            self.health.beat()
            await asyncio.sleep(HEARTBEAT_S)


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


def run_worker(settings: Settings, stages: Sequence[str]) -> int:
    """Run a worker until SIGTERM or SIGINT, which stop the agents and commit what was processed; returns the exit
    status: 1 when an agent failed."""
    from pixelpipe.core.topics import ensure_topics

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
        worker = Worker(settings, built, sender, health)
        if server is not None:
            groups = {worker.consumer.group_id: _sources(settings.topics, stages)}
            lag = LagMonitor(settings.kafka, groups, interval_s=settings.ops.lag_interval_s).start()
        asyncio.run(_until_signalled(worker))
        return 1 if worker.failed else 0
    finally:
        sender.close()
        if lag is not None:
            lag.close()
        if server is not None:
            server.close()


async def _until_signalled(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    log.info("worker started", extra={"group": worker.consumer.group_id, "topics": list(worker.sources.values())})
    await worker.run()
    log.info("worker stopped", extra={"group": worker.consumer.group_id})


def _sources(topics: TopicSettings, stages: Sequence[str]) -> list[str]:
    """The topics these stages consume."""
    names = {"moderation": topics.requests, "generate": topics.generate, "edit": topics.edit}
    return [names[stage] for stage in STAGES if stage in stages]
