"""Deterministic experiment assignment: hashing (experiment key, user id) keeps a user in one arm."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping


def assign_variant(experiment: str, user_id: str, weights: Mapping[str, float]) -> str:
    """The variant of ``user_id`` in ``experiment``, drawn with the given relative weights.

    The user's point in [0, 1) comes from SHA-256 of ``experiment:user_id``, so assignment needs no state,
    is the same in every process and language, and is independent across experiments.
    """
    if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"experiment {experiment!r}: variant weights must be non-negative and not all zero")
    digest = hashlib.sha256(f"{experiment}:{user_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * sum(weights.values())
    cumulative = 0.0
    for variant, weight in sorted(weights.items()):
        cumulative += weight
        if point < cumulative:
            return variant
    return max(weights)  # point landed on the upper edge through rounding


def parse_experiment_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``KEY=variant:weight,variant:weight`` (weights default to 1), as the CLI takes it."""
    key, sep, arms = spec.partition("=")
    if not sep or not key or not arms:
        raise ValueError(f"experiment {spec!r}: expected KEY=variant[:weight],variant[:weight]")
    weights: dict[str, float] = {}
    for arm in arms.split(","):
        name, _, weight = arm.partition(":")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"experiment {spec!r}: weight {weight!r} of {name!r} is not a number") from None
    return key, weights
