"""The pools' Kubernetes manifests (``pixelpipe pools keda``): deploy/kubernetes/pools.yaml is what the function
writes for deploy/kubernetes/pools.json under the ConfigMap's settings, each pool's workers read its own topics in
its own consumer group within its partitions, and the default pool's manifests are render.yaml's and
scaledobjects.yaml's. tests/unit/test_deploy.py validates pools.yaml with the other manifests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pixelpipe.core.pools import Pool, PoolConfigError, load_pools
from pixelpipe.core.settings import Settings
from pixelpipe.tools.pool_manifests import pool_manifests, render_deployment, render_scaled_object, to_yaml

KUBERNETES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
POOLS_FILE = KUBERNETES / "pools.json"
MANIFESTS = KUBERNETES / "pools.yaml"


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def settings() -> Settings:
    """The settings the manifests' workers run with: the ConfigMap's."""
    config = next(doc for doc in _documents(KUBERNETES / "config.yaml") if doc["kind"] == "ConfigMap")
    return Settings.from_env(config["data"])


def test_the_committed_manifests_are_what_the_pools_file_generates(settings):
    generated = pool_manifests(load_pools(POOLS_FILE), settings)
    assert MANIFESTS.read_text() == generated, (
        "deploy/kubernetes/pools.yaml is stale; write it again with the ConfigMap's settings: "
        "PIXELPIPE_KAFKA_BOOTSTRAP=kafka:9092 PIXELPIPE_TOPIC_PARTITIONS=32 "
        "pixelpipe pools keda deploy/kubernetes/pools.json > deploy/kubernetes/pools.yaml"
    )
    assert list(yaml.safe_load_all(generated)) == [
        document
        for pool in sorted(load_pools(POOLS_FILE).values(), key=lambda p: p.name)
        for document in (render_deployment(pool), render_scaled_object(pool, settings))
    ]


def test_each_pool_scales_its_own_workers_on_its_own_group_and_topics_within_its_partitions(settings):
    pools = load_pools(POOLS_FILE)
    assert len(pools) == 2
    documents = _documents(MANIFESTS)
    deployments = {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == "Deployment"}
    scaled = {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == "ScaledObject"}
    assert set(deployments) == set(scaled) == {f"pixelpipe-render-{name}" for name in pools}
    generate, edit = settings.topics.generate, settings.topics.edit
    for name, pool in pools.items():
        deployment = deployments[f"pixelpipe-render-{name}"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["worker", "--stages", "generate,edit", "--pool", name]
        assert deployment["spec"]["template"]["metadata"]["labels"]["pixelpipe/pool"] == name
        assert deployment["metadata"]["labels"]["pixelpipe/pool"] == name
        spec = scaled[f"pixelpipe-render-{name}"]["spec"]
        assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        triggers = [trigger["metadata"] for trigger in spec["triggers"]]
        assert {t["topic"] for t in triggers} == {
            f"{generate}.{name}",
            f"{edit}.{name}",
            f"{generate}.{name}.long",
            f"{edit}.{name}.long",
        }
        assert {t["consumerGroup"] for t in triggers} == {f"{settings.stages.consumer_group}-generate-edit-{name}"}
        assert {t["lagThreshold"] for t in triggers} == {str(pool.lag_threshold)}
        partitions = pool.partitions or settings.topics.partitions
        assert spec["minReplicaCount"] == pool.min_replicas
        assert spec["maxReplicaCount"] == min(pool.max_replicas or partitions, partitions)
    # The example shows both: a cap below the partitions (sd), and the partitions as the cap by default (flux).
    assert scaled["pixelpipe-render-sd"]["spec"]["maxReplicaCount"] == 16 < pools["sd"].partitions
    assert scaled["pixelpipe-render-flux"]["spec"]["maxReplicaCount"] == pools["flux"].partitions


def test_the_default_pool_keeps_todays_manifests(settings):
    default = Pool("default", ("sd15",))
    [today] = _documents(KUBERNETES / "render.yaml")
    assert render_deployment(default) == today
    [todays_scaling] = [
        doc for doc in _documents(KUBERNETES / "scaledobjects.yaml") if doc["metadata"]["name"] == "pixelpipe-render"
    ]
    assert render_scaled_object(default, settings) == todays_scaling


def test_max_replicas_above_the_partitions_is_capped_and_the_manifest_says_so(settings):
    pool = Pool("big", ("sdxl",), partitions=4, max_replicas=10)
    assert render_scaled_object(pool, settings)["spec"]["maxReplicaCount"] == 4
    said = "never above the pool's 4 partitions (its max_replicas 10 is capped)"
    assert said in pool_manifests({"big": pool}, settings)
    assert "capped" not in pool_manifests({"big": Pool("big", ("sdxl",), partitions=4)}, settings)


def test_min_replicas_above_the_partitions_is_refused(settings):
    pool = Pool("small", ("sd15",), partitions=2, min_replicas=3)
    with pytest.raises(PoolConfigError, match="pool 'small': min_replicas 3 is above its 2 partitions"):
        pool_manifests({"small": pool}, settings)


def test_to_yaml_reads_back_as_written():
    words = ["true", "No", "null", "~", "16", "1.5", "0x1f", "-", "-1", "", " lead", "a: b", "#x", "x # y", "[a]"]
    words += ["{b}", "*ref", "&anchor", "!tag", "%p", "|", ">", "'q'", '"dq"', "`t`", "@a", "kafka:9092", "a,b"]
    words += ["é", "😀", "line\nbreak\ttab\\", "del\x7f c1\x85 separator\u2028 zero-width\u200b"]
    document = {
        "words": words,
        "on": {"yes": 0, "n": -3, "flag": False, "empty": [], "none": {}},
        "nested": [[1, [2]], {"a": {"b": ["c"]}}, [{"d": 1, "e": 2}]],
        "nvidia.com/gpu": "1",
    }
    assert yaml.safe_load(to_yaml(document)) == document


def test_to_yaml_refuses_what_it_cannot_write():
    with pytest.raises(TypeError, match=r"cannot write float 1\.5 as YAML"):
        to_yaml({"ratio": 1.5})
