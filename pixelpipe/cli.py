"""The ``pixelpipe`` command."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import click

from pixelpipe.core.cli import ReportsUnreachableServers, load_settings, needs_kafka
from pixelpipe.core.registry import FAMILIES, ModelError
from pixelpipe.core.settings import Settings, section_from_env, section_redacted, settings_table
from pixelpipe.tools.stack.settings import StackSettings


def _stack_settings() -> StackSettings:
    load_settings()  # logs, and a clean error for a bad runtime setting
    return section_from_env(StackSettings, os.environ)


@click.group(cls=ReportsUnreachableServers)
@click.version_option(package_name="pixelpipe")
def main() -> None:
    """pixelpipe: image generation and editing on Kafka, diffusers, S3 and ClickHouse."""
    # The ML libraries' advice and progress bars would drown the JSON logs; workers inherit this.
    for name, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ):
        os.environ.setdefault(name, value)


# -- configuration -------------------------------------------------------------------------------------------
@main.command("config")
@click.option("--markdown", is_flag=True, help="Print the table of every setting, as the documentation shows it.")
def config_command(markdown: bool) -> None:
    """Show the settings in force (secrets masked)."""
    if markdown:
        click.echo(settings_table([*Settings.sections(), StackSettings]))
    else:
        shown = load_settings().redacted() | {"stack": section_redacted(_stack_settings())}
        click.echo(json.dumps(shown, indent=2))


# -- documentation -------------------------------------------------------------------------------------------
@main.command("docs")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port on 127.0.0.1.")
def docs_command(port: int) -> None:
    """Serve the documentation site (mkdocs serve), rebuilt as its pages change, until Ctrl-C."""
    config = Path(__file__).resolve().parents[1] / "mkdocs.yml"
    if not config.is_file():
        raise click.ClickException(f"no {config}: the documentation is served from a checkout of pixelpipe")
    if importlib.util.find_spec("mkdocs") is None:
        raise click.ClickException("MkDocs is not installed: install the docs extra, pip install 'pixelpipe[docs]'")
    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")  # Material's banner about its successor, on every build
    os.chdir(config.parent)
    command = ["-m", "mkdocs", "serve", "--config-file", str(config), "--dev-addr", f"127.0.0.1:{port}"]
    os.execv(sys.executable, [sys.executable, *command])  # mkdocs owns the terminal: Ctrl-C stops it alone


# -- local stack ---------------------------------------------------------------------------------------------
@main.group()
def stack() -> None:
    """Run Kafka, ClickHouse, an S3 endpoint, Prometheus and the gateway on 127.0.0.1 (no Docker needed)."""


def _print_status(statuses: list) -> bool:
    """One line a service; True when every service that should run is healthy."""
    for s in statuses:
        state = "skipped" if s.skipped else "healthy" if s.healthy else ("unhealthy" if s.pid else "stopped")
        where = f"{s.endpoint} ({s.skipped})" if s.skipped else s.endpoint
        click.echo(f"{s.name:<12} {state:<10} pid={s.pid or '-':<8} {where}")
    return all(s.healthy or s.skipped for s in statuses)


@stack.command("up")
def stack_up() -> None:
    """Start every service that is not running and wait until each answers."""
    from pixelpipe.tools.stack import LocalStack, StackError

    stack_settings = _stack_settings()
    local = LocalStack(stack_settings)
    try:
        statuses = local.up()
    except StackError as e:
        raise click.ClickException(str(e)) from e
    if stack_settings.kafka_acls:  # each role's ACLs on the topics of the settings in force
        settings = load_settings()
        local.kafka.grant_roles(settings.topics, settings.stages.consumer_group, settings.sink.group_id)
    _print_status(statuses)


@stack.command("down")
def stack_down() -> None:
    """Stop every service (SIGTERM, then SIGKILL after a grace period)."""
    from pixelpipe.tools.stack import LocalStack

    local = LocalStack(_stack_settings())
    local.down()
    _print_status(local.status())


@stack.command("status")
def stack_status() -> None:
    """Report each service; exits 1 unless all are healthy."""
    from pixelpipe.tools.stack import LocalStack

    if not _print_status(LocalStack(_stack_settings()).status()):
        sys.exit(1)


@stack.command("env")
def stack_env() -> None:
    """Print shell exports that point pixelpipe at the local stack: eval "$(pixelpipe stack env)"."""
    from pixelpipe.tools.stack import LocalStack

    for name, value in LocalStack(_stack_settings()).client_env().items():
        click.echo(f"export {name}={value}")


# -- topics --------------------------------------------------------------------------------------------------
@main.command("topics")
@needs_kafka
def topics_command() -> None:
    """Create the pipeline's topics that do not exist yet."""
    from pixelpipe.core.topics import ensure_topics

    settings = load_settings()
    created = ensure_topics(settings.kafka, settings.topics)
    click.echo(f"created: {', '.join(created) or 'none (all exist)'}")


