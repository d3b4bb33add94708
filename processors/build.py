"""The stages a worker runs, built before it joins its consumer group: models loaded and warmed, so partitions are
never assigned to a worker that cannot serve them yet.

The render side (``processors.render``, torch and diffusers) is imported only when a render stage is built: a
moderation-only worker never imports torch.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.pools import Pool, pool_models
from pixelpipe.core.settings import Settings
from pixelpipe.processors.messages import StageContext
from pixelpipe.processors.moderation_stage import ModerationStage
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.processors.telemetry import TELEMETRY

if TYPE_CHECKING:
    from pixelpipe.processors.models import DiffusionModels
    from pixelpipe.processors.render import RenderStage

    Stage = ModerationStage | RenderStage

log = logging.getLogger(__name__)

STAGES = ("moderation", "generate", "edit")
RENDER_KINDS = STAGES[1:]  # built by _render_stage, which imports the render side
LONG = "-long"  # a render stage's long lane is built and run as "<kind>-long", on the kind's long topic


def worker_id(settings: Settings) -> str:
    return settings.stages.worker_id or f"{socket.gethostname()}-{os.getpid()}"


def build_stages(settings: Settings, names: Sequence[str], pools: Mapping[str, Pool] | None = None) -> dict[str, Stage]:
    """Build the named stages, models loaded and warmed: done before the worker joins its consumer group, so
    partitions are never assigned to a worker that cannot serve them yet. A render worker warms the models of its
    pool (``settings.stages.pool`` in ``pools``, the pools in force): with none configured, the whole registry; a
    model moved into its pool later is loaded on its first request. The render stages share one
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
        settings.stages.pool,
    )
    started_s = time.perf_counter()
    built: dict[str, Stage] = {}
    if "moderation" in names:
        built["moderation"] = _moderation_stage(settings, context)
    render_kinds = [kind for kind in RENDER_KINDS if kind in names]
    if render_kinds:
        models = _diffusion_models(settings)
        served = pool_models(pools or {}, settings.stages.pool, models.registry.names())
        # Every model of the pool loaded, compiled and warmed: a rebalance never meets a compile stall.
        TELEMETRY.models_ready(models.warm_up(served))
        lane = models.lane()
        for kind in render_kinds:
            built[kind] = _render_stage(kind, settings, context, models)
            built[kind + LONG] = _render_stage(kind, settings, context, lane)
    log.info("stages ready", extra={"stages": list(built), "seconds": round(time.perf_counter() - started_s, 3)})
    return built


def _moderation_stage(settings: Settings, context: StageContext) -> ModerationStage:
    from pixelpipe.core.experiments import load_experiments
    from pixelpipe.core.objects import open_object_store
    from pixelpipe.core.registry import ModelRegistry
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


def _render_stage(kind: str, settings: Settings, context: StageContext, models: DiffusionModels) -> RenderStage:
    from pixelpipe.core.experiments import load_experiments
    from pixelpipe.core.objects import open_object_store
    from pixelpipe.processors.moderation import ImageModerator, ModerationPolicy
    from pixelpipe.processors.render import EditStage, GenerateStage

    stage = {"generate": GenerateStage, "edit": EditStage}[kind]
    policy = ModerationPolicy.from_file(settings.moderation.policy or None)
    experiments_file = Path(settings.experiments.file)
    return stage(
        context,
        models,
        ImageModerator(policy, detector=settings.moderation.image_detector),
        open_object_store(settings.objects),
        load_experiments(experiments_file) if experiments_file.exists() else {},
    )
