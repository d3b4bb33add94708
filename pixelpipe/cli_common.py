"""What every layer's commands share."""

from __future__ import annotations

import click

from pixelpipe import logs
from pixelpipe.config import ConfigError, Settings


def load_settings() -> Settings:
    """The settings from the environment, with logging configured; a bad setting is a clean CLI error."""
    try:
        settings = Settings.from_env()
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    logs.configure(settings.log_level)
    return settings
