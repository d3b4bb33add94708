"""What every layer's commands share: settings from the environment, with logs set up."""

from __future__ import annotations

import click

from pixelpipe.core import logs
from pixelpipe.core.settings import ConfigError, Settings


def load_settings() -> Settings:
    """The settings from the environment, with logging configured; a bad setting is a clean CLI error."""
    try:
        settings = Settings.from_env()
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    logs.configure(settings.logs.level)
    return settings
