"""Experiments: the experiments file (key, variants with weights and overrides, start, end) and the
deterministic assignment of users to variants.

```json
{"experiments": [{"key": "steps-test", "control": "control", "start": "2025-01-06", "end": "2025-01-20",
                  "variants": [{"name": "control", "weight": 1},
                               {"name": "fast", "weight": 1, "overrides": {"steps": 4, "scheduler": "lcm"}}]}]}
```

Assignment hashes (experiment key, user id), so the producer SDK, the processors and the analysis agree on
every user's arm without sharing state.
"""

from __future__ import annotations

import datetime
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pixelpipe.core.config_files import read_json_file
from pixelpipe.core.events import ImageRequest

# What a variant may change, and the type each value must have (a processor applies them as-is).
OVERRIDE_TYPES: Mapping[str, tuple[type, ...]] = MappingProxyType(
    {"model": (str,), "steps": (int,), "guidance": (int, float), "scheduler": (str,)}
)


class ExperimentConfigError(ValueError):
    """The experiments file is malformed; the message names the experiment and the field."""


class UnknownExperimentError(KeyError):
    """No experiment has this key; the message lists those that exist."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float = 1.0
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    key: str
    variants: tuple[Variant, ...]
    start: datetime.datetime  # UTC, inclusive
    end: datetime.datetime | None = None  # UTC, exclusive; None while it runs
    control: str = ""  # defaults to the first variant
    description: str | None = None
    revision: int = 0  # of its definition on the experiments topic; 0 for one read from a file
    stopped: bool = False  # assigns no request any more; kept for analysis

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ExperimentConfigError(
                f"experiment {self.key!r}: needs two or more uniquely named variants, got {names}"
            )
        if not self.control:
            object.__setattr__(self, "control", names[0])
        if self.control not in names:
            raise ExperimentConfigError(f"experiment {self.key!r}: control {self.control!r} is not one of {names}")
        if self.end is not None and self.end <= self.start:
            raise ExperimentConfigError(f"experiment {self.key!r}: end {self.end} is not after start {self.start}")
        for variant in self.variants:
            if not (variant.weight >= 0 and math.isfinite(variant.weight)):
                raise ExperimentConfigError(
                    f"experiment {self.key!r}: variant {variant.name!r} has weight {variant.weight}"
                )
            _check_overrides(self.key, variant)
        if sum(v.weight for v in self.variants) <= 0:
            raise ExperimentConfigError(f"experiment {self.key!r}: all variant weights are zero")

    @property
    def weights(self) -> dict[str, float]:
        return {v.name: v.weight for v in self.variants}

    @property
    def treatments(self) -> list[str]:
        return [v.name for v in self.variants if v.name != self.control]

    def assign(self, user_id: str) -> str:
        """The user's variant: the same in every process, for as long as the key and weights stay the same."""
        return assign_variant(self.key, user_id, self.weights)

    def overrides_for(self, variant: str) -> dict[str, Any]:
        """The request parameters this variant changes (model, steps, guidance, scheduler); {} for none."""
        for v in self.variants:
            if v.name == variant:
                return dict(v.overrides)
        raise KeyError(
            f"experiment {self.key!r} has no variant {variant!r}; variants: {[v.name for v in self.variants]}"
        )

    def is_active(self, at: datetime.datetime) -> bool:
        return not self.stopped and self.start <= at and (self.end is None or at < self.end)

    def to_json(self) -> dict[str, Any]:
        """The experiments file's entry for it, which ``parse_experiments`` reads back."""
        entry: dict[str, Any] = {"key": self.key, "control": self.control, "start": self.start.isoformat()}
        if self.end is not None:
            entry["end"] = self.end.isoformat()
        if self.description:
            entry["description"] = self.description
        entry["variants"] = [
            {"name": v.name, "weight": v.weight} | ({"overrides": dict(v.overrides)} if v.overrides else {})
            for v in self.variants
        ]
        return entry


