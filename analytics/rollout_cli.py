"""``pixelpipe rollout``: start a guarded rollout, run its controller, show it, and a person's pause, resume and
abort. Registered with ``main.add_command(rollout)`` in pixelpipe/cli.py; the statistics are imported when a
command runs, so loading the CLI stays light."""

from __future__ import annotations

import getpass
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pixelpipe.analytics.defaults import DEFAULT_MIN_USERS_PER_ARM
from pixelpipe.core.cli import load_settings, needs_kafka
from pixelpipe.core.settings import Settings

if TYPE_CHECKING:
    from pixelpipe.analytics.rollout_store import KafkaRolloutStore
    from pixelpipe.analytics.rollouts import Rollout
    from pixelpipe.core.events import RolloutAction


@click.group()
def rollout() -> None:
    """Guarded rollouts: a new model ramped through growing shares of users, each step judged on its own data and
    rolled back at once when a guardrail shows harm."""


def _store(settings: Settings) -> KafkaRolloutStore:
    from pixelpipe.analytics.rollout_store import KafkaRolloutStore
    from pixelpipe.core.codec import codec_from_settings

    return KafkaRolloutStore(settings.kafka, settings.topics, codec_from_settings(settings.kafka))


def _person() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in a bare container
        return "cli:unknown"


def _registry_warning(settings: Settings, model: str) -> str | None:
    from pixelpipe.core.registry import ModelRegistry

    path = Path(settings.models.registry)
    if not path.exists():
        return f"no model registry at {path}: model {model!r} was not checked"
    if model not in ModelRegistry.load(path):
        return f"model {model!r} is not in the registry {path}: the treatment's requests will fail until it is"
    return None


def _treatment(
    settings: Settings, model: str | None, steps: int | None, guidance: float | None, scheduler: str | None
) -> dict[str, object]:
    """The overrides the treatment rolls out, each checked as the render stage will check it."""
    from pixelpipe.core.registry import SCHEDULERS
    from pixelpipe.core.validation import InvalidRequestError, check_guidance, check_steps

    treatment = {"model": model, "steps": steps, "guidance": guidance, "scheduler": scheduler}
    treatment = {name: value for name, value in treatment.items() if value is not None}
    if not treatment:
        raise click.UsageError("name what the treatment changes: --model, --inference-steps, --guidance or --scheduler")
    hints = {"steps": "--inference-steps", "guidance": "--guidance"}
    try:
        check_steps(steps, settings.limits)
        check_guidance(guidance)
    except InvalidRequestError as e:
        raise click.BadParameter(e.rule, param_hint=hints.get(e.field, e.field)) from e
    if scheduler is not None and scheduler not in SCHEDULERS:
        known = ", ".join(sorted(SCHEDULERS))
        raise click.BadParameter(f"{scheduler!r} is not one of {known}", param_hint="--scheduler")
    return treatment


