"""What operations run, checked offline: the alert rules and Prometheus configurations with promtool, the
Kubernetes manifests with kubernetes-validate's shipped schemas, the KEDA ScaledObjects against KEDA's CRD kept in
deploy/keda, the Grafana operations dashboard against the metrics the code defines, and docker-compose.yml against
the Compose Specification's schema (tests/fixtures/compose) and this repository."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pixelpipe.core.pools import DEFAULT_POOL, pool_topics
from pixelpipe.core.settings import Settings
from pixelpipe.tools.stack import StackSettings
from pixelpipe.tools.stack.services import ALERT_RULES, Prometheus

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.30.0"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
OPERATIONS_DASHBOARD = ROOT / "analytics" / "grafana" / "dashboards" / "pixelpipe-operations.json"


def _documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: scripts/setup.sh installs Debian's prometheus package, which ships it")
    return promtool


def test_promtool_checks_the_alert_rules():
    done = subprocess.run([_promtool(), "check", "rules", str(ALERT_RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


def test_every_alert_the_issue_names_is_there():
    rules = yaml.safe_load(ALERT_RULES.read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert names == {
        "PixelpipeConsumerLagGrowing",
        "PixelpipeDeadLetterRate",
        "PixelpipeDeadlineMisses",
        "PixelpipeModerationRejectionSpike",
        "PixelpipeGpuIdleWhileLag",
    }
    assert all(rule["for"].endswith("m") and rule["annotations"]["summary"] for rule in rules)


def test_the_gpu_idle_alert_names_the_pool_whose_requests_wait_while_its_models_are_idle(tmp_path):
    # Requests wait in pools sd and flux and at moderation; only flux's models are busy: the alert is sd's alone.
    lag = "pixelpipe_consumer_lag_messages{{group='{group}', topic='{topic}', partition='0', pool='{pool}'}}"
    busy = "pixelpipe_model_busy_seconds_total{{stage='generate', pool='{pool}', instance='{pool}-worker'}}"
    series = [
        {"series": lag.format(group="pixelpipe-generate-edit-sd", topic="pixelpipe.generate.sd", pool="sd"),
         "values": "5x15"},
        {"series": lag.format(group="pixelpipe-generate-edit-flux", topic="pixelpipe.generate.flux", pool="flux"),
         "values": "5x15"},
        {"series": lag.format(group="pixelpipe-moderation", topic="pixelpipe.requests", pool=""), "values": "5x15"},
        {"series": busy.format(pool="sd"), "values": "0x15"},
        {"series": busy.format(pool="flux"), "values": "0+30x15"},
    ]  # fmt: skip
    expected = {
        "exp_labels": {"alertname": "PixelpipeGpuIdleWhileLag", "severity": "page", "pool": "sd"},
        "exp_annotations": {
            "summary": "Render requests of pool sd wait while none of its models is busy",
            "description": "The pool's render workers (pixelpipe worker --pool sd) are down, not ready, or stuck "
            "before their model calls.",
        },
    }
    tests = {
        "rule_files": [str(ALERT_RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "12m", "alertname": "PixelpipeGpuIdleWhileLag", "exp_alerts": [expected]}
                ],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    done = subprocess.run([_promtool(), "test", "rules", str(tmp_path / "tests.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_checks_the_stacks_and_composes_prometheus_configurations(tmp_path):
    stack = dataclasses.replace(StackSettings(), dir=str(tmp_path))
    prometheus = Prometheus(stack)
    prometheus.prepare()
    done = subprocess.run(
        [_promtool(), "check", "config", str(prometheus.dir / "prometheus.yml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    compose = DEPLOY / "prometheus" / "prometheus-compose.yml"
    done = subprocess.run(
        [_promtool(), "check", "config", "--syntax-only", str(compose)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("name", "document"), [d for d in _documents() if d[1]["apiVersion"] != "keda.sh/v1alpha1"])
def test_each_kubernetes_manifest_is_valid_for_its_schema(name, document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def _closed(schema: dict) -> dict:
    """``schema`` with every object that lists its properties closed to others: the API server's strict field
    validation refuses an unknown field (a typo such as ``maxReplicas``), which a plain JSON schema check lets by."""
    schema = copy.deepcopy(schema)

    def close(node: object) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and node.get("type") == "object":
                node["additionalProperties"] = False
            for child in node.values():
                close(child)
        elif isinstance(node, list):
            for child in node:
                close(child)

    close(schema)
    return schema


def _scaled_objects() -> list[dict]:
    return [doc for _, doc in _documents() if doc["kind"] == "ScaledObject"]


def test_the_scaled_objects_follow_kedas_crd():
    crd = yaml.safe_load((DEPLOY / "keda" / "keda.sh_scaledobjects.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema = _closed(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is the API server's, checked apart
    scaled = _scaled_objects()
    assert len(scaled) == 4  # render and moderation, and the render workers of pools.yaml's two pools
    for document in scaled:
        jsonschema.validate(document, schema)
        assert document["apiVersion"] == f"{crd['spec']['group']}/v1alpha1"
    wrong = copy.deepcopy(scaled[0])
    wrong["spec"]["maxReplicas"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, schema)


def test_the_scaled_objects_scale_the_workers_on_their_groups_lag_within_the_partitions():
    settings = Settings()
    deployments = {doc["metadata"]["name"]: doc for _, doc in _documents() if doc["kind"] == "Deployment"}
    config = next(doc for _, doc in _documents() if doc["kind"] == "ConfigMap")["data"]
    partitions = int(config["PIXELPIPE_TOPIC_PARTITIONS"])
    for scaled in _scaled_objects():
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        args = target["spec"]["template"]["spec"]["containers"][0]["args"]
        stages = args[args.index("--stages") + 1].split(",")
        pool = args[args.index("--pool") + 1] if "--pool" in args else DEFAULT_POOL
        group = f"{settings.stages.consumer_group}-" + "-".join(stages)  # processors.app.group_id
        group += "" if pool == DEFAULT_POOL else f"-{pool}"
        own = pool_topics(settings.topics, pool)
        topics = {"moderation": {own.requests}, "generate": {own.generate, own.generate_long}}
        topics |= {"edit": {own.edit, own.edit_long}}
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["type"] == "kafka"
            assert trigger["metadata"]["consumerGroup"] == group
            assert trigger["metadata"]["bootstrapServers"] == config["PIXELPIPE_KAFKA_BOOTSTRAP"]
        # Every topic the workers read, the long lanes too, counts towards their lag.
        assert {t["metadata"]["topic"] for t in scaled["spec"]["triggers"]} == set().union(*(topics[s] for s in stages))
        assert scaled["spec"]["maxReplicaCount"] <= partitions  # a worker beyond the partitions would sit idle
    gpu = deployments["pixelpipe-render"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"


def test_every_long_running_deployment_serves_metrics_and_probes():
    for name, doc in _documents():
        if doc["kind"] != "Deployment":
            continue
        container = doc["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "metrics", "containerPort": 9400} in container["ports"], name
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        if "lag-exporter" not in name:
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name


def _defined_metrics() -> set[str]:
    """Every metric name the code defines (histograms and counters with the suffixes Prometheus adds)."""
    names: set[str] = set()
    for path in [*ROOT.glob("processors/*.py"), *ROOT.glob("sinks/**/*.py"), ROOT / "pixelpipe/core/telemetry.py"]:
        for name in re.findall(r'"(pixelpipe_[a-z_]+)"', path.read_text()):
            names |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_total"}
    return names


def test_the_operations_dashboard_reads_prometheus_metrics_the_code_defines():
    dashboard = json.loads(OPERATIONS_DASHBOARD.read_text())
    defined = _defined_metrics()
    assert "pixelpipe_stage_queue_seconds" in defined
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "pixelpipe-prometheus", panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\b(pixelpipe_[a-z_]+)", target["expr"]))
            assert used <= defined, (panel["title"], used - defined)
            assert used or target["expr"].startswith("sum(up{"), target["expr"]
    provisioned = yaml.safe_load((ROOT / "analytics/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert provisioned["datasources"][0]["uid"] == "pixelpipe-prometheus"


def test_metric_names_follow_prometheus_conventions():
    from prometheus_client import REGISTRY

    import pixelpipe.processors.telemetry
    import pixelpipe.sinks.clickhouse.sink  # noqa: F401 - registers the sink's

    ours = [m for m in REGISTRY.collect() if m.name.startswith("pixelpipe_")]
    assert len(ours) >= 20
    units = ("_seconds", "_bytes", "_messages", "_usd", "_ratio", "_size", "_rows")
    for metric in ours:
        if metric.type == "counter":
            assert not metric.name.endswith("_total"), metric.name  # the client strips it; exposed with _total
        elif metric.type == "histogram":
            assert metric.name.endswith(units), metric.name
        labels = {label for sample in metric.samples for label in sample.labels}
        assert not labels & {"request_id", "event_id", "user_id", "worker_id"}, metric.name


# -- docker-compose.yml, checked without Docker ---------------------------------------------------------------
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_SPEC = ROOT / "tests" / "fixtures" / "compose" / "compose-spec.json"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_the_compose_file_follows_the_compose_specification():
    errors = [
        f"{'/'.join(map(str, error.path))}: {error.message}"
        for error in jsonschema.Draft7Validator(json.loads(COMPOSE_SPEC.read_text())).iter_errors(_compose())
    ]
    assert errors == []


def test_the_compose_services_name_only_what_exists():
    """What the specification cannot know: the services each depends on, the named volumes, the files and folders
    of this repository it mounts, and the pixelpipe settings it sets."""
    compose = _compose()
    services = compose["services"]
    known_settings = {
        f.metadata["env"] for section in [*Settings.sections(), StackSettings] for f in dataclasses.fields(section)
    }
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in compose["volumes"], f"{name} mounts the undeclared volume {source}"
        unknown = {k for k in service.get("environment", {}) if k.startswith("PIXELPIPE_")} - known_settings
        assert unknown == set(), f"{name} sets what no setting reads: {unknown}"
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file()


def test_compose_prometheus_scrapes_every_service_that_serves_metrics():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-compose.yml").read_text())
    scraped = {
        (name, sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    services = _compose()["services"]
    # A service others wait to complete runs once (topics, models, migrations): nothing to scrape.
    once = {
        name
        for service in services.values()
        for name, wait in service.get("depends_on", {}).items()
        if wait.get("condition") == "service_completed_successfully"
    }
    serving = {
        (name, int(service["environment"]["PIXELPIPE_METRICS_PORT"]))
        for name, service in services.items()
        if "PIXELPIPE_METRICS_PORT" in service.get("environment", {})
        and name not in once
        and "profiles" not in service  # tools, run by hand
    }
    assert serving == scraped
