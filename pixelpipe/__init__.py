"""pixelpipe: image generation and editing at scale.

Subpackages are the architecture. ``pixelpipe.core`` is what every stage shares (settings, typed events and the
codec, validation, experiments, the object store, the ClickHouse client, ids, clock, logs); the stage folders
``producers`` (SDK and CLI for upstream services), ``processors`` (the worker's stages), ``sinks`` (ClickHouse) and
``analytics`` (dashboards and experiments) import it and never each other; ``schemas`` holds the Avro contracts;
``pixelpipe.tools`` (local stack, demo, tiny models) sits beside the runtime, which never imports it.
"""

__version__ = "0.1.0"