@rollout.command("start")
@click.argument("key")
@click.option("--model", help="The new model: the treatment's requests render with it.")
@click.option(
    "--inference-steps", type=int, help="The new number of denoising steps the treatment's requests render with."
)
@click.option("--guidance", type=float, help="The new guidance scale of the treatment's requests.")
@click.option("--scheduler", help="The new scheduler of the treatment's requests (ddim, dpm-solver++, euler, ...).")
@click.option(
    "--control-model", default="", help="What runs today, recorded in the plan (default: each request's own model)."
)
@click.option(
    "--steps",
    "steps_text",
    default="1,5,25,50,100",
    show_default=True,
    help="Percent of users in the treatment at each step, increasing, ending at 100.",
)
@click.option(
    "--min-users",
    default=DEFAULT_MIN_USERS_PER_ARM,
    show_default=True,
    type=click.IntRange(min=2),
    help="Users each arm needs at a step before it may advance.",
)
@click.option(
    "--guardrails",
    "guardrails_text",
    help="METRIC:MARGIN, comma-separated: the harm each metric may show, absolute (failure_rate:+0.01) or relative "
    "to control (latency_p95:+20%). Default: failure_rate, moderation_rejection_rate, latency_p95 and "
    "cost_per_image at their default margins, which start prints.",
)
@click.option(
    "--alpha",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Error accepted at each step: every guardrail's interval holds at all of the step's looks with probability "
    "at least 1 - alpha (split evenly among the guardrails), which bounds a false roll-back within the step.",
)
@needs_kafka
def start_command(
    key: str,
    model: str | None,
    inference_steps: int | None,
    guidance: float | None,
    scheduler: str | None,
    control_model: str,
    steps_text: str,
    min_users: int,
    guardrails_text: str | None,
    alpha: float,
) -> None:
    """Start rolling out a new model or setting (--model, --inference-steps, --guidance, --scheduler; one or more)
    under the experiment KEY (a new key): the first step's share of users gets it; `pixelpipe rollout run` takes it
    from there."""
    from pixelpipe.analytics.rollout_plan import RolloutError, make_plan, parse_guardrails, parse_steps
    from pixelpipe.analytics.rollouts import start_rollout

    settings = load_settings()
    treatment = _treatment(settings, model, inference_steps, guidance, scheduler)
    if not key or len(key) > settings.limits.max_name_chars:
        raise click.BadParameter(
            f"an experiment key has 1 to {settings.limits.max_name_chars} characters (PIXELPIPE_MAX_NAME_CHARS)",
            param_hint="KEY",
        )
    try:
        steps = parse_steps(steps_text)
    except RolloutError as e:
        raise click.BadParameter(str(e), param_hint="--steps") from e
    try:
        limits = None if guardrails_text is None else parse_guardrails(guardrails_text)
        plan = make_plan(treatment, control_model, steps, min_users, alpha, limits)
    except RolloutError as e:
        raise click.BadParameter(str(e), param_hint="--guardrails") from e
    if model is not None and (warning := _registry_warning(settings, model)):
        click.echo(f"warning: {warning}", err=True)
    try:
        started = start_rollout(_store(settings), key, plan, _person(), click.echo)
    except RolloutError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"started {key}: {started.decisions[0].reason}")
    click.echo(f"  guardrails: {_limits(started)}; {plan.min_users} users per arm to advance, alpha {plan.alpha:g}")


@rollout.command("run")
@click.option(
    "--interval", default=30.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds between looks."
)
@click.option("--once", is_flag=True, help="Look at every running rollout once, then exit.")
@needs_kafka
def run_command(interval: float, once: bool) -> None:
    """The rollout controller: every INTERVAL, look at each running rollout's current step in ClickHouse and
    advance, hold or roll it back, until SIGTERM. One runs at a time; stopped, it leaves every allocation as it is,
    and started again it carries on from the decisions on the rollouts topic."""
    import signal
    import threading

    from pixelpipe.analytics.rollouts import Controller
    from pixelpipe.core.clickhouse import connect
    from pixelpipe.core.telemetry import Health, serve

    settings = load_settings()
    instance = settings.stages.worker_id or socket.gethostname()
    controller = Controller(
        _store(settings), lambda: connect(settings.clickhouse.url), f"rollout-controller:{instance}", click.echo
    )
    health = Health(max(settings.ops.liveness_bound_s, 3 * interval))
    server = serve(settings.ops, health)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    click.echo(f"rollout controller {instance}: a look every {interval:g} s")
    # A round runs to its end: a decision and its experiment change are never parted by a stop.
    while not stop.is_set():
        controller.round()
        health.beat()
        if once:
            break
        stop.wait(interval)
    if server is not None:
        server.close()


@rollout.command("status")
@click.argument("key", required=False)
@needs_kafka
def status_command(key: str | None) -> None:
    """Every rollout in one line each; with KEY, its plan, its decisions so far and its current step's figures."""
    from pixelpipe.analytics.rollouts import read_rollouts

    settings = load_settings()
    rollouts = read_rollouts(_store(settings))
    if key is None:
        if not rollouts:
            click.echo("no rollouts on the rollouts topic: start one with pixelpipe rollout start")
        for r in rollouts.values():
            click.echo(
                f"{r.key}: {r.state}, step {r.step + 1}/{len(r.plan.steps)} at {r.percent:g} % treatment; last "
                f"{r.last.action} {r.last.event_time:%Y-%m-%d %H:%M:%S} UTC"
            )
        return
    shown = _rollout(rollouts, key)
    for line in status_lines(shown):
        click.echo(line)
    if shown.ended is None:
        _show_figures(settings, shown)


