"""pixelpipe: image generation and editing at scale.

Subpackages are the architecture: ``schemas`` (contracts and codec), ``producers`` (SDK and CLI for upstream
services), ``processors`` (Faust stages), ``sinks`` (object storage and ClickHouse), ``analytics`` (dashboards
and experiments). ``pixelpipe.config`` holds the one settings object and ``pixelpipe.stack`` runs the local servers.
"""

__version__ = "0.1.0"
