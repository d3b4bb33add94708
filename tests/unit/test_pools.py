"""Model pools without a broker: the pools file, each pool's topics, routing by the live table (decoded from the
events as the global table holds them), the models a worker loads, and moderation sending each request to its
final model's pool."""

import datetime as dt

import pytest

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ImageResult
from pixelpipe.core.pools import (
    DEFAULT_POOL,
    Pool,
    PoolConfigError,
    PoolRouting,
    parse_pools,
    pool_models,
    pool_topics,
    pools_document,
)
from pixelpipe.core.settings import ModerationSettings, StageSettings, TopicSettings
from pixelpipe.processors.messages import Inbound, StageContext
from pixelpipe.processors.moderation_stage import ModerationStage
from pixelpipe.processors.stamp import ModerationStamp
from tests.unit.test_stages import EXPERIMENTS, LIMITS, AllowEveryPrompt, RegistryOnlyModels, request

CODEC = Codec()
T0 = dt.datetime(2026, 12, 6, 12, tzinfo=dt.UTC)


def table(*pools: Pool, at: dt.datetime = T0) -> dict[bytes, bytes]:
    """The global table's raw data after these pools were applied, one second apart."""
    data = {}
    for i, pool in enumerate(pools):
        event = pool.to_event("test")
        event.event_time = at + dt.timedelta(seconds=i)
        data[pool.name.encode()] = CODEC.encode(event)
    return data


def test_a_pools_file_reads_back_as_it_was_written_with_defaults_filled():
    pools = parse_pools(
        {
            "pools": [
                {"name": "sd", "models": ["tiny-sd"], "partitions": 4, "max_replicas": 6, "lag_threshold": 8},
                {"name": "b", "models": ["tiny-sd-b", "other"]},
            ]
        }
    )
    assert pools["sd"] == Pool("sd", ("tiny-sd",), 4, 1, 6, 8)
    assert pools["b"] == Pool("b", ("tiny-sd-b", "other"))
    assert parse_pools(pools_document(pools)) == pools
    assert pools["sd"].replica_limit(default_partitions=32) == 4  # never more busy workers than partitions
    assert pools["b"].replica_limit(default_partitions=32) == 32


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], 'must be an object with a "pools" list'),
        ({"pools": [{"name": "Big Pool", "models": ["m"]}]}, "pool name 'Big Pool': 1 to 40 lowercase"),
        ({"pools": [{"name": "long", "models": ["m"]}]}, "and not long"),
        ({"pools": [{"name": "a", "models": []}]}, "'models' must list one or more model names"),
        ({"pools": [{"name": "a", "models": "m"}]}, "'models' must be a list"),
        ({"pools": [{"name": "a", "models": ["m"]}, {"name": "b", "models": ["m"]}]}, "is in pools 'a' and 'b'"),
        ({"pools": [{"name": "a", "models": ["m"]}, {"name": "a", "models": ["n"]}]}, "defined twice"),
        ({"pools": [{"name": "a", "models": ["m"], "replicas": 3}]}, "unknown fields ['replicas']"),
        ({"pools": [{"name": "a", "models": ["m"], "partitions": 0}]}, "'partitions' must be a whole number"),
        ({"pools": [{"name": "a", "models": ["m"], "min_replicas": 3, "max_replicas": 2}]}, "below min_replicas"),
    ],
)
def test_a_bad_pools_file_is_refused_naming_the_pool_and_field(document, message):
    with pytest.raises(PoolConfigError) as raised:
        parse_pools(document)
    assert message in str(raised.value)


def test_a_pool_reads_topics_of_its_own_and_the_default_pool_todays():
    topics = TopicSettings()
    assert pool_topics(topics, DEFAULT_POOL) == topics
    own = pool_topics(topics, "sd")
    assert own.render() == [
        "pixelpipe.generate.sd",
        "pixelpipe.edit.sd",
        "pixelpipe.generate.sd.long",
        "pixelpipe.edit.sd.long",
    ]
    assert (own.requests, own.results, own.cancellations) == (topics.requests, topics.results, topics.cancellations)


def test_routing_follows_the_table_and_a_moved_model_goes_to_the_pool_applied_last():
    data = table(Pool("a", ("tiny-sd",)), Pool("b", ("tiny-sd-b",)))
    routing = PoolRouting(data, CODEC)
    assert (routing.pool_for("tiny-sd"), routing.pool_for("tiny-sd-b"), routing.pool_for("gone")) == ("a", "b", None)
    # A move as `apply` publishes it: the pool gaining the model first, then the one losing it.
    data[b"b"] = table(Pool("b", ("tiny-sd-b", "tiny-sd")), at=T0 + dt.timedelta(minutes=1))[b"b"]
    assert routing.pool_for("tiny-sd") == "b"  # listed by both for a moment: the later one serves it
    data[b"a"] = table(Pool("a", ("other",)), at=T0 + dt.timedelta(minutes=2))[b"a"]
    assert routing.pool_for("tiny-sd") == "b"
    del data[b"b"]  # a tombstone removed the pool
    assert routing.pool_for("tiny-sd") is None
    assert routing.pools() == ["a"]


