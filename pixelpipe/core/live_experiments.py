"""Experiments as live configuration: each experiment's whole definition, with a revision one more than the last,
as an ``ExperimentDefinition`` event keyed by its key on a compacted topic that every worker mirrors
(``pixelpipe.core.topics.TopicMirror``). A change (a new weight, a variant's override, a stop) is in force on every
worker within seconds, without a restart; a result records the revision it was assigned under
(``experiment_revisions``).

The experiments file stays the import and export format (``pixelpipe experiments apply`` / ``export``); a worker
still reads the file it is given, and a definition on the topic replaces the file's experiment of the same key.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType

from pixelpipe.core.clock import utc_now
from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ExperimentDefinition, VariantDefinition
from pixelpipe.core.experiments import OVERRIDE_TYPES, Experiment, Variant
from pixelpipe.core.settings import KafkaSettings, TopicSettings
from pixelpipe.core.topics import ensure_topics, publish_configuration, read_compacted

# How long a render waits for the experiment definitions its requests were assigned under, when moderation read them
# before its worker did (well under a second while Kafka is up); past it those requests fail, retryable.
ASSIGNED_REVISION_WAIT_S = 10.0
CATCH_UP_POLL_S = 0.02  # how often a render waiting for such a definition looks again


def to_definition(experiment: Experiment, revision: int, applied_by: str) -> ExperimentDefinition:
    return ExperimentDefinition(
        key=experiment.key,
        revision=revision,
        state="STOPPED" if experiment.stopped else "RUNNING",
        control=experiment.control,
        variants=[
            VariantDefinition(name=v.name, weight=v.weight, **{k: v.overrides.get(k) for k in OVERRIDE_TYPES})
            for v in experiment.variants
        ],
        start=experiment.start,
        end=experiment.end,
        description=experiment.description,
        applied_by=applied_by,
    )


def from_definition(definition: ExperimentDefinition) -> Experiment:
    variants = tuple(
        Variant(
            v.name,
            v.weight,
            MappingProxyType({k: getattr(v, k) for k in OVERRIDE_TYPES if getattr(v, k) is not None}),
        )
        for v in definition.variants
    )
    return Experiment(
        definition.key,
        variants,
        definition.start,
        definition.end,
        definition.control,
        definition.description,
        definition.revision,
        definition.state == "STOPPED",
    )


def read_experiments(kafka: KafkaSettings, topics: TopicSettings, codec: Codec) -> dict[str, Experiment]:
    """The experiments in force on the topic now, by key (stopped ones included)."""
    return {
        key: from_definition(codec.decode_as(ExperimentDefinition, value))
        for key, value in sorted(read_compacted(kafka, topics.experiments).items())
    }


def publish_experiments(
    kafka: KafkaSettings,
    topics: TopicSettings,
    codec: Codec,
    experiments: Mapping[str, Experiment],
    applied_by: str = "cli",
) -> dict[str, Experiment]:
    """Publish each experiment whose definition differs from the one in force, with the next revision; returns
    what was published, as it is now in force. The broker has taken them when this returns."""
    ensure_topics(kafka, topics, [topics.experiments])
    current = read_experiments(kafka, topics, codec)
    definitions = [
        to_definition(experiment, (current[key].revision if key in current else 0) + 1, applied_by)
        for key, experiment in experiments.items()
        if key not in current or not _same_definition(current[key], experiment)
    ]
    publish_configuration(kafka, topics.experiments, [(d.key, codec.encode(d)) for d in definitions])
    return {d.key: from_definition(d) for d in definitions}


def _same_definition(a: Experiment, b: Experiment) -> bool:
    """Equal but for the revision: republishing the same definition changes nothing."""
    return (a.key, a.variants, a.start, a.end, a.control, a.description, a.stopped) == (
        b.key,
        b.variants,
        b.start,
        b.end,
        b.control,
        b.description,
        b.stopped,
    )


def stopped(experiment: Experiment) -> Experiment:
    """The experiment stopped now: no request is assigned any more; it ends now (unless it ended already or has not
    started), and its definition stays for analysis."""
    now, end = utc_now(), experiment.end
    if experiment.start < now and (end is None or now < end):
        end = now
    return dataclasses.replace(experiment, end=end, stopped=True)


class LiveExperiments(Mapping[str, Experiment]):
    """The experiments a stage applies: those of its file, replaced or joined by the definitions the worker mirrors
    (``table``: raw keys and values as the topic holds them), decoded again only when it changed."""

    def __init__(self, from_file: Mapping[str, Experiment], table: Mapping[bytes, bytes], codec: Codec) -> None:
        self.from_file = dict(from_file)
        self.table = table
        self.codec = codec
        self._seen: dict[bytes, bytes] = {}
        self._merged: dict[str, Experiment] = dict(from_file)

    def current(self) -> dict[str, Experiment]:
        seen = dict(self.table)  # one copy under the GIL: the worker's mirror thread writes the table
        if seen != self._seen:
            live = {
                key.decode(): from_definition(self.codec.decode_as(ExperimentDefinition, value))
                for key, value in seen.items()
            }
            self._seen, self._merged = seen, self.from_file | live
        return self._merged

    def unread(self, revisions: Mapping[str, int], deadline: float) -> str | None:
        """Wait, up to ``deadline`` (``time.monotonic``), until this worker holds every experiment of ``revisions``
        (as moderation stamped them on a request) at that revision or a later one: moderation's mirror may read a
        change a moment before this one. None once it does; else which definitions it still lacks."""
        while True:
            current = self.current()
            behind = {
                key: current[key].revision if key in current else 0
                for key, revision in revisions.items()
                if key not in current or current[key].revision < revision
            }
            if not behind:
                return None
            if time.monotonic() >= deadline:
                named = ", ".join(
                    f"{key} revision {revisions[key]} (this worker holds {held or 'none'})"
                    for key, held in sorted(behind.items())
                )
                return f"the experiment definitions it was assigned under were not read here in time: {named}; retry it"
            time.sleep(CATCH_UP_POLL_S)

    def __getitem__(self, key: str) -> Experiment:
        return self.current()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.current())

    def __len__(self) -> int:
        return len(self.current())