# -- operations ---------------------------------------------------------------------------------------------
@main.command("lag-exporter")
@click.option(
    "--group-prefix",
    "prefixes",
    multiple=True,
    help="Watch consumer groups whose id starts with this (repeatable). Default: PIXELPIPE_CONSUMER_GROUP and "
    "PIXELPIPE_SINK_GROUP_ID.",
)
def lag_exporter_command(prefixes: tuple[str, ...]) -> None:
    """Serve the consumer lag of every matching group on PIXELPIPE_METRICS_PORT until SIGTERM: it still reports a
    group none of whose members runs, which their own metrics cannot."""
    import signal
    import threading

    from pixelpipe.core.telemetry import Health, LagMonitor, serve

    settings = load_settings()
    health = Health(max(settings.ops.liveness_bound_s, 3 * settings.ops.lag_interval_s))
    server = serve(settings.ops, health)
    if server is None:
        raise click.UsageError("set PIXELPIPE_METRICS_PORT: the lag exporter serves nothing else")
    prefixes = prefixes or (settings.stages.consumer_group, settings.sink.group_id)
    monitor = LagMonitor(
        settings.kafka, prefixes=prefixes, interval_s=settings.ops.lag_interval_s, topics=settings.topics
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.is_set():
        try:
            monitor.measure()
            health.beat()
        except Exception as e:  # the broker restarting: /healthz fails if it lasts, the next round tries again
            click.echo(f"lag not measured: {e!r}", err=True)
        stop.wait(settings.ops.lag_interval_s)
    server.close()


@main.command("top")
@click.option("--prometheus", "url", help="Prometheus to read (default: PIXELPIPE_PROMETHEUS_URL).")
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts and tests).")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.2), help="Seconds a frame.")
@click.option("--width", type=click.IntRange(min=60), help="Render this many columns wide (default: the terminal).")
def top_command(url: str | None, once: bool, interval: float, width: int | None) -> None:
    """A live view of lag, throughput, p95 latency per stage, batch sizes, GPU busy and error rates."""
    from pixelpipe.tools.top import run_top

    settings = load_settings()
    if not run_top(url or settings.ops.prometheus_url, once=once, interval_s=interval, width=width):
        sys.exit(1)