def test_with_no_pool_configured_the_default_pool_serves_every_model():
    routing = PoolRouting({}, CODEC)
    assert routing.pool_for("anything") == DEFAULT_POOL
    assert pool_models({}, DEFAULT_POOL, ["x", "y"]) == ["x", "y"]


def test_a_worker_loads_its_pools_models_and_refuses_a_pool_not_configured():
    pools = {"a": Pool("a", ("x",)), "b": Pool("b", ("y", "z"))}
    assert pool_models(pools, "b", ["x", "y", "z"]) == ["y", "z"]
    with pytest.raises(PoolConfigError, match=r"pool 'c' is not configured \(pools in force: a, b\)"):
        pool_models(pools, "c", ["x", "y", "z"])
    with pytest.raises(PoolConfigError, match="lists models the registry does not hold: z"):
        pool_models(pools, "b", ["x", "y"])
    assert pool_models(pools, DEFAULT_POOL, ["x", "y", "z"]) == []  # drains its topics, loading on demand


def pooled_moderation(data) -> ModerationStage:
    """A moderation stage routing by the pools table ``data``, with the test registry and experiments."""
    context = StageContext(TopicSettings(), LIMITS, StageSettings(), CODEC, "worker", ModerationStamp("key"))
    return ModerationStage(
        context,
        ModerationSettings(),
        AllowEveryPrompt(),
        None,
        None,
        RegistryOnlyModels.registry,
        EXPERIMENTS,
        pools=PoolRouting(data, CODEC),
    )


def moderate_with_pools(requests, data):
    """Where moderation sent each request (its topic), and the results of those that ended there."""
    topics = TopicSettings()
    stage = pooled_moderation(data)
    messages = [
        Inbound(CODEC.encode(r), r.request_id.encode(), topics.requests, 0, i, 1000.0, appended_s=1000.0 + i)
        for i, r in enumerate(requests)
    ]
    emissions = stage.handle_batch(messages)
    went = {e.key.decode(): e.topic for e in emissions if e.topic.startswith(("pixelpipe.generate", "pixelpipe.edit"))}
    results = {e.key.decode(): CODEC.decode_as(ImageResult, e.value) for e in emissions if e.topic == topics.results}
    return went, results


def test_moderation_routes_each_request_to_its_final_models_pool_and_fails_an_unserved_model_at_once():
    data = table(Pool("sd", ("tiny-sd",)), Pool("sd-b", ("tiny-sd-b",)))
    own = request()
    moved = request(experiments={"b-model": "big"})  # the variant renders with tiny-sd-b
    edit = request(kind="EDIT", source_image_uri="file:///s.png", model="tiny-sd-b")
    long = request(width=2048, height=2048, n=2, steps=30)
    unserved = request(model="tiny-sd-c")
    unserved_by_variant = request(model="tiny-sd-b", experiments={"b-model": "big"})
    went, results = moderate_with_pools([own, moved, long, unserved], data)
    assert went == {
        own.request_id: "pixelpipe.generate.sd",
        moved.request_id: "pixelpipe.generate.sd-b",
        long.request_id: "pixelpipe.generate.sd.long",
    }
    failed = results[unserved.request_id]
    assert (failed.status, failed.error_code) == ("FAILED", "MODEL_NOT_SERVED")
    assert failed.error_message == (
        "model 'tiny-sd-c' is served by no pool (pools: sd, sd-b); an operator adds it to one with "
        "pixelpipe pools apply"
    )
    data = table(Pool("sd", ("tiny-sd",)))
    _, results = moderate_with_pools([unserved_by_variant], data)
    assert results[unserved_by_variant.request_id].error_message.startswith(
        "model 'tiny-sd-b' (set by experiment b-model, variant big) is served by no pool (pools: sd)"
    )
    # The result names the model the variant would have run with, not the request's own.
    _, results = moderate_with_pools([moved], data)
    assert (results[moved.request_id].error_code, results[moved.request_id].model) == ("MODEL_NOT_SERVED", "tiny-sd-b")
    assert edit.kind == "EDIT"


def test_with_no_pool_configured_moderation_forwards_to_todays_topics():
    went, results = moderate_with_pools([r := request(model="tiny-sd-c")], {})
    assert went == {r.request_id: "pixelpipe.generate"} and not results
