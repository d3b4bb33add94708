"""``pixelpipe pools``: the model pools in force, applied from a file, listed and exported (the autoscaler's
manifests, from the tools, are added by the top-level CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pixelpipe.core.cli import load_settings, needs_kafka
from pixelpipe.core.codec import codec_from_settings
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
