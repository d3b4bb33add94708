"""Model pools: named sets of models served by the same render workers, each pool on render topics of its own.

A pool's render topics are the render topics' names plus ``.<pool>`` (``pixelpipe.generate.sd``, its long lane
``pixelpipe.generate.sd.long``); its workers (``pixelpipe worker --pool sd``) load only its models and form a consumer
group of their own, so each pool batches one model's requests and scales on its own lag. The pool named ``default``
keeps the render topics' own names: with no pool configured, every model is served there, as before pools existed.

The pools are live configuration: ``ModelPool`` events keyed by pool name on a compacted topic (a tombstone removes
a pool), which every moderation worker reads into a Faust global table, so a change routes requests within
seconds without a restart. A JSON file is the import and export format (``pixelpipe pools apply`` / ``export``)::

    {"pools": [{"name": "sd", "models": ["sd-1.5"], "partitions": 8, "max_replicas": 8, "lag_threshold": 16},
               {"name": "flux", "models": ["flux.1-dev"]}]}
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixelpipe.core.codec import Codec
from pixelpipe.core.config_files import read_json_file
from pixelpipe.core.events import ModelPool
from pixelpipe.core.settings import KafkaSettings, TopicSettings
from pixelpipe.core.topics import ensure_topics, publish_configuration, read_compacted

DEFAULT_POOL = "default"
POOL_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
# "long" would name a pool's topics as the default pool's long lanes (pixelpipe.generate.long).
RESERVED_NAMES = frozenset({"long"})
POOL_FIELDS = ("name", "models", "partitions", "min_replicas", "max_replicas", "lag_threshold")


class PoolConfigError(ValueError):
    """A pools file or definition is malformed; the message names the pool and the field."""


@dataclass(frozen=True)
class Pool:
    """A pool's models and what its topics and autoscaler are sized to."""

    name: str
    models: tuple[str, ...]
    partitions: int | None = None  # its render topics'; None: PIXELPIPE_TOPIC_PARTITIONS
    min_replicas: int = 1
    max_replicas: int | None = None  # None: one worker per partition (more would idle)
    lag_threshold: int = 16  # requests waiting per worker the autoscaler aims for

    def __post_init__(self) -> None:
        check_pool_name(self.name)
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise PoolConfigError(f"pool {self.name!r}: 'models' must list one or more model names")
        if len(set(self.models)) != len(self.models):
            raise PoolConfigError(f"pool {self.name!r}: a model is listed twice in {list(self.models)}")
        for key in ("partitions", "max_replicas", "lag_threshold"):
            value = getattr(self, key)
            if value is not None and not _is_count(value, 1):
                raise PoolConfigError(f"pool {self.name!r}: {key!r} must be a whole number of 1 or more, got {value!r}")
        if not _is_count(self.min_replicas, 0):
            raise PoolConfigError(f"pool {self.name!r}: 'min_replicas' must be 0 or more, got {self.min_replicas!r}")
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise PoolConfigError(
                f"pool {self.name!r}: max_replicas {self.max_replicas} is below min_replicas {self.min_replicas}"
            )

    def replica_limit(self, default_partitions: int) -> int:
        """The most workers that can be busy: a consumer group gives each partition to one member."""
        partitions = self.partitions or default_partitions
        return min(self.max_replicas or partitions, partitions)

    def to_json(self) -> dict[str, Any]:
        document = {key: getattr(self, key) for key in POOL_FIELDS}
        document["models"] = list(self.models)
        return {key: value for key, value in document.items() if value is not None}

    def to_event(self, applied_by: str) -> ModelPool:
        return ModelPool(
            name=self.name,
            models=list(self.models),
            partitions=self.partitions,
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            lag_threshold=self.lag_threshold,
            applied_by=applied_by,
        )

    @classmethod
    def from_event(cls, event: ModelPool) -> Pool:
        return cls(
            event.name,
            tuple(event.models),
            event.partitions,
            event.min_replicas,
            event.max_replicas,
            event.lag_threshold,
        )


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_pool_name(name: Any) -> str:
    if not isinstance(name, str) or not POOL_NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise PoolConfigError(
            f"pool name {name!r}: 1 to 40 lowercase letters, digits and dashes, starting with a letter or digit, "
            f"and not {', '.join(sorted(RESERVED_NAMES))}"
        )
    return name


