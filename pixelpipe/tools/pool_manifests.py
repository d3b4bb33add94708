"""Kubernetes manifests for the model pools' render workers: ``pixelpipe pools keda``.

Each pool gets a Deployment of render workers (``pixelpipe worker --stages generate,edit --pool NAME``: the image,
settings, resources and probes of deploy/kubernetes/render.yaml) and a KEDA ScaledObject that scales it on its
consumer group's lag over the pool's four render topics (generate, edit and their long lanes), between the pool's
``min_replicas`` and its replica limit, aiming for ``lag_threshold`` waiting requests per worker (the settings of
deploy/kubernetes/scaledobjects.yaml's render object). The default pool keeps today's names: its manifests are
render.yaml's and scaledobjects.yaml's, which tests/unit/test_pool_manifests.py holds equal.

The YAML is written here, block style, from the manifests as dicts: no YAML library is a dependency at run time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pixelpipe.core.pools import DEFAULT_POOL, Pool, PoolConfigError, pool_topics
from pixelpipe.core.settings import Settings
from pixelpipe.processors.app import group_id
from pixelpipe.processors.build import LONG, RENDER_KINDS

RENDER_DEPLOYMENT = "pixelpipe-render"
POOL_LABEL = "pixelpipe/pool"
PART_OF = {"app.kubernetes.io/part-of": "pixelpipe"}
IMAGE = "pixelpipe:latest"
METRICS_PORT = 9400
HEADER = """\
# Render workers and their KEDA ScaledObjects, one of each per model pool, written by `pixelpipe pools keda` from
# the pools and this process's PIXELPIPE_* settings (topics, consumer group, partitions, Kafka bootstrap).
# Modelled on deploy/kubernetes/render.yaml and scaledobjects.yaml, which serve the default pool.
"""

# A string YAML reads back as the same string when written bare; anything else is written double-quoted.
_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_YAML_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "y", "n", "null"})


def deployment_name(pool: str) -> str:
    return RENDER_DEPLOYMENT if pool == DEFAULT_POOL else f"{RENDER_DEPLOYMENT}-{pool}"


def render_deployment(pool: Pool) -> dict[str, Any]:
    """The pool's render workers: one GPU each, its models from the models volume."""
    name = deployment_name(pool.name)
    labels = {"app.kubernetes.io/name": name, **PART_OF, POOL_LABEL: pool.name}
    args = ["worker", "--stages", ",".join(RENDER_KINDS)]
    if pool.name != DEFAULT_POOL:
        args += ["--pool", pool.name]
    http_get = {"path": "/healthz", "port": "metrics"}
    worker = {
        "name": "worker",
        "image": IMAGE,
        "args": args,
        "envFrom": [{"configMapRef": {"name": "pixelpipe"}}, {"secretRef": {"name": "pixelpipe-secrets"}}],
        "resources": {
            "requests": {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
        },
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        # Loading and compiling a model takes minutes: the startup probe allows 900 s.
        "startupProbe": {"httpGet": http_get, "periodSeconds": 10, "failureThreshold": 90},
        "livenessProbe": {"httpGet": http_get, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": pool.min_replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "terminationGracePeriodSeconds": 120,
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [worker],
                    "volumes": [
                        {
                            "name": "models",
                            "persistentVolumeClaim": {"claimName": "pixelpipe-models", "readOnly": True},
                        }
                    ],
                },
            },
        },
    }


def render_scaled_object(pool: Pool, settings: Settings) -> dict[str, Any]:
    """KEDA's scaling of the pool's render workers on their consumer group's lag."""
    replica_limit = pool.replica_limit(settings.topics.partitions)
    if pool.min_replicas > replica_limit:
        raise PoolConfigError(
            f"pool {pool.name!r}: min_replicas {pool.min_replicas} is above its {replica_limit} partitions; a "
            "consumer group has no more busy members than partitions: give the pool more partitions"
        )
    topics = pool_topics(settings.topics, pool.name)
    group = group_id(settings.updated(pool=pool.name), RENDER_KINDS)
    lanes = [*RENDER_KINDS, *(f"{kind}{LONG}" for kind in RENDER_KINDS)]  # topics.render()'s order
    triggers = [
        {
            "type": "kafka",
            "name": f"{lane}-lag",
            "metadata": {
                "bootstrapServers": settings.kafka.bootstrap,
                "consumerGroup": group,
                "topic": topic,
                "lagThreshold": str(pool.lag_threshold),
                "offsetResetPolicy": "earliest",
                "allowIdleConsumers": "false",
            },
        }
        for lane, topic in zip(lanes, topics.render(), strict=True)
    ]
    name = deployment_name(pool.name)
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name, "labels": {**PART_OF, POOL_LABEL: pool.name}},
        "spec": {
            "scaleTargetRef": {"name": name},
            "minReplicaCount": pool.min_replicas,
            "maxReplicaCount": replica_limit,
            "pollingInterval": 15,
            # GPU workers take minutes to load and warm their models: scale down slowly, scale up at once.
            "cooldownPeriod": 600,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        "scaleDown": {
                            "stabilizationWindowSeconds": 600,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
                        },
                        "scaleUp": {
                            "stabilizationWindowSeconds": 0,
                            "policies": [{"type": "Pods", "value": 4, "periodSeconds": 60}],
                        },
                    }
                }
            },
            "triggers": triggers,
        },
    }


def _replica_comment(pool: Pool, settings: Settings) -> str:
    partitions = pool.partitions or settings.topics.partitions
    capped = f" (its max_replicas {pool.max_replicas} is capped)" if (pool.max_replicas or 0) > partitions else ""
    return (
        f"# Pool {pool.name}: maxReplicaCount is never above the pool's {partitions} partitions{capped}: a consumer "
        "group\n# has no more busy members than partitions, and a worker beyond them would sit idle.\n"
    )


def pool_manifests(pools: Mapping[str, Pool], settings: Settings) -> str:
    """Each pool's render Deployment and KEDA ScaledObject, by pool name, as one multi-document YAML stream."""
    documents = []
    for name in sorted(pools):
        pool = pools[name]
        documents.append(to_yaml(render_deployment(pool)))
        documents.append(_replica_comment(pool, settings) + to_yaml(render_scaled_object(pool, settings)))
    return HEADER + "---\n".join(documents)


def to_yaml(document: Mapping[str, Any]) -> str:
    """``document`` (mappings, lists, strings, whole numbers and booleans) as block-style YAML."""
    return "".join(f"{line}\n" for line in _block(document, 0))


def _block(node: Mapping[str, Any] | list[Any], indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(node, Mapping):
        entries = [(f"{_scalar(key)}:", value) for key, value in node.items()]
    else:
        entries = [("-", item) for item in node]
    lines: list[str] = []
    for lead, value in entries:
        if isinstance(value, Mapping | list) and value:
            nested = _block(value, indent + 2)
            if lead == "-":  # a list item's first key or item goes on the dash's line
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines += nested[1:]
            else:
                lines += [f"{pad}{lead}", *nested]
        else:
            lines.append(f"{pad}{lead} {_scalar(value)}")
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Mapping | list):  # only empty ones get here
        return json.dumps(value)
    if not isinstance(value, str):
        raise TypeError(f"cannot write {type(value).__name__} {value!r} as YAML here")
    if _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS:
        return value
    # JSON's escapes, and YAML's for what it must not read raw (DEL, C1 controls, line separators)
    body = json.dumps(value, ensure_ascii=False)[1:-1]
    return '"' + "".join(c if c.isprintable() else f"\\U{ord(c):08x}" for c in body) + '"'