# -- processors ---------------------------------------------------------------------------------------------
@main.command("worker")
@click.option(
    "--stages",
    help="Comma-separated stages to run, e.g. moderation on CPU workers and generate,edit on GPU workers "
    "[default: moderation,generate,edit; generate,edit with --pool].",
)
@click.option(
    "--pool",
    help="The model pool whose render topics this worker reads and whose models it loads "
    "(default: PIXELPIPE_POOL, else the default pool).",
)
def worker_command(stages: str | None, pool: str | None) -> None:
    """Run pipeline stages until SIGTERM; workers with the same stages (and pool) share the partitions."""
    from pixelpipe.core.pools import PoolConfigError, check_pool_name
    from pixelpipe.processors.app import run_worker

    settings = load_settings()
    if pool is not None:
        try:
            check_pool_name(pool)
        except PoolConfigError as e:
            raise click.BadParameter(str(e), param_hint="--pool") from e
        settings = settings.updated(pool=pool)
    default_stages = "generate,edit" if settings.stages.pool != "default" else "moderation,generate,edit"
    try:
        status = run_worker(settings, [s.strip() for s in (stages or default_stages).split(",") if s.strip()])
    except ModelError as e:  # a registry or model that cannot load: found before joining the group
        raise click.ClickException(str(e)) from e
    except PoolConfigError as e:
        raise click.BadParameter(str(e), param_hint="--pool") from e
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--stages") from e
    # The agents have stopped, their offsets are committed and the clients closed: exit now. The interpreter's
    # teardown (the model libraries' thread pools and tensors) would add seconds to every stop.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@main.group()
def models() -> None:
    """The diffusion model registry."""


@models.command("init-tiny")
@click.option("--out", "out_dir", default="./data/models", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--family",
    "families",
    multiple=True,
    default=["stable-diffusion"],
    show_default=True,
    type=click.Choice(FAMILIES),
    help="Model families to build a tiny model of (repeat the option for several).",
)
def models_init_tiny(out_dir: Path, families: tuple[str, ...]) -> None:
    """Build tiny seeded random-weight pipelines and their registry (for tests and the CPU demo)."""
    from pixelpipe.tools.model_builders import build_tiny_models

    click.echo(f"registry: {build_tiny_models(out_dir, families)}")