def parse_pools(data: Any) -> dict[str, Pool]:
    """Pools by name from a parsed pools document; a model may be in one pool only."""
    items = data.get("pools") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise PoolConfigError('a pools file must be an object with a "pools" list')
    pools: dict[str, Pool] = {}
    served_by: dict[str, str] = {}
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise PoolConfigError(f"pool #{index + 1}: must be an object")
        unknown = set(item) - set(POOL_FIELDS)
        if unknown:
            raise PoolConfigError(f"pool {item.get('name', f'#{index + 1}')!r}: unknown fields {sorted(unknown)}")
        name = check_pool_name(item.get("name"))
        if name in pools:
            raise PoolConfigError(f"pool {name!r} is defined twice")
        models = item.get("models")
        if not isinstance(models, list):
            raise PoolConfigError(f"pool {name!r}: 'models' must be a list of model names")
        pool = Pool(
            name,
            tuple(models),
            item.get("partitions"),
            item.get("min_replicas", 1),
            item.get("max_replicas"),
            item.get("lag_threshold", 16),
        )
        for model in pool.models:
            if model in served_by:
                raise PoolConfigError(f"model {model!r} is in pools {served_by[model]!r} and {name!r}; one pool each")
            served_by[model] = name
        pools[name] = pool
    return pools


def load_pools(path: str | Path) -> dict[str, Pool]:
    return parse_pools(read_json_file(path, "pools file", PoolConfigError))


def pools_document(pools: Mapping[str, Pool]) -> dict[str, Any]:
    """The pools file's JSON: what ``load_pools`` reads back."""
    return {"pools": [pools[name].to_json() for name in sorted(pools)]}


def pool_topics(topics: TopicSettings, pool: str) -> TopicSettings:
    """The topic settings a pool's render workers use: its own render topics; the default pool's are unchanged."""
    if pool == DEFAULT_POOL:
        return topics
    check_pool_name(pool)
    return dataclasses.replace(
        topics,
        generate=f"{topics.generate}.{pool}",
        edit=f"{topics.edit}.{pool}",
        generate_long=f"{topics.generate}.{pool}.long",
        edit_long=f"{topics.edit}.{pool}.long",
    )


def topic_pool(topics: TopicSettings, topic: str) -> str | None:
    """The pool whose render topic (or long lane) ``topic`` is, read back from the names ``pool_topics`` gives the
    render ``topics`` (the default pool's); None for a topic of no pool (requests, results, ...)."""
    if topic in topics.render():
        return DEFAULT_POOL
    for kind_topic in (topics.generate, topics.edit):
        if topic.startswith(kind_topic + "."):
            name = topic.removeprefix(kind_topic + ".").removesuffix(".long")
            if POOL_NAME.fullmatch(name) and name not in RESERVED_NAMES and topic in pool_topics(topics, name).render():
                return name
    return None


class PoolRouting:
    """Which pool serves each model, as the model-pools global table says now (``table``: raw keys and values, as
    the worker's table holds them). Of two pools that list a model (a move: the pool gaining it is published first)
    the one applied later serves it. No pool configured: the default pool serves every model."""

    def __init__(self, table: Mapping[bytes, bytes], codec: Codec) -> None:
        self.table = table
        self.codec = codec
        self._seen: tuple[tuple[bytes, bytes], ...] = ()
        self._pool_of: dict[str, str] = {}

    def snapshot(self) -> dict[str, str]:
        """Model -> pool, decoded again only when the table changed."""
        seen = tuple(sorted(self.table.items()))
        if seen != self._seen:
            events = [self.codec.decode_as(ModelPool, value) for _, value in seen]
            pool_of: dict[str, str] = {}
            for event in sorted(events, key=lambda e: e.event_time):
                pool_of.update(dict.fromkeys(event.models, event.name))
            self._seen, self._pool_of = seen, pool_of
        return self._pool_of

    def pool_for(self, model: str) -> str | None:
        """The pool serving ``model``; None when pools are configured and none lists it."""
        pool_of = self.snapshot()
        if not pool_of:
            return DEFAULT_POOL
        return pool_of.get(model)

    def pools(self) -> list[str]:
        return sorted(set(self.snapshot().values()))


