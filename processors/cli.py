"""The live configuration the workers read: ``pixelpipe pools`` (the model pools in force, applied from a file,
listed and exported; the autoscaler's manifests, from the tools, are added by the top-level CLI) and ``pixelpipe
experiments`` (the experiments in force)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pixelpipe.core.cli import load_settings, needs_kafka
from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.experiments import (
    Experiment,
    ExperimentConfigError,
    UnknownExperimentError,
    get_experiment,
    load_experiments,
)
from pixelpipe.core.live_experiments import publish_experiments, read_experiments, stopped
from pixelpipe.core.pools import Pool, PoolConfigError, apply_pools, load_pools, pool_topics, pools_document, read_pools
from pixelpipe.core.registry import ModelRegistry
from pixelpipe.core.settings import Settings


@click.group()
def pools() -> None:
    """Model pools: which render workers serve which models (live configuration, no restart)."""


def file_pools(path: Path) -> dict[str, Pool]:
    try:
        return load_pools(path)
    except PoolConfigError as e:
        raise click.ClickException(str(e)) from e


def live_pools(settings: Settings) -> dict[str, Pool]:
    return read_pools(settings.kafka, settings.topics, codec_from_settings(settings.kafka))


def _registry_warnings(settings: Settings, wanted: dict[str, Pool]) -> list[str]:
    """What the registry this command sees says of the pools: models it lacks, models no pool serves."""
    path = Path(settings.models.registry)
    if not path.exists():
        return [f"no model registry at {path}: the pools' models were not checked"]
    names = ModelRegistry.load(path).names()
    pooled = {model for pool in wanted.values() for model in pool.models}
    warnings = [f"model {m!r} is not in the registry {path}" for m in sorted(pooled - set(names))]
    if wanted:
        warnings += [
            f"model {m!r} is in no pool: its requests will fail MODEL_NOT_SERVED" for m in names if m not in pooled
        ]
    return warnings


@pools.command("apply")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@needs_kafka
def apply_command(path: Path) -> None:
    """Make the pools in PATH the pools in force: their render topics are created, then moderation routes each
    model to its pool within seconds. Pools not in PATH are removed; a file with no pools brings back the default
    pool serving every model."""
    settings = load_settings()
    wanted = file_pools(path)
    for warning in _registry_warnings(settings, wanted):
        click.echo(f"warning: {warning}", err=True)
    changes = apply_pools(
        settings.kafka, settings.topics, codec_from_settings(settings.kafka), wanted, progress=click.echo
    )
    for label, names in (
        ("added", changes.added),
        ("changed", changes.changed),
        ("removed", changes.removed),
        ("unchanged", changes.unchanged),
    ):
        if names:
            click.echo(f"{label}: {', '.join(names)}")
    if changes.topics_created:
        click.echo(f"topics created: {', '.join(changes.topics_created)}")


@pools.command("list")
@needs_kafka
def list_command() -> None:
    """The pools in force: models, render topics, and the workers the autoscaler may run."""
    settings = load_settings()
    live = live_pools(settings)
    if not live:
        click.echo(
            f"no pools configured: the default pool serves every model, on {settings.topics.generate} and "
            f"{settings.topics.edit}"
        )
        return
    for name, pool in live.items():
        topics = pool_topics(settings.topics, name)
        partitions = pool.partitions or settings.topics.partitions
        click.echo(
            f"{name}: models {', '.join(pool.models)}; topics {topics.generate}, {topics.edit} (+ .long), "
            f"{partitions} partitions; {pool.min_replicas} to {pool.replica_limit(settings.topics.partitions)} "
            f"workers, {pool.lag_threshold} waiting per worker"
        )


@pools.command("export")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of stdout.")
@needs_kafka
def export_command(out: Path | None) -> None:
    """The pools in force as a pools file, which `pixelpipe pools apply` reads back."""
    text = json.dumps(pools_document(live_pools(load_settings())), indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"wrote {out}")


@click.group()
def experiments() -> None:
    """Experiments in force: every worker applies a change within seconds, without a restart."""


def _live_experiments(settings: Settings) -> dict[str, Experiment]:
    return read_experiments(settings.kafka, settings.topics, codec_from_settings(settings.kafka))


def _described(experiment: Experiment) -> str:
    total = sum(v.weight for v in experiment.variants) or 1.0
    arms = ", ".join(
        f"{v.name} {100 * v.weight / total:g}%" + (f" {dict(v.overrides)}" if v.overrides else "")
        for v in experiment.variants
    )
    state = "stopped" if experiment.stopped else "running"
    return f"{experiment.key} (revision {experiment.revision}, {state}, control {experiment.control}): {arms}"


@experiments.command("apply")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@needs_kafka
def experiments_apply(path: Path) -> None:
    """Publish the experiments of PATH (an experiments file); each one that changed gets its next revision."""
    settings = load_settings()
    try:
        wanted = load_experiments(path)
    except ExperimentConfigError as e:
        raise click.ClickException(str(e)) from e
    published = publish_experiments(settings.kafka, settings.topics, codec_from_settings(settings.kafka), wanted)
    for experiment in published.values():
        click.echo(f"published {_described(experiment)}")
    unchanged = sorted(set(wanted) - set(published))
    if unchanged:
        click.echo(f"unchanged: {', '.join(unchanged)}")


@experiments.command("list")
@needs_kafka
def experiments_list() -> None:
    """The experiments in force, with their revision and split."""
    live = _live_experiments(load_settings())
    if not live:
        click.echo("no experiments on the experiments topic: apply a file with pixelpipe experiments apply")
    for experiment in live.values():
        click.echo(_described(experiment))


@experiments.command("show")
@click.argument("key")
@needs_kafka
def experiments_show(key: str) -> None:
    """One experiment in force, as an experiments file's entry (with its revision and state)."""
    try:
        experiment = get_experiment(_live_experiments(load_settings()), key)
    except UnknownExperimentError as e:
        raise click.ClickException(str(e)) from e
    shown = experiment.to_json() | {"revision": experiment.revision, "stopped": experiment.stopped}
    click.echo(json.dumps(shown, indent=2))


@experiments.command("stop")
@click.argument("key")
@needs_kafka
def experiments_stop(key: str) -> None:
    """Stop assigning KEY: requests from now on run without it; its definition and results stay for analysis."""
    settings = load_settings()
    try:
        experiment = get_experiment(_live_experiments(settings), key)
    except UnknownExperimentError as e:
        raise click.ClickException(str(e)) from e
    codec = codec_from_settings(settings.kafka)
    published = publish_experiments(settings.kafka, settings.topics, codec, {key: stopped(experiment)})
    click.echo(f"stopped {_described(published[key])}" if published else f"{key} was stopped already")


@experiments.command("export")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of stdout.")
@needs_kafka
def experiments_export(out: Path | None) -> None:
    """The experiments in force as an experiments file, which `pixelpipe experiments apply` reads back."""
    live = _live_experiments(load_settings())
    text = json.dumps({"experiments": [e.to_json() for e in live.values()]}, indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"wrote {out}")
