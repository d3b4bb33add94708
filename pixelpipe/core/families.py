"""What the readers of the model registry that load no weights (the gateway) share with the render stages
(``processors/models.py``): how many images one edit may give a model of each family."""

from __future__ import annotations

# Families that edit by conditioning on several images (the source and its references), with how many they take by
# default (a registry entry's max_source_images); every other family takes one.
REFERENCE_FAMILIES: dict[str, int] = {"flux2-klein": 4}


def default_max_source_images(kind: str) -> int:
    """How many images one edit may give a model of ``kind`` unless its registry entry says otherwise."""
    return REFERENCE_FAMILIES.get(kind, 1)