def status_lines(shown: Rollout) -> list[str]:
    """The rollout's plan, its decisions so far and its current step, as `pixelpipe rollout status KEY` shows them
    (`pixelpipe demo --rollout` prints them too)."""
    plan = shown.plan
    return [
        f"{shown.key}: {shown.state}; {shown.decisions[0].reason}",
        f"  guardrails: {_limits(shown)}; {plan.min_users} users per arm to advance, alpha {plan.alpha:g}",
        *(
            f"  {d.event_time:%Y-%m-%d %H:%M:%S}  {d.action:<8} {d.percent_before:g} -> {d.percent_after:g} %  "
            f"{d.reason}  ({d.decided_by})"
            for d in shown.decisions
        ),
        f"current step {shown.step + 1}/{len(plan.steps)}: {shown.percent:g} % treatment, experiment revision "
        f"{shown.revision}",
    ]


def _show_figures(settings: Settings, shown: Rollout) -> None:
    """The current step's figures as the controller would see them now."""
    from pixelpipe.analytics.rollouts import judge_step
    from pixelpipe.core.clickhouse import connect
    from pixelpipe.core.settings import mask_secrets

    try:
        client = connect(settings.clickhouse.url)
        try:
            verdict = judge_step(shown, client)
        finally:
            client.close()
    except Exception as e:  # ClickHouse unreachable or its query refused: the decisions above still stand
        click.echo(f"  figures unavailable: {mask_secrets(str(e))}")
        return
    click.echo(f"  now: {verdict.decision}: {verdict.reason}")
    for r in verdict.results:
        interval = f"[{r.ci_low:+.4g}, {r.ci_high:+.4g}]"
        click.echo(
            f"  {r.guardrail.metric:<26} {r.status:<14} harm {r.harm:+.4g} {interval} margin {r.margin:+.4g}  "
            f"users {r.n_control}/{r.n_treatment}"
        )


def _limits(shown: Rollout) -> str:
    return ", ".join(
        f"{g.metric}:+{100 * g.margin:g}%" if g.relative else f"{g.metric}:+{g.margin:g}" for g in shown.plan.guardrails
    )


def _rollout(rollouts: dict[str, Rollout], key: str) -> Rollout:
    if key not in rollouts:
        known = ", ".join(sorted(rollouts)) or "none"
        raise click.ClickException(f"no rollout {key!r}; rollouts on the topic: {known}")
    return rollouts[key]


def _person_command(action: RolloutAction, key: str, reason: str | None) -> None:
    from pixelpipe.analytics.rollout_plan import RolloutError
    from pixelpipe.analytics.rollouts import person_decides

    decided_by = _person()
    why = reason or f"{action.lower()} by {decided_by.removeprefix('cli:')}"
    try:
        after = person_decides(_store(load_settings()), key, action, why, decided_by, click.echo)
    except RolloutError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{key}: {action} recorded; {after.state} at {after.percent:g} % treatment")


_REASON = click.option("--reason", help="Why, kept with the decision.")


@rollout.command("pause")
@click.argument("key")
@_REASON
@needs_kafka
def pause_command(key: str, reason: str | None) -> None:
    """Hold KEY at its current step: the controller advances it no further, but still rolls it back on harm."""
    _person_command("PAUSE", key, reason)


@rollout.command("resume")
@click.argument("key")
@_REASON
@needs_kafka
def resume_command(key: str, reason: str | None) -> None:
    """Let the controller advance KEY again."""
    _person_command("RESUME", key, reason)


@rollout.command("abort")
@click.argument("key")
@_REASON
@needs_kafka
def abort_command(key: str, reason: str | None) -> None:
    """Roll KEY back to 0 % treatment and stop its experiment: no user is assigned to it any more."""
    _person_command("ABORT", key, reason)