def parse_time(value: str) -> datetime.datetime:
    """ISO date or date-time; naive values are UTC."""
    parsed = datetime.datetime.fromisoformat(value)
    return parsed.replace(tzinfo=datetime.UTC) if parsed.tzinfo is None else parsed.astimezone(datetime.UTC)


def parse_experiments(data: Mapping[str, Any]) -> dict[str, Experiment]:
    """Experiments by key from the parsed JSON document."""
    items = data.get("experiments") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise ExperimentConfigError('the experiments file must be an object with an "experiments" list')
    experiments: dict[str, Experiment] = {}
    for index, item in enumerate(items):
        experiment = _parse_experiment(index, item)
        if experiment.key in experiments:
            raise ExperimentConfigError(f"experiment {experiment.key!r} is defined twice")
        experiments[experiment.key] = experiment
    return experiments


def load_experiments(path: str | Path) -> dict[str, Experiment]:
    """Experiments by key from a JSON experiments file."""
    return parse_experiments(read_json_file(path, "experiments file", ExperimentConfigError))


def get_experiment(experiments: Mapping[str, Experiment], key: str) -> Experiment:
    if key not in experiments:
        known = ", ".join(sorted(experiments)) or "none"
        raise UnknownExperimentError(f"unknown experiment {key!r}; the experiments file defines: {known}")
    return experiments[key]


def _parse_experiment(index: int, item: Any) -> Experiment:
    if not isinstance(item, Mapping) or not isinstance(item.get("key"), str) or not item["key"]:
        raise ExperimentConfigError(f"experiment #{index + 1}: needs a non-empty string 'key'")
    key = item["key"]
    unknown = set(item) - {"key", "variants", "start", "end", "control", "description"}
    if unknown:
        raise ExperimentConfigError(f"experiment {key!r}: unknown fields {sorted(unknown)}")
    variants = item.get("variants")
    if not isinstance(variants, list) or not all(
        isinstance(v, Mapping) and isinstance(v.get("name"), str) for v in variants
    ):
        raise ExperimentConfigError(f"experiment {key!r}: 'variants' must be a list of objects with a 'name'")
    if not isinstance(item.get("start"), str):
        raise ExperimentConfigError(f"experiment {key!r}: needs 'start' (ISO date or date-time, UTC)")
    try:
        start = parse_time(item["start"])
        end = parse_time(item["end"]) if item.get("end") else None
    except ValueError as e:
        raise ExperimentConfigError(f"experiment {key!r}: {e}") from None
    parsed = []
    for v in variants:
        weight = v.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ExperimentConfigError(f"experiment {key!r}: variant {v['name']!r} weight must be a number")
        overrides = v.get("overrides", {})
        if not isinstance(overrides, Mapping):
            raise ExperimentConfigError(f"experiment {key!r}: variant {v['name']!r} overrides must be an object")
        parsed.append(Variant(v["name"], float(weight), MappingProxyType(dict(overrides))))
    description = item.get("description")
    if description is not None and not isinstance(description, str):
        raise ExperimentConfigError(f"experiment {key!r}: 'description' must be a string")
    return Experiment(key, tuple(parsed), start, end, item.get("control") or "", description)


def _check_overrides(key: str, variant: Variant) -> None:
    for name, value in variant.overrides.items():
        if name not in OVERRIDE_TYPES:
            raise ExperimentConfigError(
                f"experiment {key!r}: variant {variant.name!r} overrides {name!r}; a variant may override "
                f"{', '.join(OVERRIDE_TYPES)}"
            )
        if isinstance(value, bool) or not isinstance(value, OVERRIDE_TYPES[name]):
            raise ExperimentConfigError(
                f"experiment {key!r}: variant {variant.name!r} override {name}={value!r} has the wrong type"
            )


def stamp_assignments(request: ImageRequest, experiments: Mapping[str, Experiment], at: datetime.datetime) -> None:
    """Add the user's arm of each experiment active ``at`` that the request does not name yet (in place)."""
    for key, experiment in experiments.items():
        if key not in request.experiments and experiment.is_active(at):
            request.experiments[key] = experiment.assign(request.user_id)


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