def _counts(ctx: click.Context, param: click.Parameter, text: str | None) -> tuple[int, ...] | None:
    try:
        counts = None if text is None else tuple(int(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, like 1,4; got {text!r}") from None
    if counts is not None and min(counts) < 1:
        raise click.BadParameter(f"every number must be 1 or more, got {text!r}")
    return counts


def _sizes(ctx: click.Context, param: click.Parameter, text: str | None) -> tuple[tuple[int, int], ...] | None:
    if text is None:
        return None
    sizes = []
    for part in text.split(","):
        width, _, height = part.strip().partition("x")
        if not (width.isdigit() and (height or width).isdigit()):
            raise click.BadParameter(f"expected sizes like 512,1024x768 (SIDE or WIDTHxHEIGHT); got {part!r}")
        sizes.append((int(width), int(height or width)))
    return tuple(sizes)


@models.command("calibrate")
@click.option(
    "--registry",
    "registry_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Registry file to calibrate and update (default: PIXELPIPE_MODEL_REGISTRY).",
)
@click.option("--model", "names", multiple=True, help="Model to calibrate (repeatable; default: all but null ones).")
@click.option(
    "--sizes",
    callback=_sizes,
    help="Sizes to render, SIDE or WIDTHxHEIGHT, comma-separated (at least three areas; default: "
    "512,1024,1536,2048 on a GPU, 64,128,192,256 on a CPU).",
)
@click.option("--steps", callback=_counts, help="Step counts to render (at least two; default: 1,4).")
@click.option(
    "--batch-sizes",
    callback=_counts,
    help="Images per call (default: 1,2 for a model that renders batches; a per-image model renders one a call).",
)
@click.option(
    "--repeats",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Timed renders per point; the fastest counts (more on a machine busy with other work).",
)
def models_calibrate(
    registry_path: Path | None,
    names: tuple[str, ...],
    sizes: tuple[tuple[int, int], ...] | None,
    steps: tuple[int, ...] | None,
    batch_sizes: tuple[int, ...] | None,
    repeats: int,
) -> None:
    """Measure what each model's renders cost in device seconds on this machine's device, fit each model's
    compute_fit (the charge of the compute budgets) and write it into the registry. Renders a grid of sizes, steps
    and batch sizes: minutes per model."""
    from pixelpipe.processors.models import DiffusionModels
    from pixelpipe.tools.calibration import calibrate, default_grid, registry_to_calibrate, write_compute_fits

    path = registry_path or Path(load_settings().models.registry)
    try:
        models = DiffusionModels(registry_to_calibrate(path, names))
        for name in models.registry.names():
            default = default_grid(models.load(name).device)
            grid = dataclasses.replace(
                default,
                sizes=sizes or default.sizes,
                steps=steps or default.steps,
                batch_sizes=batch_sizes or default.batch_sizes,
                repeats=repeats,
            )
            calibration = calibrate(models, name, grid, progress=lambda line: click.echo(line, err=True))
            click.echo("\n".join(calibration.report()))
            # Written model by model: a long run stopped later keeps what it measured.
            write_compute_fits(path, {name: calibration.fit})
            click.echo(f"registry: {path} (compute_fit of {name!r} written)")
    except ModelError as e:
        raise click.ClickException(str(e)) from e


# -- demo ---------------------------------------------------------------------------------------------------
@main.command("demo")
@click.option(
    "--requests", "count", type=click.IntRange(min=12), help="Default: 60, or 640 with --experiment (from 336 users)."
)
@click.option("--keep-stack", is_flag=True, help="Leave the local stack running if the demo started it.")
@click.option(
    "--experiment",
    "experiment_only",
    is_flag=True,
    help="Publish many light requests from hundreds of users, enough for `pixelpipe analyze` to give intervals.",
)
@click.option(
    "--rollout",
    is_flag=True,
    help="Roll a good and a bad candidate model out, one after the other, under the rollout controller (needs a "
    "ClickHouse server: the local stack's, or PIXELPIPE_CLICKHOUSE_URL's).",
)
def demo_command(count: int | None, keep_stack: bool, experiment_only: bool, rollout: bool) -> None:
    """Run the pipeline end to end on embedded defaults, starting the local stack if Kafka is not up."""
    from pixelpipe.tools.demo import EXPERIMENT_REQUESTS, run_demo

    if rollout:
        if count is not None or experiment_only:
            raise click.UsageError("--rollout publishes until both rollouts end: no --requests or --experiment")
        from pixelpipe.tools.rollout_demo import run_rollout_demo

        if not run_rollout_demo(load_settings(), _stack_settings(), click.echo, keep_stack):
            sys.exit(1)
        return
    count = count or (EXPERIMENT_REQUESTS if experiment_only else 60)
    if not run_demo(load_settings(), _stack_settings(), count, click.echo, keep_stack, experiment_only):
        sys.exit(1)


# -- publishing ----------------------------------------------------------------------------------------------
@main.command("publish")
@click.argument("jsonl", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--synthetic", "count", type=click.IntRange(min=1), help="Generate this many requests instead.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Requests per second (default: max).")
@click.option("--edit-ratio", default=0.3, show_default=True, type=click.FloatRange(0, 1))
@click.option("--users", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--model", default="tiny-sd", show_default=True)
@click.option("--size", default=64, show_default=True, type=int, help="Width and height of synthetic requests.")
@click.option("--source-uri", "source_uris", multiple=True, help="Edit source for synthetic edits (repeatable).")
@click.option(
    "--experiment",
    "experiments",
    multiple=True,
    help="KEY=variant[:weight],... assigned by user (repeatable).",
)
@click.option("--topic", help="Publish here instead of PIXELPIPE_TOPIC_REQUESTS.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@needs_kafka
def publish_command(
    jsonl: Path | None,
    count: int | None,
    rate: float | None,
    edit_ratio: float,
    users: int,
    model: str,
    size: int,
    source_uris: tuple[str, ...],
    experiments: tuple[str, ...],
    topic: str | None,
    progress: bool,
) -> None:
    """Publish ImageRequests from a JSONL file or a synthetic load generator, and count the acknowledgements."""
    from pixelpipe.core.experiments import parse_experiment_spec
    from pixelpipe.producers import Publisher
    from pixelpipe.producers.load import SyntheticLoad, describe, publish_all, requests_from_jsonl

    if (jsonl is None) == (count is None):
        raise click.UsageError("give either a JSONL file or --synthetic COUNT")
    try:
        assignments = dict(parse_experiment_spec(spec) for spec in experiments)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--experiment") from e
    settings = load_settings()
    if jsonl is not None:
        source, total = requests_from_jsonl(jsonl), sum(1 for line in jsonl.read_text().splitlines() if line.strip())
    else:
        assert count is not None
        source, total = (
            SyntheticLoad(
                count=count,
                model=model,
                edit_ratio=edit_ratio,
                users=users,
                width=size,
                height=size,
                source_uris=source_uris,
                experiments=assignments,
            ),
            count,
        )
    with Publisher(settings) as publisher:
        report = publish_all(publisher, source, rate=rate, total=total, progress=progress, topic=topic)
    for invalid in report.invalid:
        click.echo(f"refused {invalid.source}: {invalid.error}", err=True)
    for failure in report.failed:
        click.echo(f"not acknowledged {failure}", err=True)
    counts = describe(report)
    click.echo(" ".join(f"{k}={v}" for k, v in counts.items()))
    if not report.ok:
        sys.exit(1)


@main.command("cancel")
@click.argument("request_id")
@click.option("--reason", help="Why, kept with the cancellation.")
@click.option(
    "--wait",
    "wait_s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to look for the request's result on the results topic (0: only what is there now).",
)
@needs_kafka
def cancel_command(request_id: str, reason: str | None, wait_s: float) -> None:
    """Cancel a request: a render worker that meets it before its render is done ends it CANCELLED. Says how it
    ended (CANCELLED, already finished with its status, or no result yet); exits 1 only when it had already
    finished otherwise."""
    from pixelpipe.producers import DeliveryError, Publisher

    with Publisher(load_settings()) as publisher:
        try:
            outcome = publisher.cancel(request_id, reason=reason, wait_s=wait_s, requested_by="cli")
        except (DeliveryError, TimeoutError) as e:
            raise click.ClickException(
                f"the cancellation was not published ({e}); do the topics exist (`pixelpipe topics`)?"
            ) from e
    click.echo(str(outcome))
    if outcome.finished_before:
        sys.exit(1)


def _register_layer_commands() -> None:
    # Each layer owns its commands; the CLI only gathers them.
    from pixelpipe.analytics.cli import analyze, dashboard
    from pixelpipe.analytics.rollout_cli import rollout
    from pixelpipe.gateway.cli import gateway, keys
    from pixelpipe.processors.cli import experiments, pools
    from pixelpipe.sinks.cli import clickhouse

    main.add_command(analyze)
    main.add_command(dashboard)
    main.add_command(clickhouse)
    main.add_command(gateway)
    main.add_command(keys)
    main.add_command(pools)
    main.add_command(experiments)
    main.add_command(rollout)
    pools.add_command(pools_keda_command)


@click.command("keda")
@click.argument("path", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def pools_keda_command(path: Path | None) -> None:
    """Kubernetes manifests for each pool: its render Deployment and the KEDA ScaledObject scaling it on its lag,
    from PATH (a pools file) or, without one, the pools in force."""
    from pixelpipe.core.pools import PoolConfigError
    from pixelpipe.processors.cli import file_pools, live_pools
    from pixelpipe.tools.pool_manifests import pool_manifests

    settings = load_settings()
    try:
        click.echo(pool_manifests(file_pools(path) if path else live_pools(settings), settings), nl=False)
    except PoolConfigError as e:
        raise click.ClickException(str(e)) from e


_register_layer_commands()
