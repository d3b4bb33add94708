"""``pixelpipe gateway`` (the HTTP service) and ``pixelpipe keys`` (its API keys)."""

from __future__ import annotations

import json
import resource

import click

from pixelpipe.core.cli import load_settings
from pixelpipe.gateway.keys import KeyStore

# Connections the kernel queues for uvicorn to accept (capped by net.core.somaxconn): a burst of thousands of calls
# opened at once is queued rather than refused or left to the client's SYN retries.
ACCEPT_BACKLOG = 8192


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit and return it: each waiting call holds a
    socket, and the usual soft limit (1024) would refuse connections past a thousand calls."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@click.command("gateway")
@click.option("--host", help="Listen here instead of PIXELPIPE_GATEWAY_HOST.")
@click.option("--port", type=int, help="Listen here instead of PIXELPIPE_GATEWAY_PORT.")
def gateway(host: str | None, port: int | None) -> None:
    """Serve the OpenAI-compatible Images API over the pipeline until SIGTERM."""
    import uvicorn

    from pixelpipe.core.telemetry import Health, serve
    from pixelpipe.gateway.app import create_app

    settings = load_settings()
    raise_open_files_limit()
    if host or port:
        settings = settings.updated(
            gateway_host=host or settings.gateway.host, gateway_port=port or settings.gateway.port
        )
    # /metrics, /healthz and /readyz on PIXELPIPE_METRICS_PORT (0: none), like the worker's and the sink's: ready
    # once the pipeline is started (its reply consumer assigned), live while the event loop beats.
    health = Health(settings.ops.liveness_bound_s, ["pipeline"])
    server = serve(settings.ops, health)
    try:
        uvicorn.run(
            create_app(settings, health),
            host=settings.gateway.host,
            port=settings.gateway.port,
            log_level=settings.logs.level.lower(),
            access_log=False,
            backlog=ACCEPT_BACKLOG,
            timeout_graceful_shutdown=10,
        )
    finally:
        if server is not None:
            server.close()


@click.group("keys")
def keys() -> None:
    """The gateway's API keys (stored as hashes in PIXELPIPE_GATEWAY_KEYS_FILE)."""


def _store() -> KeyStore:
    return KeyStore(load_settings().gateway.keys_file)


@keys.command("create")
@click.option("--user", "user_id", required=True, help="User id the key's calls run as (rate limits, experiments).")
@click.option("--model", "models", multiple=True, help="A model the key may use (repeatable); default: all.")
@click.option("--rpm", default=60, show_default=True, type=click.IntRange(min=1), help="Requests per minute.")
@click.option("--burst", default=10, show_default=True, type=click.IntRange(min=1), help="Requests at once.")
@click.option("--name", default="", help="A note for people.")
def keys_create(user_id: str, models: tuple[str, ...], rpm: int, burst: int, name: str) -> None:
    """Create a key and print it once: only its hash is stored."""
    from pixelpipe.gateway.keys import KeyError_

    try:
        secret, entry = _store().create(user_id, list(models) or None, rpm, burst, name)
    except KeyError_ as e:
        raise click.ClickException(str(e)) from e
    click.echo(secret)
    click.echo(f"key id {entry.key_id} for user {entry.user_id}; store it now, it is not shown again", err=True)


@keys.command("list")
def keys_list() -> None:
    """Every key (id, user, models, limits, created, revoked), one JSON line each; never a key or its hash."""
    from pixelpipe.gateway.keys import describe

    for entry in _store().keys().values():
        click.echo(json.dumps(describe(entry)))


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id; running gateways refuse it within a second."""
    from pixelpipe.gateway.keys import KeyError_

    try:
        entry = _store().revoke(key_id)
    except KeyError_ as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"revoked {entry.key_id} at {entry.revoked_at}")