def read_pools(kafka: KafkaSettings, topics: TopicSettings, codec: Codec) -> dict[str, Pool]:
    """The pools in force: the model-pools topic read to its end now (a topic not made yet holds none)."""
    return {
        name: Pool.from_event(codec.decode_as(ModelPool, value))
        for name, value in sorted(read_compacted(kafka, topics.model_pools).items())
    }


@dataclass(frozen=True)
class PoolChanges:
    """What ``apply_pools`` did."""

    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: list[str]
    topics_created: list[str]


def apply_pools(
    kafka: KafkaSettings,
    topics: TopicSettings,
    codec: Codec,
    pools: Mapping[str, Pool],
    applied_by: str = "cli",
    progress: Callable[[str], None] = lambda _: None,
) -> PoolChanges:
    """Make ``pools`` the pools in force: their render topics are created first (so moderation can forward at
    once), then the pools that gain a model are published before those that lose one, then the removed pools'
    tombstones: a model that moves is served by one pool or the other throughout, never by none."""
    current = read_pools(kafka, topics, codec)
    created = ensure_topics(kafka, topics, [topics.model_pools])
    for pool in pools.values():
        own = pool_topics(topics, pool.name)
        created += ensure_topics(kafka, own, own.render(), partitions=pool.partitions)
    progress(f"render topics ready for {len(pools)} pool(s)")
    old_pool_of = {model: pool.name for pool in current.values() for model in pool.models}
    upserts = [pool for name, pool in sorted(pools.items()) if current.get(name) != pool]
    # A pool that takes a model from another goes first: until the other's change, the later one serves it.
    upserts.sort(key=lambda pool: not any(old_pool_of.get(m, pool.name) != pool.name for m in pool.models))
    removed = sorted(set(current) - set(pools))
    # One partition, one producer: the broker keeps this order.
    publish_configuration(
        kafka,
        topics.model_pools,
        [(pool.name, codec.encode(pool.to_event(applied_by))) for pool in upserts] + [(n, None) for n in removed],
    )
    progress(f"published {len(upserts)} pool(s), removed {len(removed)}")
    return PoolChanges(
        added=[p.name for p in upserts if p.name not in current],
        changed=[p.name for p in upserts if p.name in current],
        removed=removed,
        unchanged=sorted(name for name in pools if current.get(name) == pools[name]),
        topics_created=created,
    )


def pool_models(pools: Mapping[str, Pool], pool: str, registry_names: Sequence[str]) -> list[str]:
    """The models a worker of ``pool`` loads: the pool's; with no pool configured, the default pool serves the whole
    registry. A default pool left out of the pools in force loads none up front: its workers drain what was routed
    to its topics before, loading each model on its first request."""
    if pool == DEFAULT_POOL and DEFAULT_POOL not in pools:
        return [] if pools else list(registry_names)
    if pool not in pools:
        known = ", ".join(sorted(pools)) or "none"
        raise PoolConfigError(
            f"pool {pool!r} is not configured (pools in force: {known}); apply a pools file that defines it: "
            "pixelpipe pools apply FILE"
        )
    missing = [model for model in pools[pool].models if model not in registry_names]
    if missing:
        raise PoolConfigError(f"pool {pool!r} lists models the registry does not hold: {', '.join(missing)}")
    return list(pools[pool].models)
